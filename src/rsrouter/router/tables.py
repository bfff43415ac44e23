"""Radius tables: each expert's counts and certified radius of the true label on every input.

One column per expert, cached in ``<artifacts>/tables/<key>.safetensors`` where the key hashes
(expert fingerprint, dataset fingerprint, n, alpha, seed, subset): registering a new expert
computes only its column. A column is built in shards of inputs, each written atomically to
``<key>.partial/shard-NNNNN.safetensors``; a killed run resumes from the shards that are there,
and since the noise of input i is seeded by (seed, i), the merged column is the same however
the work was split (batch size, shards, ranks). The tables draw their noise in their own stage
(TABLE_STAGE): the router is trained on them, so they must not reuse the draws with which an
expert later certifies an input of the same index (stages 0 and 1).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from rsrouter.errors import UsageError
from rsrouter.io import reading, safetensors_readable, sha256_json, write_safetensors
from rsrouter.progress import note, progress_bar
from rsrouter.smoothing import (
    certified_radius,
    check_alpha,
    check_count,
    check_seed,
    sample_counts,
)

FORMAT = "rsrouter.radius-column/1"
TABLE_STAGE = 4  # noise stage of the tables (certification uses 0-3, finetuning's votes 8)


def check_subset(subset: float) -> float:
    if not isinstance(subset, (int, float)) or not 0 < subset <= 1:
        raise UsageError(f"subset must be a fraction in (0, 1], got {subset!r}.")
    return float(subset)


def subset_indices(size: int, subset: float, seed: int) -> np.ndarray:
    """Sorted dataset indices of a deterministic fraction of ``size`` inputs (all when 1)."""
    subset = check_subset(subset)
    if subset == 1:
        return np.arange(size, dtype=np.int64)
    keep = max(1, math.ceil(subset * size))
    chosen = np.random.default_rng([int(seed), 0x5AB5E7]).permutation(size)[:keep]
    return np.sort(chosen).astype(np.int64)


def column_key(expert_fp: str, dataset_fp: str, n: int, alpha: float, seed: int, subset: float):
    """The cache key of one expert's column."""
    return sha256_json(
        {
            "expert": expert_fp,
            "dataset": dataset_fp,
            "n": int(n),
            "alpha": float(alpha),
            "seed": int(seed),
            "subset": float(subset),
            "stage": TABLE_STAGE,  # columns drawn in the certification stage are not reused
        }
    )


@dataclass(frozen=True)
class Column:
    """One expert's part of the table (rows in the order of ``indices``)."""

    counts: torch.Tensor  # (N, K) int64
    radius: torch.Tensor  # (N,) float64
    indices: torch.Tensor  # (N,) int64 dataset indices
    metadata: dict


@dataclass(frozen=True)
class RadiusTable:
    """Radii (N, E) of E experts on N inputs; column e is expert ``names[e]``."""

    radii: torch.Tensor  # (N, E) float64
    names: tuple[str, ...]
    sigmas: tuple[float, ...]
    fingerprints: tuple[str, ...]
    labels: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) int64 dataset indices
    n: int
    alpha: float
    seed: int
    subset: float
    dataset_fingerprint: str

    @property
    def best(self) -> torch.Tensor:
        """Index of the expert with the largest radius per input (the first on ties)."""
        return self.radii.argmax(dim=1)

    @property
    def certified(self) -> torch.Tensor:
        """Rows that some expert certifies (R > 0): the rows the router trains on."""
        return (self.radii > 0).any(dim=1)

    def summary(self) -> list[dict]:
        """Per expert: certified accuracy at r=0, mean radius, and how often it is the best."""
        keep = self.certified
        best = self.best[keep]
        rows = []
        for e, name in enumerate(self.names):
            r = self.radii[:, e]
            rows.append(
                {
                    "expert": name,
                    "sigma": self.sigmas[e],
                    "certified": float((r > 0).double().mean()),
                    "mean_radius": float(r.mean()),
                    "best_share": float((best == e).double().mean()) if len(best) else 0.0,
                }
            )
        return rows


def _labels_of(dataset, indices: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(dataset.labels))[torch.as_tensor(indices)].long()


