"""The workspace: ``router.toml`` lists named experts (pinned, hash-verified) and settings.

An entry records where an expert came from (a Hub repo id or a local folder), the revision asked
for and the commit it resolved to, its sigma and kind, and the sha256 of every file it loads.
Every load checks those hashes, so an expert cannot change under a router or a table cache
without the user re-adding it.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from rsrouter.errors import UsageError
from rsrouter.experts.expert import (
    CONFIG_NAME,
    DEFAULT_RESIZE,
    DENOISER_PATTERNS,
    EXPERT_PATTERNS,
    LEGACY_RESIZE,
    Expert,
    check_denoiser_folder,
    check_resize_mode,
    fetch_snapshot,
    load_classifier,
    load_denoiser,
    load_folder,
    read_config,
    refuse_pickles,
    weight_files,
)
from rsrouter.io import sha256_file, write_text
from rsrouter.registry import toml
from rsrouter.smoothing import check_sigma

WORKSPACE_FILE = "router.toml"
ARTIFACTS_DIR = ".rsrouter"
SECTIONS = ("data", "tables", "router", "train", "certify")
HEADER = """rsrouter workspace: the experts a router chooses among, and the settings of each step.
Human-editable; `router add-expert` / `router remove-expert` edit it in place (comments stay).
Router output i is expert i in the order below."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DENOISER_PREFIX = "denoiser/"


@dataclass
class ExpertEntry:
    """One registered expert, as written in router.toml."""

    name: str
    source: str  # a Hub repo id, or a local folder (relative to the workspace if inside it)
    kind: str
    sigma: float
    num_classes: int
    input_shape: list[int]
    parameters: int = 0
    revision: str | None = None  # what was asked for (Hub only)
    commit: str | None = None  # what it resolved to (Hub only)
    endpoint: str | None = None
    cache_dir: str | None = None
    denoiser_source: str | None = None  # "denoised" built from a separate diffusers repo/folder
    denoiser_revision: str | None = None
    denoiser_commit: str | None = None
    # with denoiser_source: the resize to the classifier's size (absent in entries written before
    # the option existed, which were computed with LEGACY_RESIZE and keep it)
    resize_mode: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> ExpertEntry:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        missing = [k for k in ("name", "source", "kind", "sigma") if k not in data]
        if unknown or missing:
            raise UsageError(
                f"{where}: expert entry {data.get('name', '?')!r} has "
                + (f"unknown keys {unknown}" if unknown else f"no {missing}")
                + "."
            )
        wrong = [k for k in ("name", "source", "kind") if not isinstance(data[k], str)]
        wrong += [k for k in ("num_classes", "parameters") if not isinstance(data.get(k, 0), int)]
        if wrong:
            raise UsageError(f"{where}: expert entry {data['name']!r} has a malformed {wrong[0]}.")
        hashes = data.get("sha256", {})
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise UsageError(f"{where}: expert {data['name']!r}: sha256 must be a table of text.")
        try:
            check_sigma(data["sigma"])
        except UsageError as exc:
            raise UsageError(f"{where}: expert {data['name']!r}: {exc}") from exc
        data = dict(data)
        data.setdefault("num_classes", 0)
        data.setdefault("input_shape", [])
        return cls(**data)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def pinned(self) -> str:
        """The resolved commit (Hub) or "local"."""
        return self.commit or "local"


