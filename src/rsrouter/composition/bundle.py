"""Router bundles: a trained router made publishable, pushed to and loaded from the Hub.

A bundle is a folder: the router folder (``config.json`` + ``model.safetensors`` + optional
``denoiser/``) whose config gains a ``bundle`` section pinning every expert (source, requested
revision, resolved commit, sigma, kind, sha256 of each weight file, fingerprint), plus a
``README.md`` model card and the last report's ``curve.png``. Loading fetches the bundle, then
each pinned expert at its commit, refuses any hash or fingerprint that differs, and returns a
``DualSmoothed`` ready to certify.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rsrouter.composition.card import render_card
from rsrouter.composition.dual import DualSmoothed
from rsrouter.composition.rules import headline_rule
from rsrouter.errors import UsageError
from rsrouter.experts.expert import DENOISER_PATTERNS, EXPERT_PATTERNS, Expert, fetch_snapshot
from rsrouter.io import read_json, write_json
from rsrouter.registry import ExpertEntry, Workspace
from rsrouter.router.model import FORMAT as ROUTER_FORMAT
from rsrouter.router.model import RouterModel
from rsrouter.router.train import router_folder

BUNDLE_FORMAT = "rsrouter.bundle/1"
CARD_NAME, CURVE_NAME, REPORT_TABLE = "README.md", "curve.png", "certified_accuracy.md"
# What a bundle consists of; nothing else is uploaded or downloaded.
BUNDLE_PATTERNS = ["config.json", "model.safetensors", CARD_NAME, CURVE_NAME]
BUNDLE_PATTERNS += ["denoiser/*.json", "denoiser/*.safetensors"]  # never a pickle
_COMMIT = re.compile(r"[0-9a-f]{40}")


# ---------------------------------------------------------------- pins

# Registry-entry fields that only make sense on the machine that made the bundle.
_MACHINE_KEYS = ("endpoint", "cache_dir")


def make_pin(entry: ExpertEntry | dict, fingerprint: str, root: str | os.PathLike = ".") -> dict:
    """The bundle record of one expert: its registry entry, minus machine-local settings, with
    the fingerprint the router was trained against. ``root`` anchors a relative local folder."""
    pin = entry.to_dict() if isinstance(entry, ExpertEntry) else dict(entry)
    if not pin.get("sha256"):
        raise UsageError(f"expert '{pin.get('name')}' has no recorded file hashes to pin.")
    for key in _MACHINE_KEYS:
        pin.pop(key, None)
    for key, commit in (("source", "commit"), ("denoiser_source", "denoiser_commit")):
        if pin.get(key) and not pin.get(commit):  # a local folder: make it absolute
            pin[key] = str((Path(root) / pin[key]).resolve())
    pin["sha256"] = dict(sorted(pin["sha256"].items()))
    pin["fingerprint"] = fingerprint
    return pin


def is_hub_pin(pin: dict) -> bool:
    """True when every part of the expert is a Hub repo pinned to a commit (fetchable by all)."""
    parts = [("source", "commit")]
    if pin.get("denoiser_source"):
        parts.append(("denoiser_source", "denoiser_commit"))
    return all(bool(_COMMIT.fullmatch(str(pin.get(commit) or ""))) for _, commit in parts)


def bundle_pins(config: dict, where: str = "config.json") -> list[dict]:
    """The pinned experts of a bundle config, checked against the router's own expert list."""
    if config.get("format") != ROUTER_FORMAT:
        raise UsageError(f"{where} does not describe an rsrouter router.")
    section = config.get("bundle")
    if not isinstance(section, dict) or section.get("format") != BUNDLE_FORMAT:
        raise UsageError(
            f"{where} is a router folder but not a bundle (no pinned experts): make one with "
            "`router push` or `make_bundle`."
        )
    pins = section.get("experts") or []
    names = [p.get("name") for p in pins]
    if names != list(config["experts"]):
        raise UsageError(f"{where}: the pinned experts {names} are not the router's experts.")
    return pins


# ---------------------------------------------------------------- making a bundle