def _check_expert(name: str, expert, dataset) -> None:
    for attr in ("sigma", "num_classes", "fingerprint"):
        if not hasattr(expert, attr):
            raise UsageError(f"expert {name!r} has no {attr!r}: it is not an rsrouter Expert.")
    shape = getattr(expert, "input_shape", None)
    if shape is not None and tuple(dataset.images.shape[1:]) != tuple(shape):
        raise UsageError(
            f"expert {name!r} takes inputs of shape {tuple(shape)}, but dataset "
            f"{getattr(dataset, 'name', '?')!r} has {tuple(dataset.images.shape[1:])}."
        )


def _declared_classes(model) -> list[str]:
    """The class names a model declares in its config (none: only its class count is known)."""
    return [str(c) for c in (getattr(getattr(model, "config", None), "class_names", None) or [])]


def check_classes(experts: Mapping, dataset=None) -> None:
    """Every expert classifies the same classes, by count and by name (where declared), and so
    does the dataset: a label must mean the same class to every model, or the radii are wrong."""
    models = [(f"expert {name!r}", int(e.num_classes), _declared_classes(e)) for name, e in
              experts.items()]  # fmt: skip
    if getattr(dataset, "class_names", None) is not None:
        classes = [str(c) for c in dataset.class_names]
        models.insert(0, (f"dataset {getattr(dataset, 'name', '?')!r}", len(classes), classes))
    if not models:
        return
    first, count, _ = models[0]
    named = next(((what, names) for what, _, names in models if names), None)
    for what, k, _names in models[1:]:
        if k != count:
            fix = (
                "register experts trained on the dataset's classes, or set [data] dataset in "
                "router.toml"
                if dataset is not None
                else "all experts must share one set"
            )
            raise UsageError(f"{what} has {k} classes but {first} has {count}: {fix}.")
    for what, _, names in models:
        if names and names != named[1]:
            order = "another order of" if sorted(names) == sorted(named[1]) else "other"
            raise UsageError(
                f"{what} names {order} classes than {named[0]} ({', '.join(names[:3])}, … vs "
                f"{', '.join(named[1][:3])}, …): re-export it with --class-names in that order."
            )


def _shards(size: int, shard_size: int) -> list[tuple[int, tuple[int, int]]]:
    """(shard number, (start, end) positions) of every shard of ``size`` inputs."""
    return [
        (s, (start, min(start + shard_size, size)))
        for s, start in enumerate(range(0, size, shard_size))
    ]


def _shard_path(partial: Path, shard: int) -> Path:
    return partial / f"shard-{shard:05d}.safetensors"


