"""`router push` and `router pull`: publish a workspace's router on the Hub, fetch one back."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from rsrouter.cli.app import WORKSPACE, app, console, show_table
from rsrouter.composition.bundle import bundle_workspace, pull_router, push_bundle
from rsrouter.errors import UsageError
from rsrouter.registry import Workspace

ENDPOINT = typer.Option(None, "--endpoint", help="Hub URL (default: HF_ENDPOINT or the Hub).")
TOKEN = typer.Option(
    None, "--token", help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`)."
)


def check_repo_id(repo_id: str) -> str:
    """A Hub repo id as ORG/NAME, else one sentence (the Hub's own check, made up front)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(
            f"{repo_id!r} is not a Hub repo id: use ORG/NAME with letters, digits, '-', '_' "
            "and '.' (at most 96 characters), e.g. my-org/my-router."
        ) from exc
    return repo_id


@app.command("push")
def push_cmd(
    repo_id: str = typer.Argument(..., help="Hub repo id to publish to, e.g. ORG/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str = typer.Option(
        None, "--revision", help="Branch to push to (created from main if missing)."
    ),
    license: str = typer.Option("apache-2.0", "--license", help="Licence of the router."),
    message: str = typer.Option(None, "--message", "-m", help="Commit message."),
    endpoint: str = ENDPOINT,
    token: str = TOKEN,
    workspace: Path = WORKSPACE,
) -> None:
    """Bundle the trained router (pinned experts, model card, last report) and upload it."""
    check_repo_id(repo_id)  # before anything is written
    ws = Workspace.open(workspace)
    bundle = bundle_workspace(ws, repo_id=repo_id, license=license, token=token)
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


@app.command("pull")
def pull_cmd(
    repo_id: str = typer.Argument(..., help="Hub repo id (ORG/NAME) or a bundle folder."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit."),
    cache_dir: Path = typer.Option(None, "--cache-dir", help="Hub cache folder."),
    offline: bool = typer.Option(False, "--offline", help="Use only the local Hub cache."),
    endpoint: str = ENDPOINT,
    token: str = TOKEN,
) -> None:
    """Fetch a router and its pinned experts, check every hash, and show what was loaded."""
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
    console.print(f'certify with: rsrouter.load_router("{repo_id}").certify(x, ...)')