def make_bundle(
    router_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    pins: Sequence[dict],
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    dataset: str | None = None,
    report_dir: str | os.PathLike | None = None,
    certify_run: dict | None = None,
) -> Path:
    """Assemble the bundle of the router in ``router_dir`` into ``out_dir`` (replaced whole).

    ``pins`` (from ``make_pin``) must name the router's experts in order, with the sigma and
    fingerprint the router was trained for. The card takes the certified-accuracy table and
    curve of ``report_dir`` when they exist; ``certify_run`` (run key and router fingerprint)
    records in the bundle which run they come from.
    """
    router_dir, out_dir = Path(router_dir), Path(out_dir)
    config = read_json(router_dir / "config.json")
    if config.get("format") != ROUTER_FORMAT:
        raise UsageError(f"{router_dir} is not an rsrouter router folder.")
    if not (router_dir / "model.safetensors").is_file():
        raise UsageError(f"{router_dir} has no model.safetensors: train the router first.")
    names = [p["name"] for p in pins]
    if names != list(config["experts"]):
        raise UsageError(
            f"the router was trained for experts {config['experts']}, the workspace has {names}: "
            "retrain it with `router train`."
        )
    for pin, sigma, fingerprint in zip(pins, config["sigmas"], config["fingerprints"], strict=True):
        if float(pin["sigma"]) != float(sigma) or pin["fingerprint"] != fingerprint:
            raise UsageError(
                f"expert '{pin['name']}' changed since the router was trained: rebuild the tables "
                "and retrain it."
            )
    config["bundle"] = {"format": BUNDLE_FORMAT, "experts": [dict(p) for p in pins]}
    if certify_run is not None:
        config["bundle"]["certify_run"] = dict(certify_run)

    report_dir = Path(report_dir) if report_dir is not None else None
    report_md = curve = None
    if report_dir is not None and (report_dir / REPORT_TABLE).is_file():
        report_md = (report_dir / REPORT_TABLE).read_text(encoding="utf-8")
    if report_dir is not None and (report_dir / CURVE_NAME).is_file():
        curve = report_dir / CURVE_NAME
    card = render_card(
        config,
        repo_id=repo_id,
        license=license,
        dataset=dataset,
        report_md=report_md,
        has_curve=curve is not None,
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copy2(router_dir / "model.safetensors", tmp / "model.safetensors")
        if (router_dir / "denoiser").is_dir():
            shutil.copytree(router_dir / "denoiser", tmp / "denoiser")
        if curve is not None:
            shutil.copy2(curve, tmp / CURVE_NAME)
        write_json(tmp / "config.json", config)
        card.save(tmp / CARD_NAME)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def bundle_workspace(
    ws: Workspace,
    out_dir: str | os.PathLike | None = None,
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    token: str | bool | None = None,
) -> Path:
    """The bundle of a workspace's trained router (``<artifacts>/router``) and its registered
    experts (loaded, so every hash is checked), in ``<artifacts>/bundle``.

    The card's results are rebuilt from the certify run of THIS router (matched by the router
    fingerprint the run recorded; the one `router report` last showed, else the newest), so a
    card never shows another router's numbers; without such a run it is refused."""
    from rsrouter.composition.certify_run import load_run, runs_of_router
    from rsrouter.composition.report import write_report

    if repo_id is not None:
        check_repo_id(repo_id)
    router_dir = router_folder(ws)
    if not (router_dir / "config.json").is_file():
        raise UsageError(f"no trained router in {router_dir}: run `router train` first.")
    experts = ws.load_experts(token=token)
    pins = [make_pin(e, experts[e.name].fingerprint, ws.root) for e in ws.experts]
    fingerprint = RouterModel.from_pretrained(router_dir).fingerprint
    runs = runs_of_router(ws.artifacts, fingerprint)
    if not runs:
        raise UsageError(
            f"no `router certify` run of this router (fingerprint {fingerprint[:12]}…) is in "
            f"{ws.artifacts / 'certify'}, so its card would have no results: run "
            f"`router certify -w {ws.root}`, then push again."
        )
    reported = _reported_run(ws.artifacts / "report")
    run = next((r for r in runs if r.stem == reported), runs[0])
    meta, records = load_run(run)
    if not records:
        raise UsageError(f"{run} has no records yet: run `router certify -w {ws.root}` first.")
    with tempfile.TemporaryDirectory(prefix="rsrouter-card-") as report_dir:
        write_report(meta, records, report_dir)
        return make_bundle(
            router_dir,
            out_dir if out_dir is not None else ws.artifacts / "bundle",
            pins,
            repo_id=repo_id,
            license=license,
            dataset=ws.settings("data").get("dataset"),
            report_dir=report_dir,
            certify_run={"run": meta.get("run", run.stem), "router": fingerprint},
        )


def _reported_run(report_dir: Path) -> str | None:
    """The run key the last `router report` summarised (None if there is none to read)."""
    path = report_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return read_json(path).get("run")
    except UsageError:
        return None


def _replace_dir(new: Path, target: Path) -> None:
    """Put folder ``new`` at ``target``; a kill leaves either the old or the new folder."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- Hub


def check_repo_id(repo_id: str) -> str:
    """A Hub repo id of the form ORG/NAME, refused in one sentence before anything is written."""
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


def push_bundle(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
):
    """Upload a bundle folder to the Hub repo ``repo_id`` (created if needed); a CommitInfo.

    Refuses a bundle whose experts are not Hub repos pinned to a commit: nobody else could
    fetch them. ``revision`` names a branch (created from main if missing). Bundle files of an
    earlier push that this bundle no longer has (an old curve, a removed denoiser) are deleted
    in the same commit; files the bundle never writes are left alone.
    """
    check_repo_id(repo_id)
    folder = Path(folder)
    config = read_json(folder / "config.json")
    local = [
        p["name"] for p in bundle_pins(config, str(folder / "config.json")) if not is_hub_pin(p)
    ]
    if local:
        raise UsageError(
            f"expert(s) {', '.join(local)} come from local folders, which nobody else can fetch: "
            f"publish each with `router push-expert {local[0]} ORG/REPO` (or push with "
            "--push-experts), then push the router again."
        )
    return _upload(
        folder,
        repo_id,
        BUNDLE_PATTERNS,
        delete_patterns=BUNDLE_PATTERNS,  # stale bundle files only; others stay
        private=private,
        revision=revision,
        endpoint=endpoint,
        token=token,
        commit_message=commit_message or "Upload rsrouter router bundle",
    )


def _upload(
    folder: Path,
    repo_id: str,
    patterns: list[str],
    *,
    delete_patterns: list[str] | None = None,
    private: bool,
    revision: str | None,
    endpoint: str | None,
    token,
    commit_message: str,
):
    """One commit of ``folder``'s files matching ``patterns`` to ``repo_id`` (created if
    needed, on branch ``revision``); Hub and network failures are one sentence."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            allow_patterns=patterns,
            delete_patterns=delete_patterns,
            commit_message=commit_message,
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        raise UsageError(
            f"the Hub refused to push to {repo_id!r} (HTTP {status}): "
            f"{str(exc).splitlines()[0][:200]}"
        ) from exc
    except _transport_errors() as exc:
        raise UsageError(f"could not reach the Hub to push {repo_id!r} ({exc}).") from exc