def _compute_shard(
    expert, images, positions, indices, *, n, seed, batch_size, device, advance, channels_last
):
    rows = indices[positions[0] : positions[1]]
    xs = images[torch.as_tensor(rows)]
    counts = sample_counts(
        expert,
        xs,
        expert.sigma,
        n,
        seed=seed,
        indices=[int(i) for i in rows],
        stage=TABLE_STAGE,
        batch_size=batch_size,
        device=device,
        num_classes=int(expert.num_classes),
        progress=advance,
        channels_last=channels_last,
    )
    if counts.shape[1] > expert.num_classes:
        raise UsageError(
            f"the expert returned class ids up to {counts.shape[1] - 1}, "
            f"but declares {expert.num_classes} classes."
        )
    return counts


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Same tensors and metadata, same file bytes (a sorted header)."""
    meta = {"format": FORMAT, "meta": json.dumps(metadata, sort_keys=True)}
    write_safetensors(path, tensors, meta)


def read_column(path: str | Path) -> Column:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"radius table column {path} does not exist.")
    fix = "delete it and run `router tables` to recompute it"
    with reading(path, fix), safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise UsageError(f"{path} is not an rsrouter radius table column.")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    return Column(
        counts=tensors["counts"],
        radius=tensors["radius"],
        indices=tensors["indices"],
        metadata=json.loads(meta["meta"]),
    )


def build_column(
    expert,
    dataset,
    path: Path,
    metadata: dict,
    indices: np.ndarray,
    *,
    n: int,
    alpha: float,
    seed: int,
    shard_size: int,
    batch_size: int,
    device,
    advance: Callable[[int], None],
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    channels_last: bool = False,
) -> bool:
    """Compute this rank's missing shards, then (rank 0) fill any gap and merge. True if merged."""
    partial = path.with_name(path.stem + ".partial")
    shards = _shards(len(indices), shard_size)
    images = torch.as_tensor(np.asarray(dataset.images))

    def run(shard, positions):
        target = _shard_path(partial, shard)
        if _shard_counts(target, positions) is not None:
            return
        counts = _compute_shard(
            expert,
            images,
            positions,
            indices,
            n=n,
            seed=seed,
            batch_size=batch_size,
            device=device,
            advance=advance,
            channels_last=channels_last,
        )
        _write(target, {"counts": counts}, {"shard": shard, "positions": list(positions)})

    for shard, positions in shards:
        if shard % world == rank:
            run(shard, positions)
    if barrier is not None:
        barrier()
    if rank != 0:
        return False
    for shard, positions in shards:  # a rank that died leaves gaps: fill them here
        run(shard, positions)
    width = int(expert.num_classes)
    parts = []
    for shard, positions in shards:
        counts = _shard_counts(_shard_path(partial, shard), positions)
        parts.append(torch.nn.functional.pad(counts, (0, width - counts.shape[1])))
    counts = torch.cat(parts)
    idx = torch.as_tensor(indices, dtype=torch.long)
    hits = counts.gather(1, _labels_of(dataset, indices).unsqueeze(1)).squeeze(1)
    radius = torch.as_tensor(
        np.asarray(certified_radius(hits.numpy(), n, expert.sigma, alpha), dtype=np.float64)
    ).reshape(-1)
    _write(path, {"counts": counts, "radius": radius, "indices": idx}, metadata)
    shutil.rmtree(partial, ignore_errors=True)
    return True


def _shard_counts(path: Path, positions) -> torch.Tensor | None:
    """A shard's counts if it exists and covers ``positions`` (another shard size: None)."""
    if not safetensors_readable(path):  # absent, or cut short by a kill or a full disk
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
        if meta.get("positions") != list(positions):
            return None
        return fh.get_tensor("counts")


def _columns(experts: Mapping, dataset, artifacts, n, alpha, seed, subset):
    check_classes(experts, dataset)
    out = []
    for name, expert in experts.items():
        _check_expert(name, expert, dataset)
        key = column_key(expert.fingerprint, dataset.fingerprint, n, alpha, seed, subset)
        meta = {
            "expert": name,
            "sigma": float(expert.sigma),
            "fingerprint": expert.fingerprint,
            "num_classes": int(expert.num_classes),
            "n": int(n),
            "alpha": float(alpha),
            "seed": int(seed),
            "subset": float(subset),
            "dataset": getattr(dataset, "name", ""),
            "dataset_fingerprint": dataset.fingerprint,
        }
        out.append((name, expert, Path(artifacts) / "tables" / f"{key}.safetensors", meta))
    return out


def _validate(experts, n, alpha, seed, subset):
    if not experts:
        raise UsageError("no experts are registered: add one with `router add-expert` first.")
    _check_settings(n, alpha, seed, subset)


def _check_settings(n, alpha, seed, subset):
    check_count("n", n)
    check_alpha(alpha)
    check_subset(subset)
    check_seed(seed, allow_none=False)


