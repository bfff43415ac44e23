"""`router push` and `router pull`: publish a workspace's router on the Hub, fetch one back."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from rsrouter.cli.app import WORKSPACE, app, console, show_table
from rsrouter.composition.bundle import (
    bundle_workspace,
    check_repo_id,
    is_hub_pin,
    pull_router,
    push_bundle,
    push_expert,
    workspace_from_bundle,
)
from rsrouter.errors import UsageError
from rsrouter.registry import WORKSPACE_FILE, Workspace

ENDPOINT = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or the Hub).")
TOKEN = typer.Option(
    None, "--token", help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`)."
)


@app.command("push")
def push_cmd(
    repo_id: str = typer.Argument(..., help="Hub repo id to publish to, e.g. ORG/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str = typer.Option(
        None, "--revision", help="Branch to push to (created from main if missing)."
    ),
    license: str = typer.Option("apache-2.0", "--license", help="Licence of the router."),
    message: str = typer.Option(None, "--message", "-m", help="Commit message."),
    push_experts: bool = typer.Option(
        False,
        "--push-experts",
        help="First publish each expert that comes from a local folder as ORG/NAME-<expert>.",
    ),
    endpoint: str = ENDPOINT,
    token: str = TOKEN,
    workspace: Path = WORKSPACE,
) -> None:
    """Bundle the trained router (pinned experts, a model card with the results of the certify
    run of this very router) and upload it."""
    check_repo_id(repo_id)
    ws = Workspace.open(workspace)
    bundle = bundle_workspace(ws, repo_id=repo_id, license=license, token=token)  # checks first
    local = [e.name for e in ws.experts if not is_hub_pin(e.to_dict())]
    if push_experts and local:
        for name in local:
            _publish_expert(ws, name, f"{repo_id}-{name}", private, endpoint, token)
        bundle = bundle_workspace(ws, repo_id=repo_id, license=license, token=token)  # re-pinned
    console.print(f"bundle written to {bundle}")
    info = push_bundle(
        bundle,
        repo_id,
        private=private,
        revision=revision,
        endpoint=endpoint,
        token=token,
        commit_message=message,
    )
    console.print(f"pushed {repo_id} at commit {info.oid}: {info.commit_url}")


@app.command("push-expert")
def push_expert_cmd(
    name: str = typer.Argument(..., help="The workspace expert (one from a local folder)."),
    repo_id: str = typer.Argument(..., help="Hub repo id to publish it as, e.g. ORG/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    endpoint: str = ENDPOINT,
    token: str = TOKEN,
    workspace: Path = WORKSPACE,
) -> None:
    """Publish a local expert as a Hub repo of its own and pin router.toml to that commit (same
    files and hashes: the router stays valid), so that `router push` can publish the router."""
    check_repo_id(repo_id)
    _publish_expert(Workspace.open(workspace), name, repo_id, private, endpoint, token)


def _publish_expert(ws, name, repo_id, private, endpoint, token) -> None:
    entry = push_expert(ws, name, repo_id, private=private, endpoint=endpoint, token=token)
    console.print(f"published expert {name} as {entry.source} at commit {entry.commit}")
    console.print(f"pinned in {ws.path}")


@app.command("pull")
def pull_cmd(
    repo_id: str = typer.Argument(..., help="Hub repo id (ORG/NAME) or a bundle folder."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Hub cache folder."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local Hub cache."),
    workspace: Path = typer.Option(
        None,
        "--workspace",
        "-w",
        help="Also make a new workspace here (router.toml with the pinned experts, the router), "
        "ready for `router certify`.",
    ),
    endpoint: str = ENDPOINT,
    token: str = TOKEN,
) -> None:
    """Fetch a router and its pinned experts, check every hash, and show what was loaded."""
    if workspace is not None and (workspace / WORKSPACE_FILE).exists():
        raise UsageError(f"{workspace / WORKSPACE_FILE} already exists: pull into a new folder.")
    pulled = pull_router(
        repo_id,
        revision=revision,
        endpoint=endpoint,
        cache_dir=cache_dir,
        token=token,
        local_files_only=offline,
    )
    where = f"at commit {pulled.commit}" if pulled.commit else "(local folder)"
    table = Table(title=f"router {repo_id} {where}, σ_e = {pulled.model.sigma_e:g}")
    for column in ("#", "expert", "σ", "kind", "source", "commit", "files"):
        table.add_column(column)
    for i, pin in enumerate(pulled.pins):
        table.add_row(
            str(i),
            pin["name"],
            f"{pin['sigma']:g}",
            pin["kind"],
            pin["source"],
            (pin.get("commit") or "local")[:12],
            f"{len(pin['sha256'])} sha256 ✓",
        )
    show_table(table)
    console.print(f"bundle in {pulled.folder}")
    if workspace is not None:
        ws = workspace_from_bundle(pulled, workspace, endpoint=endpoint, cache_dir=cache_dir)
        console.print(f"workspace: {ws.root} (dataset {ws.settings('data').get('dataset')})")
        console.print(f"next: `router certify -w {ws.root}`")
    else:
        console.print(f'certify with: rsrouter.load_router("{repo_id}").certify(x, ...)')