def push_expert(
    ws: Workspace,
    name: str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
) -> ExpertEntry:
    """Publish the workspace expert ``name``, which comes from a local folder, as the Hub repo
    ``repo_id`` and re-pin its router.toml entry to that commit.

    Exactly the files whose sha256 the entry records are uploaded (plus the folder's README.md
    card), so the expert loads with the same hashes and fingerprint: a router trained against
    it stays valid and can then be pushed. A denoiser registered from a folder of its own goes
    to ``<repo_id>-denoiser``.
    """
    from dataclasses import replace

    from rsrouter.registry.workspace import DENOISER_PREFIX

    check_repo_id(repo_id)
    ws.reload()
    entry = ws.entry(name)
    if entry.commit and (not entry.denoiser_source or entry.denoiser_commit):
        raise UsageError(
            f"expert {name!r} already comes from the Hub ({entry.source} at commit "
            f"{entry.commit[:12]}): nothing to publish."
        )
    before = ws.load_expert(name, token=token).fingerprint  # every hash checked first
    separate = bool(entry.denoiser_source)  # the denoiser's files live in a folder of their own
    own = {k for k in entry.sha256 if not (separate and k.startswith(DENOISER_PREFIX))}
    hub = {"private": private, "revision": revision, "endpoint": endpoint, "token": token}
    message = commit_message or f"Upload rsrouter expert {name}"
    updates: dict = {"endpoint": endpoint}
    if not entry.commit:
        info = _upload(ws.root / entry.source, repo_id, [*sorted(own), CARD_NAME],
                       commit_message=message, **hub)  # fmt: skip
        updates.update(source=repo_id, revision=revision or "main", commit=info.oid)
    if separate and not entry.denoiser_commit:
        den_repo = f"{repo_id}-denoiser"
        check_repo_id(den_repo)
        den = sorted(k[len(DENOISER_PREFIX) :] for k in entry.sha256 if k not in own)
        info = _upload(ws.root / entry.denoiser_source, den_repo, den, commit_message=message,
                       **hub)  # fmt: skip
        updates.update(
            denoiser_source=den_repo, denoiser_revision=revision or "main", denoiser_commit=info.oid
        )
    published = replace(entry, **updates)
    ws.experts[ws.experts.index(entry)] = published
    after = ws.load_expert(name, token=token).fingerprint  # fetched back from the Hub
    if after != before:
        raise UsageError(
            f"expert {name!r} fetched back from {repo_id} has fingerprint {after[:12]}…, not "
            f"{before[:12]}…; router.toml was left as it was."
        )
    ws.save()
    return published


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of whichever HTTP client huggingface_hub uses (requests' are
    OSErrors; httpx's and httpx2's are not)."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(name).TransportError)
    return tuple(errors)