def build_tables(
    experts: Mapping,
    dataset,
    artifacts: str | Path,
    *,
    n: int = 100,
    alpha: float = 0.001,
    seed: int = 0,
    subset: float = 1.0,
    shard_size: int = 256,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    channels_last: bool = False,
    on_plan: Callable[[TablePlan], None] | None = None,
) -> RadiusTable | None:
    """Build the missing columns for ``experts`` (name -> Expert, router output order).

    With ``world`` > 1 each rank computes the shards ``s % world == rank``; after ``barrier``
    rank 0 merges. Returns the table on every rank whose merged columns are readable
    (all ranks after the final barrier), else None. ``on_plan`` is shown the TablePlan (with a
    time estimate from a short calibration) before any column is computed.
    """
    _validate(experts, n, alpha, seed, subset)
    check_count("shard_size", shard_size)
    device = torch.device(device) if device is not None else torch.device("cpu")
    indices = subset_indices(len(dataset.labels), subset, seed)
    columns = _columns(experts, dataset, artifacts, n, alpha, seed, subset)
    missing = [c for c in columns if not safetensors_readable(c[2])]  # a corrupt one is redone
    shards = _shards(len(indices), shard_size)
    mine = sum(end - start for s, (start, end) in shards if s % world == rank)
    if on_plan is not None:
        on_plan(
            _plan(columns, missing, dataset, indices, mine, n, alpha, subset,
                  batch_size=batch_size, device=device, channels_last=channels_last)
        )  # fmt: skip
    if missing:
        shards = [(s, span) for s, span in _shards(len(indices), shard_size) if s % world == rank]
        mine = sum(end - start for _, (start, end) in shards)
        done = 0
        for name, _, path, _ in missing:
            partial = path.with_name(path.stem + ".partial")
            have = sum(
                end - start
                for s, (start, end) in shards
                if _shard_counts(_shard_path(partial, s), (start, end)) is not None
            )
            if have:
                note(f"resuming {name}: {have} of {mine} records are in {partial}",
                     enabled=progress)  # fmt: skip
            done += have
        total = (mine * len(missing) - done) * n
        with progress_bar("radius tables", total, enabled=progress and total > 0) as advance:
            for _name, expert, path, meta in missing:
                was = expert.training
                expert.to(device).eval()
                try:
                    build_column(
                        expert,
                        dataset,
                        path,
                        meta,
                        indices,
                        n=n,
                        alpha=alpha,
                        seed=seed,
                        shard_size=shard_size,
                        batch_size=batch_size,
                        device=device,
                        advance=advance,
                        rank=rank,
                        world=world,
                        barrier=barrier,
                        channels_last=channels_last,
                    )
                finally:
                    expert.train(was)
        if barrier is not None:
            barrier()
    if not all(c[2].is_file() for c in columns):
        return None
    return _assemble(columns, dataset, indices, n, alpha, seed, subset)


def _cached_columns(experts, dataset, artifacts, n, alpha, seed, subset):
    """The columns for these settings, and the names of those not cached (or unreadable)."""
    _validate(experts, n, alpha, seed, subset)
    columns = _columns(experts, dataset, artifacts, n, alpha, seed, subset)
    return columns, [name for name, _, path, _ in columns if not safetensors_readable(path)]


def missing_columns(
    experts: Mapping, dataset, artifacts, *, n=100, alpha=0.001, seed=0, subset=1.0
):
    """Names of the experts whose column is not cached yet (or whose file is unreadable)."""
    return _cached_columns(experts, dataset, artifacts, n, alpha, seed, subset)[1]


def load_tables(
    experts: Mapping,
    dataset,
    artifacts: str | Path,
    *,
    n: int = 100,
    alpha: float = 0.001,
    seed: int = 0,
    subset: float = 1.0,
) -> RadiusTable:
    """The cached table for ``experts`` on ``dataset``; a missing column is a UsageError."""
    columns, absent = _cached_columns(experts, dataset, artifacts, n, alpha, seed, subset)
    if absent:
        raise UsageError(
            f"no radius table column for {', '.join(absent)} with these settings: "
            "run `router tables` first."
        )
    indices = subset_indices(len(dataset.labels), subset, seed)
    return _assemble(columns, dataset, indices, n, alpha, seed, subset)


def _assemble(columns, dataset, indices, n, alpha, seed, subset) -> RadiusTable:
    radii = []
    for name, expert, path, _ in columns:
        col = read_column(path)
        if not torch.equal(col.indices, torch.as_tensor(indices, dtype=torch.long)):
            raise UsageError(f"the cached column of {name!r} covers other inputs: delete {path}.")
        if col.metadata.get("fingerprint") != expert.fingerprint:
            raise UsageError(f"the cached column {path} belongs to another expert: delete it.")
        radii.append(col.radius.double())
    return RadiusTable(
        radii=torch.stack(radii, dim=1),
        names=tuple(c[0] for c in columns),
        sigmas=tuple(float(c[1].sigma) for c in columns),
        fingerprints=tuple(c[1].fingerprint for c in columns),
        labels=_labels_of(dataset, indices),
        indices=torch.as_tensor(indices, dtype=torch.long),
        n=int(n),
        alpha=float(alpha),
        seed=int(seed),
        subset=float(subset),
        dataset_fingerprint=dataset.fingerprint,
    )