class Workspace:
    """A folder with router.toml; ``ws.artifacts`` is where every step writes its outputs."""

    def __init__(self, root: Path, doc: dict):
        self.root = root
        self._load(doc)

    def _load(self, doc: dict) -> None:
        self.doc = doc
        where = str(self.path)
        entries = doc.get("experts", [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise UsageError(f"{where}: experts must be [[experts]] tables.")
        self.experts = [ExpertEntry.from_dict(e, where) for e in entries]

    def reload(self) -> None:
        """Read router.toml again (it may have been edited since this object was made)."""
        self._load(Workspace.open(self.root).doc)

    # ---- files
    @property
    def path(self) -> Path:
        return self.root / WORKSPACE_FILE

    @property
    def artifacts(self) -> Path:
        return self.root / self.doc.get("artifacts", ARTIFACTS_DIR)

    @classmethod
    def init(cls, path: str | os.PathLike = ".", *, dataset: str | None = None) -> Workspace:
        """Create router.toml in ``path`` (refused if one is there)."""
        root = Path(path).resolve()
        if (root / WORKSPACE_FILE).exists():
            raise UsageError(f"{root / WORKSPACE_FILE} already exists.")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create the workspace folder {root} ({exc.strerror})."
            ) from exc
        doc = {"artifacts": ARTIFACTS_DIR, "data": {"dataset": dataset or "fashion-mnist-subset"}}
        ws = cls(root, doc)
        ws.save()
        return ws

    @classmethod
    def open(cls, path: str | os.PathLike = ".") -> Workspace:
        root = Path(path).resolve()
        file = root / WORKSPACE_FILE
        if not file.is_file():
            raise UsageError(f"no {WORKSPACE_FILE} in {root}: run `router init` there first.")
        try:
            doc = tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{file} is not valid TOML ({exc}).") from exc
        return cls(root, doc)

    def save(self) -> None:
        doc = {k: v for k, v in self.doc.items() if k != "experts"}
        if self.experts:  # none: no key at all (an empty `experts = []` would sit mid-file)
            doc["experts"] = [e.to_dict() for e in self.experts]
        self.doc = doc
        old = self.path.read_text(encoding="utf-8") if self.path.is_file() else None
        write_text(self.path, toml.merge(old, doc, HEADER) if old else toml.dumps(doc, HEADER))

    def lock(self, command: str):
        """Hold this workspace's lock while ``command`` runs (a second long job refuses)."""
        from rsrouter.registry.lock import workspace_lock

        return workspace_lock(self.artifacts, command)

    # ---- settings
    def settings(self, section: str) -> dict:
        """The ``[section]`` table (a copy); callers fill in their own defaults."""
        value = self.doc.get(section, {})
        if not isinstance(value, dict):
            raise UsageError(f"{self.path}: [{section}] must be a table.")
        return dict(value)

    def settings_over(self, section: str, defaults: dict, overrides: dict) -> dict:
        """``[section]`` over ``defaults`` (a key not in them is a UsageError), then the
        ``overrides`` that are not None: a command's effective settings."""
        settings = self.settings(section)
        unknown = sorted(set(settings) - set(defaults))
        if unknown:
            raise UsageError(
                f"unknown [{section}] setting(s) in {self.path}: {', '.join(unknown)}."
            )
        given = {k: v for k, v in overrides.items() if v is not None}
        return {**defaults, **settings, **given}

    def update_settings(self, section: str, **values) -> None:
        self.reload()
        table = self.settings(section)
        table.update(values)
        self.doc[section] = table
        self.save()

    # ---- experts
    @property
    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def entry(self, name: str) -> ExpertEntry:
        for e in self.experts:
            if e.name == name:
                return e
        known = ", ".join(self.names) or "none registered"
        raise UsageError(f"no expert named {name!r} in {self.path} ({known}).")

    def add_expert(
        self,
        source: str | os.PathLike,
        sigma: float | list[float],
        *,
        name: str | None = None,
        revision: str | None = None,
        endpoint: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | None = None,
        denoiser: str | os.PathLike | None = None,
        denoiser_revision: str | None = None,
        resize_mode: str | None = None,
    ) -> list[ExpertEntry]:
        """Register ``source`` at each sigma (several only for denoised experts); return them.

        With ``denoiser``, ``source`` is the classifier and ``denoiser`` a diffusers repo/folder;
        ``resize_mode`` (default DEFAULT_RESIZE) resizes the denoised image for the classifier.
        """
        self.reload()  # edits made since this object was opened are kept
        sigmas = [check_sigma(s) for s in (sigma if isinstance(sigma, list) else [sigma])]
        if not sigmas:
            raise UsageError("give at least one sigma.")
        hub = {"endpoint": endpoint, "cache_dir": _str(cache_dir), "token": token}
        cls_folder, cls_source, cls_commit = self._resolve(source, revision, hub, EXPERT_PATTERNS)
        config = read_config(cls_folder)
        hashes = hash_files(cls_folder, [CONFIG_NAME, *weight_files(cls_folder, config)])
        den = {}
        if resize_mode is not None and denoiser is None:
            raise UsageError(
                "--resize-mode goes with --denoiser (a denoised expert folder has its own, in "
                "its config.json)."
            )
        if denoiser is not None:
            if config.kind != "classifier":
                raise UsageError(f"{source} is a {config.kind} expert, not a classifier.")
            den_folder, den_source, den_commit = self._resolve(
                denoiser, denoiser_revision, hub, DENOISER_PATTERNS
            )
            den = {
                "folder": den_folder,
                "denoiser_source": den_source,
                "denoiser_revision": denoiser_revision if den_commit else None,
                "denoiser_commit": den_commit,
                "resize_mode": check_resize_mode(resize_mode or DEFAULT_RESIZE, "--resize-mode"),
            }
            hub_repo = den_source if den_commit else None
            for rel in denoiser_files(den_folder, hub_repo, denoiser_revision, endpoint):
                hashes[DENOISER_PREFIX + rel] = sha256_file(den_folder / rel)
        kind = "denoised" if denoiser is not None else config.kind
        if len(sigmas) > 1 and kind != "denoised":
            raise UsageError(
                "a Gaussian-trained classifier is bound to one sigma; only denoised experts can "
                "be registered at several."
            )
        base = name or default_name(str(denoiser or source))
        first = ExpertEntry(
            name=base,
            source=cls_source,
            kind=kind,
            sigma=sigmas[0],
            num_classes=0,
            input_shape=[],
            revision=revision if cls_commit else None,
            commit=cls_commit,
            endpoint=endpoint,
            cache_dir=_str(cache_dir),
            denoiser_source=den.get("denoiser_source"),
            denoiser_revision=den.get("denoiser_revision"),
            denoiser_commit=den.get("denoiser_commit"),
            resize_mode=den.get("resize_mode"),
            sha256=hashes,
        )
        expert = self._build(first, cls_folder, den.get("folder"), device="cpu")  # loaded once
        entries = []
        for s in sigmas:
            if s != expert.sigma:  # only denoised experts get here: a sigma beyond the
                expert.with_sigma(s)  # denoiser's schedule is refused, the models are shared
            entry = replace(
                first,
                name=base if (name and kind != "denoised") else f"{base}-sigma{s:g}",
                sigma=s,
                num_classes=expert.num_classes,
                input_shape=list(expert.input_shape),
                parameters=expert.num_parameters,
            )
            self._check_new(entry, entries)
            entries.append(entry)
        self.experts.extend(entries)
        self.save()
        return entries

    def _check_new(self, entry: ExpertEntry, pending: list[ExpertEntry]) -> None:
        if not NAME.match(entry.name):
            raise UsageError(
                f"expert name {entry.name!r} must start with a letter or digit and use only "
                "letters, digits, '.', '_' and '-'."
            )
        others = self.experts + pending
        if entry.name in [e.name for e in others]:
            raise UsageError(f"an expert named {entry.name!r} is already registered.")
        for e in others:
            if e.num_classes and e.num_classes != entry.num_classes:
                raise UsageError(
                    f"expert {entry.name!r} has {entry.num_classes} classes but {e.name!r} has "
                    f"{e.num_classes}: all experts must classify the same classes."
                )
            if e.input_shape and list(e.input_shape) != list(entry.input_shape):
                raise UsageError(
                    f"expert {entry.name!r} takes inputs {tuple(entry.input_shape)} but "
                    f"{e.name!r} takes {tuple(e.input_shape)}: all experts must share one."
                )

    def remove_expert(self, name: str) -> ExpertEntry:
        self.reload()
        entry = self.entry(name)
        self.experts.remove(entry)
        self.save()
        return entry

    def load_expert(self, name: str, *, device: str | torch.device = "cpu", token=None) -> Expert:
        """The expert ``name`` at its registered sigma, after checking every file's sha256."""
        entry = self.entry(name)
        hub = {"endpoint": entry.endpoint, "cache_dir": entry.cache_dir, "token": token}
        folder = self._fetch(entry.source, entry.commit, hub, EXPERT_PATTERNS)
        den_folder = None
        if entry.denoiser_source:
            den_folder = self._fetch(
                entry.denoiser_source, entry.denoiser_commit, hub, DENOISER_PATTERNS
            )
        verify(entry, folder, den_folder)
        return self._build(entry, folder, den_folder, device)

    def load_experts(self, *, device: str | torch.device = "cpu", token=None) -> dict[str, Expert]:
        """Every expert, in registered order; a denoised model at several sigma is loaded once."""
        loaded: dict[tuple, Expert] = {}
        experts = {}
        for e in self.experts:
            key = (
                e.source,
                e.commit,
                e.denoiser_source,
                e.denoiser_commit,
                e.resize_mode,
                tuple(e.sha256.items()),
            )
            if e.kind == "denoised" and key in loaded:
                experts[e.name] = loaded[key].with_sigma(e.sigma)
            else:
                experts[e.name] = loaded[key] = self.load_expert(e.name, device=device, token=token)
        return experts

    # ---- helpers
    def _resolve(self, source, revision, hub, patterns) -> tuple[Path, str, str | None]:
        """(folder, source as recorded, resolved commit or None for a local folder)."""
        path = Path(source).expanduser()
        if path.is_dir():
            if revision:
                raise UsageError(f"{source} is a local folder: --revision applies to Hub repos.")
            path = path.resolve()
            try:
                recorded = path.relative_to(self.root).as_posix()
            except ValueError:
                recorded = str(path)
            return path, recorded, None
        if _looks_like_path(str(source)):
            raise UsageError(f"{source} is neither a folder nor a Hub repo id (org/name).")
        folder, commit = fetch_snapshot(
            str(source), revision=revision, allow_patterns=patterns, **hub
        )
        return folder, str(source), commit

    def _fetch(self, source: str, commit: str | None, hub, patterns) -> Path:
        if commit is None:
            folder = Path(source)
            folder = folder if folder.is_absolute() else self.root / folder
            if not folder.is_dir():
                raise UsageError(f"expert folder {folder} is gone; re-add it or fix {self.path}.")
            return folder
        try:  # pinned to a commit: the cache is as good as the network
            return fetch_snapshot(
                source, revision=commit, allow_patterns=patterns, local_files_only=True, **hub
            )[0]
        except UsageError:
            return fetch_snapshot(source, revision=commit, allow_patterns=patterns, **hub)[0]

    def _build(self, entry: ExpertEntry, folder: Path, den_folder: Path | None, device) -> Expert:
        hashes = {k: v for k, v in entry.sha256.items() if k != CONFIG_NAME}
        if den_folder is None:
            return load_folder(folder, sigma=entry.sigma, device=device, file_hashes=hashes)
        else:
            config = read_config(folder)
            classifier = load_classifier(folder, config, device)
            unet, scheduler = load_denoiser(den_folder, device)
            expert = Expert.from_parts(
                config,
                classifier,
                unet,
                scheduler,
                sigma=entry.sigma,
                source=entry.denoiser_source,
                resize_mode=entry.resize_mode or LEGACY_RESIZE,
            )
            expert.adopt_file_hashes(hashes)
            return expert.to(device).eval()


def denoiser_files(folder: Path, hub_repo=None, revision=None, endpoint=None) -> list[str]:
    """The diffusers files a denoised expert loads from a denoiser folder (relative paths)."""
    paths = check_denoiser_folder(folder, hub_repo, revision, endpoint)
    return [p.relative_to(folder).as_posix() for p in paths]


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each file; a missing weight file is refused (pickles named if that is all)."""
    for name in names:
        if not (folder / name).is_file():
            refuse_pickles(folder, name)
    return {name: sha256_file(folder / name) for name in names}


def verify(entry: ExpertEntry, folder: Path, den_folder: Path | None) -> None:
    """Refuse any recorded file that is missing or whose sha256 changed."""
    if not entry.sha256:
        raise UsageError(f"expert {entry.name!r} has no recorded sha256; re-add it.")
    for rel, want in entry.sha256.items():
        if rel.startswith(DENOISER_PREFIX) and den_folder is not None:
            path = den_folder / rel[len(DENOISER_PREFIX) :]
        else:
            path = folder / rel
        if not path.is_file():
            raise UsageError(f"expert {entry.name!r}: {rel} is missing from {entry.source}.")
        got = sha256_file(path)
        if got != want:
            raise UsageError(
                f"expert {entry.name!r}: {rel} does not match the sha256 recorded when it was "
                f"added ({want[:12]}…, now {got[:12]}…); re-add it if the change is intended."
            )


def default_name(source: str) -> str:
    stem = Path(source.rstrip("/")).name or "expert"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "expert"
    return stem if stem[0].isalnum() else f"x{stem}"


def _looks_like_path(source: str) -> bool:
    """Hub ids are "org/name"; anything else that is not a folder is a mistyped path."""
    return (
        source.startswith((".", "/", "~"))
        or source.count("/") != 1
        or os.sep != "/"
        and os.sep in source
    )


def _str(value) -> str | None:
    return None if value is None else str(value)