def fetch_bundle(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> tuple[Path, str | None]:
    """A bundle folder and its commit (None for a local folder): used as is, or downloaded."""
    path = Path(repo_or_dir)
    if path.is_dir():
        if revision is not None:
            raise UsageError(f"{path} is a local folder: a revision names a Hub commit.")
        return path, None
    if path.exists() or str(repo_or_dir).count("/") > 1:
        raise UsageError(f"{repo_or_dir} is neither a bundle folder nor a Hub repo id.")
    return fetch_snapshot(
        str(repo_or_dir),
        revision=revision,
        cache_dir=cache_dir,
        endpoint=endpoint,
        token=token,
        local_files_only=local_files_only,
        allow_patterns=BUNDLE_PATTERNS,
    )


def _prefetch(pin: dict, hub: dict) -> None:
    """Bring a pinned expert's snapshot(s) into the cache, naming the expert if that fails."""
    parts = [(pin["source"], pin.get("commit"), EXPERT_PATTERNS)]
    if pin.get("denoiser_source"):
        parts.append((pin["denoiser_source"], pin.get("denoiser_commit"), DENOISER_PATTERNS))
    for source, commit, patterns in parts:
        if not commit:
            continue  # a local folder: the registry checks it exists
        try:
            fetch_snapshot(source, revision=commit, allow_patterns=patterns, **hub)
        except UsageError as exc:
            raise UsageError(
                f"the router's expert '{pin['name']}' ({source} at commit {commit[:12]}) cannot "
                f"be fetched: {exc}"
            ) from exc


def load_pinned_experts(
    pins: Sequence[dict],
    *,
    root: str | os.PathLike,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
) -> list[Expert]:
    """Fetch every pinned expert at its commit and load it through the registry, which refuses
    any file whose sha256 differs from the pin; then check each expert's fingerprint.

    ``root`` is the bundle folder: the in-memory registry is rooted there (it holds no
    router.toml, so no workspace file can ever be read in place of the pins)."""
    hub = {"endpoint": endpoint, "cache_dir": _str(cache_dir), "token": token}
    for pin in pins:
        _prefetch(pin, {**hub, "local_files_only": local_files_only})
    place = {"endpoint": endpoint, "cache_dir": _str(cache_dir)}  # this machine's, not the pin's
    entries = [{**{k: v for k, v in p.items() if k != "fingerprint"}, **place} for p in pins]
    registry = Workspace(Path(root), {"experts": entries})  # in memory: never saved
    loaded = registry.load_experts(device=device, token=token)
    experts = [loaded[pin["name"]] for pin in pins]
    for pin, expert in zip(pins, experts, strict=True):
        if expert.fingerprint != pin["fingerprint"]:
            raise UsageError(
                f"the router's expert '{pin['name']}' loads with fingerprint "
                f"{expert.fingerprint[:12]}…, but the router was trained with "
                f"{pin['fingerprint'][:12]}…."
            )
    return experts


def _str(value) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class PulledRouter:
    """A loaded bundle: where it lies, the commit it came from, its pins, the model."""

    folder: Path
    commit: str | None  # None for a local bundle folder
    pins: list[dict]
    model: DualSmoothed


def pull_router(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
) -> PulledRouter:
    """Fetch a bundle and its pinned experts (every hash checked) and build the model."""
    hub = dict(
        endpoint=endpoint, cache_dir=cache_dir, token=token, local_files_only=local_files_only
    )
    folder, commit = fetch_bundle(repo_or_dir, revision=revision, **hub)
    if not (folder / "config.json").is_file():
        where = f"{repo_or_dir} at {revision}" if revision else str(repo_or_dir)
        raise UsageError(f"{where} has no config.json: it is not an rsrouter router bundle.")
    pins = bundle_pins(read_json(folder / "config.json"), str(folder / "config.json"))
    experts = load_pinned_experts(pins, root=folder, device=device, **hub)
    router = RouterModel.from_pretrained(folder, device=device)
    router.check_experts([p["name"] for p in pins], [e.fingerprint for e in experts])
    dual = DualSmoothed(router, router.sigma_e, experts, biases=router.info.get("biases"),
                        cascade=router.info.get("cascade"),
                        rule=headline_rule(None, router.info))  # fmt: skip
    return PulledRouter(folder, commit, pins, dual)


def workspace_from_bundle(
    pulled: PulledRouter,
    path: str | os.PathLike,
    *,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Workspace:
    """A new workspace at ``path`` (refused if one is there) holding a pulled router: its pinned
    experts registered in router.toml as they were pinned, the router in ``<artifacts>/router``
    (exactly the trained router: same config, weights and fingerprint), and the dataset it was
    trained on as ``[data]``. `router certify`, `report` and `push` then work there."""
    config = read_json(pulled.folder / "config.json")
    bundle = config.pop("bundle", None)
    dataset = config.get("dataset")
    ws = Workspace.init(path, dataset=dataset if isinstance(dataset, str) else None)
    place = {"endpoint": endpoint, "cache_dir": _str(cache_dir)}
    entries = [
        ExpertEntry.from_dict(
            {**{k: v for k, v in pin.items() if k != "fingerprint"}, **place}, str(ws.path)
        )
        for pin in (bundle or {}).get("experts", pulled.pins)
    ]
    target = router_folder(ws)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".router.", dir=target.parent))
    try:
        shutil.copy2(pulled.folder / "model.safetensors", tmp / "model.safetensors")
        if (pulled.folder / "denoiser").is_dir():
            shutil.copytree(pulled.folder / "denoiser", tmp / "denoiser")
        write_json(tmp / "config.json", config)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ws.experts = entries
    ws.save()
    return ws


def load_router(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
) -> DualSmoothed:
    """A published router, ready to certify: bundle + pinned experts, every hash checked.

    ``repo_or_dir`` is a bundle folder or a Hub repo id. Offline (``HF_HUB_OFFLINE=1`` or
    ``local_files_only=True``) it loads from the Hub cache. ``model.router`` is the
    ``RouterModel`` (its ``expert_names`` say which expert each index is).
    """
    return pull_router(
        repo_or_dir,
        revision=revision,
        endpoint=endpoint,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        device=device,
    ).model