@dataclass(frozen=True)
class TablePlan:
    """What `build_tables` is about to compute, and an estimate of how long it takes."""

    inputs: int  # rows of the table
    n: int
    alpha: float
    subset: float
    compute: tuple[str, ...]  # columns to compute (this process's shards)
    cached: tuple[str, ...]
    corrupt: dict[str, Path]  # of ``compute``: cached files found truncated or corrupt
    samples: int  # noisy forward passes
    seconds: float  # from a short calibration of each model (0 when nothing is computed)


def _plan(columns, missing, dataset, indices, mine, n, alpha, subset, **calibration):
    from rsrouter.runtime import seconds_per_sample

    x = torch.as_tensor(np.asarray(dataset.images[int(indices[0])])) if len(indices) else None
    seconds = 0.0
    for _name, expert, _path, _meta in missing:
        if mine:
            expert.to(calibration["device"])
            per = seconds_per_sample(
                expert, x, expert.sigma, num_classes=int(expert.num_classes), **calibration
            )
            seconds += per * mine * n
    return TablePlan(
        inputs=len(indices),
        n=int(n),
        alpha=float(alpha),
        subset=float(subset),
        compute=tuple(c[0] for c in missing),
        cached=tuple(c[0] for c in columns if c not in missing),
        corrupt={c[0]: c[2] for c in missing if c[2].exists()},
        samples=mine * n * len(missing),
        seconds=seconds,
    )


# ---------------------------------------------------------------- workspace level

TABLE_DEFAULTS = {
    "split": "train",
    "n": 100,
    "alpha": 0.001,
    "seed": 0,
    "subset": 1.0,
    "batch_size": 1000,
    "shard_size": 256,
}


def table_settings(ws, **overrides) -> dict:
    """[tables] of the workspace over the defaults, then the overrides that are not None;
    checked, so that a bad value is refused before `router tables` saves it."""
    s = ws.settings_over("tables", TABLE_DEFAULTS, overrides)
    _check_settings(s["n"], s["alpha"], s["seed"], s["subset"])
    check_count("batch_size", s["batch_size"])
    check_count("shard_size", s["shard_size"])
    return s


def workspace_dataset(ws, split: str):
    """The workspace's [data] dataset, one split: train, val or test. With ``[data] validation
    = K``, val is a fixed random K of the training images (``validation_seed``) and train the
    rest, so tables, routers and experts trained here never see what tuning is judged on."""
    from rsrouter.data import load_split

    data = ws.settings("data")
    return load_split(
        data.get("dataset", "fashion-mnist-subset"),
        split,
        root=data.get("root"),
        validation=data.get("validation", 0),
        validation_seed=data.get("validation_seed", 0),
    )


def workspace_tables(
    ws,
    *,
    experts: Mapping | None = None,
    dataset=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    ctx=None,
    on_plan: Callable[[TablePlan], None] | None = None,
    **overrides,
):
    """Build (or load) the workspace's table: returns (RadiusTable or None off rank 0, dataset).

    ``ctx`` is a ``rsrouter.distributed`` context; without one this is a single process.
    ``dataset`` is the [tables] split when the caller has loaded it already.
    """
    from rsrouter.runtime import resolve_device

    s = table_settings(ws, **overrides)
    dataset = dataset if dataset is not None else workspace_dataset(ws, s["split"])
    device = ctx.device(device) if ctx is not None else resolve_device(device)
    experts = experts if experts is not None else ws.load_experts(device=device)
    table = build_tables(
        experts,
        dataset,
        ws.artifacts,
        n=s["n"],
        alpha=s["alpha"],
        seed=s["seed"],
        subset=s["subset"],
        shard_size=s["shard_size"],
        batch_size=s["batch_size"],
        device=device,
        progress=progress and (ctx is None or ctx.is_main),
        rank=ctx.rank if ctx is not None else 0,
        world=ctx.world if ctx is not None else 1,
        barrier=ctx.barrier if ctx is not None else None,
        on_plan=on_plan,
    )
    return table, dataset
