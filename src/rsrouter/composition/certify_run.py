"""A resumable dual-certification run over a dataset split, with its baselines.

Counts are computed once per model and cached as flushed JSONL, one line per input:
``<artifacts>/certify/experts/<key>.jsonl`` for every expert (key = expert, dataset, n0, n,
seed) and ``<artifacts>/certify/router/<key>.jsonl`` for the router. Everything else, the dual
certificate, each expert alone, the Multiscale cascade and the oracle, is decided from those
counts, so a second run with cached experts costs only the router's pass. The run writes one
record per input to ``<artifacts>/certify/<run key>.jsonl`` (+ ``<run key>.json``, the run's
settings) and resumes from what is there. Noise is seeded by input index, so a resumed or
sharded run (torchrun: rank r takes ``shard_indices`` and writes ``*.rank-r.jsonl``; rank 0
merges) gives the same records as one uninterrupted process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from rsrouter import distributed
from rsrouter.composition.baselines import MULTISCALE_LABEL, ORACLE_LABEL, multiscale, oracle
from rsrouter.composition.dual import (
    NO_CASCADE,
    DualCertificate,
    DualSmoothed,
    decide,
    experts_needed,
    split_alpha,
)
from rsrouter.composition.rules import CASCADE, RULES, check_biases, check_rule, headline_rule
from rsrouter.errors import UsageError
from rsrouter.io import append_jsonl, read_json, read_jsonl, sha256_json, write_json, write_text
from rsrouter.progress import note, progress_bar
from rsrouter.smoothing import Certificate, check_count, check_seed, uses_bf16

FORMAT = "rsrouter.certify-run/1"


def counts_key(
    model_fingerprint: str,
    dataset_fingerprint: str,
    n0: int,
    n: int,
    seed: int,
    bf16: bool = False,
):
    """Cache key of one model's counts on one dataset (alpha-free: counts serve every alpha).

    bf16 autocast changes the base model, so its counts are kept apart from float32 ones.
    """
    key = {"bf16": True} if bf16 else {}  # float32 keys stay as they were
    return sha256_json(
        {
            **key,
            "model": model_fingerprint,
            "dataset": dataset_fingerprint,
            "n0": int(n0),
            "n": int(n),
            "seed": int(seed),
        }
    )


def expert_counts_path(root: Path, fingerprint: str, dataset, n0, n, seed, bf16) -> Path:
    """Where an expert's cached counts on ``dataset`` live under ``<artifacts>/certify``."""
    key = counts_key(fingerprint, dataset.fingerprint, n0, n, seed, bf16)
    return Path(root) / "experts" / f"{key}.jsonl"


def router_counts_path(root: Path, fingerprint: str, sigma_e, dataset, n0, n, seed, bf16) -> Path:
    """Where a router's cached counts (at ``sigma_e``) on ``dataset`` live."""
    key = counts_key(fingerprint, dataset.fingerprint, n0, n, seed, bf16)
    return Path(root) / "router" / f"{sha256_json({'key': key, 'sigma_e': sigma_e})}.jsonl"


def _fingerprint(model, what: str) -> str:
    fp = getattr(model, "fingerprint", None)
    if not isinstance(fp, str) or not fp:
        raise UsageError(f"the {what} has no .fingerprint, which the certificate cache needs.")
    return fp


# ---------------------------------------------------------------- sharded JSONL files


def _rank_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.stem}.rank-{rank}.jsonl")


def rank_shards(path: Path) -> list[Path]:
    """Every rank's shard of ``path`` that is there, in name order."""
    return sorted(path.parent.glob(f"{path.stem}.rank-*.jsonl"))


def _write_path(path: Path, ctx) -> Path:
    return path if ctx.world == 1 else _rank_path(path, ctx.rank)


def read_records(path: str | Path, ctx=None) -> dict[int, dict]:
    """Records by input index from ``path`` and rank shards beside it (first one wins).

    With a multi-process ``ctx`` only this rank's shard is read: the others may be mid-write.
    """
    path = Path(path)
    if ctx is not None and ctx.world > 1:
        shards = [_rank_path(path, ctx.rank)]
    else:
        shards = rank_shards(path)
    out: dict[int, dict] = {}
    for p in [path, *shards]:
        for record in read_jsonl(p):
            out.setdefault(int(record["index"]), record)
    return out


def merge_shards(path: Path) -> None:
    """Rewrite ``path`` sorted by index from itself and its rank shards, then drop the shards."""
    records = read_records(path)
    shards = rank_shards(path)
    lines = [json.dumps(records[i], sort_keys=True) + "\n" for i in sorted(records)]
    write_text(path, "".join(lines))
    for shard in shards:
        shard.unlink(missing_ok=True)


# ---------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunResult:
    path: Path  # the records (JSONL)
    meta_path: Path  # the run's settings (JSON)
    records: list[dict]  # the records of the first ``limit`` inputs, sorted by index
    computed: int  # inputs certified by this call (0 when everything was there)
    stored: int = 0  # records the run's file holds (more than ``records`` after a larger limit)


def _certs(counts: dict, sigma: float, alpha: float) -> Certificate:
    return Certificate.from_counts(counts["selection_counts"], counts["counts"], sigma, alpha)


def _pair(counts: dict) -> tuple[list[int], list[int]]:
    return counts["selection_counts"], counts["counts"]


def _forwards(counts: dict) -> int:
    """Model forward passes behind one input's counts (selection + estimation draws)."""
    return int(sum(counts["selection_counts"]) + sum(counts["counts"]))


def decided_rules(cascade, sample_router: bool = True) -> tuple[str, ...]:
    """The rules every record decides: those that read the router (when it is sampled), and
    the cascade when there is one (a spec)."""
    if not sample_router:
        return (CASCADE,)
    return (*RULES, CASCADE) if cascade is not None else RULES


def rule_records(
    label: int,
    router_counts: dict,
    expert_counts: Sequence[dict],
    *,
    sigma_e: float,
    sigmas: Sequence[float],
    alpha_router: float,
    alpha_expert: float,
    biases=None,
    cascade=None,
) -> dict[str, dict]:
    """Every composition rule decided from the same stored counts, with what each one costs
    (the experts it reads, their forward passes and seconds, the router's unless the rule is
    the cascade, which reads none). The cascade is decided when ``cascade`` (a spec) is given;
    with ``router_counts`` None (no router sampled) only the cascade is."""
    out = {}
    sampled = router_counts is not None
    router = _pair(router_counts) if sampled else None
    experts = [_pair(c) for c in expert_counts]
    for rule in decided_rules(cascade, sampled):
        cert = decide(
            rule, router, experts, sigma_e=sigma_e, sigmas=sigmas, alpha_router=alpha_router,
            alpha_expert=alpha_expert, biases=biases, cascade=cascade,
        )  # fmt: skip
        read = experts_needed(rule, router, len(sigmas), alpha_router, biases)
        reads_router = rule != CASCADE  # every other rule reads it, so it was sampled
        chosen = cert.expert_certificate
        out[rule] = {
            "prediction": cert.prediction,
            "radius": cert.radius,
            "correct": bool(cert.prediction == label),
            "expert": cert.expert,
            "radius_router": cert.radius_router if np.isfinite(cert.radius_router) else None,
            "expert_abstained": bool(cert.expert >= 0 and chosen is not None and chosen.abstained),
            "experts_read": read,
            "forwards": (_forwards(router_counts) if reads_router else 0)
            + sum(_forwards(expert_counts[i]) for i in read),
            "seconds": float(
                (router_counts["seconds"] if reads_router else 0.0)
                + sum(expert_counts[i]["seconds"] for i in read)
            ),
        }
    return out


def _paper_fields(label, router_counts, expert_counts, full, *, sigma_e, a_router, a_expert):
    """The paper's certificate (the "min" rule) as a record's top-level fields."""
    router = _certs(router_counts, sigma_e, a_router)
    chosen = full[router.prediction].with_alpha(a_expert) if not router.abstained else None
    dual = DualCertificate.compose(router, chosen)
    seconds = router_counts["seconds"]
    if not router.abstained:
        seconds += expert_counts[router.prediction]["seconds"]
    return {
        "router": {
            "selection_counts": list(router.selection_counts),
            "counts": list(router.counts),
            "prediction": router.prediction,
            "radius": router.radius,
        },
        "expert": dual.expert,
        "expert_counts": None
        if chosen is None
        else {
            "selection_counts": list(chosen.selection_counts),
            "counts": list(chosen.counts),
            "prediction": chosen.prediction,
            "radius": chosen.radius,
        },
        "R_sigma": dual.radius_router,
        "R_c": dual.radius_expert,
        "radius": dual.radius,
        "prediction": dual.prediction,
        "correct": bool(dual.prediction == label),
        "seconds": float(seconds),
    }


def make_record(
    index: int,
    label: int,
    router_counts: dict | None,
    expert_counts: Sequence[dict],
    *,
    sigma_e: float,
    sigmas: Sequence[float],
    alpha: float,
    alpha_router: float,
    p_skip: float,
    biases=None,
    cascade=None,
) -> dict:
    """One input's record, decided from stored counts (pure: no model is run).

    The top-level fields are the paper's certificate (the "min" rule); ``rules`` holds every
    rule's outcome from the same counts. With ``router_counts`` None (a run that sampled no
    router) the record holds the cascade alone: ``router`` is None and the paper's fields are
    left out.
    """
    a_router, a_expert = split_alpha(alpha, alpha_router)
    full = [_certs(c, s, alpha) for c, s in zip(expert_counts, sigmas, strict=True)]
    ms = multiscale(full, alpha, p_skip=p_skip)
    best, best_radius = oracle(full, label)
    paper = {"router": None}  # no router sampled: the cascade alone
    if router_counts is not None:
        paper = _paper_fields(label, router_counts, expert_counts, full, sigma_e=sigma_e,
                              a_router=a_router, a_expert=a_expert)  # fmt: skip
    return {
        "index": int(index),
        "label": int(label),
        **paper,
        "baselines": {
            "experts": [
                {
                    "prediction": c.prediction,
                    "radius": c.radius,
                    "correct": bool(c.prediction == label),
                    "forwards": _forwards(e),
                    "seconds": float(e["seconds"]),
                }
                for c, e in zip(full, expert_counts, strict=True)
            ],
            "multiscale": {
                "prediction": ms.prediction,
                "radius": ms.radius,
                "correct": bool(ms.prediction == label),
                "stage": ms.stage,
                "evaluated": list(ms.evaluated),
                "forwards": sum(_forwards(expert_counts[i]) for i in ms.evaluated),
                "seconds": float(sum(expert_counts[i]["seconds"] for i in ms.evaluated)),
            },
            "oracle": {"expert": best, "radius": best_radius, "correct": best >= 0},
        },
        "rules": rule_records(
            label,
            router_counts,
            expert_counts,
            sigma_e=sigma_e,
            sigmas=sigmas,
            alpha_router=a_router,
            alpha_expert=a_expert,
            biases=biases,
            cascade=cascade,
        ),  # fmt: skip
    }


class CountsCache:
    """One model's counts by input index, loaded once; missing ones are sampled and appended."""

    def __init__(self, path: Path, ctx):
        self.path, self.ctx, self.have = path, ctx, read_records(path, ctx)
        self.appended = False  # whether this run wrote to it (else it need not be merged)

    def fill(self, model_counts, xs, indices: Sequence[int], **kw) -> dict[int, dict]:
        todo = [i for i in indices if i not in self.have]
        if todo:
            start = time.perf_counter()
            sel, est = model_counts(xs[todo], indices=todo, **kw)
            per_input = (time.perf_counter() - start) / len(todo)
            new = [
                {
                    "index": i,
                    "selection_counts": [int(v) for v in s],
                    "counts": [int(v) for v in e],
                    "seconds": per_input,
                }
                for i, s, e in zip(todo, sel, est, strict=True)
            ]
            append_jsonl(_write_path(self.path, self.ctx), new)
            self.appended = True
            self.have.update({r["index"]: r for r in new})
        return self.have


@dataclass(frozen=True)
class RunPlan:
    """What `certify_run` is about to compute, and an estimate of how long it takes."""

    split: str
    inputs: int  # inputs of the run (this process's share)
    todo: int  # of them, not certified yet
    n0: int
    n: int
    alpha: float
    sample: dict[str, int]  # model ("router" or an expert's name) -> inputs whose counts it needs
    samples: int  # noisy forward passes
    seconds: float  # from a short calibration of each model that samples (0 when none does)


def _run_plan(dual, dataset, names, caches, router_cache, mine, todo, *, n0, n, alpha, **kw):
    from rsrouter.runtime import seconds_per_sample

    models = [*zip(names, dual.experts, dual.sigmas, caches, strict=True)]
    if router_cache is not None:  # None: the router is not sampled
        models.append(("router", dual.router, dual.sigma_e, router_cache))
    sample, seconds = {}, 0.0
    for name, model, sigma, cache in models:
        need = sum(1 for i in todo if i not in cache.have)
        sample[name] = need
        if need:
            calibration = {k: kw[k] for k in ("bf16", "channels_last") if k in kw}
            per = seconds_per_sample(
                model, dataset.images[todo[0]], sigma, batch_size=kw.get("batch_size", 1000),
                device=kw.get("device"), **calibration,
            )  # fmt: skip
            seconds += per * need * (n0 + n)
    return RunPlan(
        split=str(getattr(dataset, "split", "")),
        inputs=len(mine),
        todo=len(todo),
        n0=n0,
        n=n,
        alpha=alpha,
        sample=sample,
        samples=sum(sample.values()) * (n0 + n),
        seconds=seconds,
    )


def certify_run(
    dual: DualSmoothed,
    dataset,
    artifacts: str | Path,
    *,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    alpha_router: float | None = None,
    seed: int = 0,
    limit: int | None = None,
    p_skip: float = 0.5,
    rule: str | None = None,
    expert_names: Sequence[str] | None = None,
    chunk: int = 32,
    progress: bool = True,
    on_plan: Callable[[RunPlan], None] | None = None,
    sample_router: bool = True,
    **sampling,
) -> RunResult:
    """Certify ``dataset`` (the first ``limit`` inputs) with dual RS and every baseline.

    Every composition rule is decided from the same counts; ``rule`` (default: ``dual.rule``)
    is the report's headline "dual" row. ``sample_router`` False certifies the cascade alone
    (its rule only): the router, which it does not read, is not sampled, so the other rules are
    left out of the run. ``sampling`` goes to
    ``rsrouter.smoothing.sample_counts`` (batch_size, device, bf16, ...). ``on_plan`` is shown
    the RunPlan (with a time estimate from a short calibration) before any input is certified.
    """
    rule = check_rule(dual.rule if rule is None else rule)
    if rule == CASCADE and dual.cascade is None:
        raise UsageError(NO_CASCADE)
    if not sample_router and rule != CASCADE:
        raise UsageError(
            f"without the router only the cascade can be certified, not the {rule} rule: "
            "use the cascade rule or sample the router."
        )
    n0, n, chunk = check_count("n0", n0), check_count("n", n), check_count("chunk", chunk)
    a_router, a_expert = split_alpha(alpha, alpha_router)
    check_seed(seed, allow_none=False)  # records resume by input index: noise is seeded
    if "batch_size" in sampling:  # checked here too: a run whose counts are cached never samples
        check_count("batch_size", sampling["batch_size"])
    if not 0.5 <= p_skip < 1:
        raise UsageError(f"p_skip must lie in [0.5, 1), got {p_skip!r}.")
    names = list(expert_names or [f"expert-{i}" for i in range(len(dual.experts))])
    if len(names) != len(dual.experts):
        raise UsageError(f"{len(names)} expert names for {len(dual.experts)} experts.")
    total = len(dataset.labels)
    size = total if limit is None else min(check_count("limit", limit), total)
    device = sampling.get("device")
    bf16 = uses_bf16(device, sampling.get("bf16"))  # the core's default: bf16 on CUDA
    router_fp = _fingerprint(dual.router, "router")
    expert_fps = [
        _fingerprint(e, f"expert {name!r}") for e, name in zip(dual.experts, names, strict=True)
    ]
    root = Path(artifacts) / "certify"
    expert_paths = [expert_counts_path(root, fp, dataset, n0, n, seed, bf16) for fp in expert_fps]
    router_path = router_counts_path(root, router_fp, dual.sigma_e, dataset, n0, n, seed, bf16)
    settings = {
        "format": FORMAT,
        "router": router_fp,
        "sigma_e": dual.sigma_e,
        "experts": names,
        "sigmas": dual.sigmas,
        "expert_fingerprints": expert_fps,
        "dataset": {
            "name": dataset.name,
            "split": dataset.split,
            "fingerprint": dataset.fingerprint,
        },
        "n0": n0,
        "n": n,
        "alpha": alpha,
        "alpha_router": a_router,
        "alpha_expert": a_expert,
        "seed": int(seed),
        "p_skip": float(p_skip),
        "rule": rule,
        "rules": list(decided_rules(dual.cascade, sample_router)),
        "biases": [float(b) for b in dual.biases],
        **({"cascade": dual.cascade.to_dict()} if dual.cascade is not None else {}),
        **({"bf16": True} if bf16 else {}),
    }
    run_key = sha256_json(settings)
    path, meta_path = root / f"{run_key}.jsonl", root / f"{run_key}.json"
    ctx = distributed.context()
    if ctx.is_main:
        meta = {
            **settings,
            "run": run_key,
            "class_names": list(dataset.class_names),
            "labels": {"multiscale": MULTISCALE_LABEL, "oracle": ORACLE_LABEL},
        }
        if _read_meta(meta_path) != meta:  # a cached run only reads
            write_json(meta_path, meta)
    mine = distributed.shard_indices(range(size), ctx)
    done = read_records(path, ctx)
    todo = [i for i in mine if i not in done]
    if len(todo) < len(mine):
        note(f"resuming: {len(mine) - len(todo)} of {len(mine)} records are in {path}",
             enabled=progress)  # fmt: skip
    kw = {"n0": n0, "n": n, "seed": seed, **sampling}
    expert_caches = [CountsCache(p, ctx) for p in expert_paths]
    router_cache = CountsCache(router_path, ctx) if sample_router else None
    if on_plan is not None:
        on_plan(
            _run_plan(dual, dataset, names, expert_caches, router_cache, mine, todo,
                      n0=n0, n=n, alpha=alpha, **sampling)
        )  # fmt: skip
    computed = 0
    with progress_bar("dual certify", len(todo), enabled=progress and bool(todo)) as advance:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            experts = [
                cache.fill(partial(dual.expert_counts, j), dataset.images, part, **kw)
                for j, cache in enumerate(expert_caches)
            ]
            router = (
                router_cache.fill(dual.router_counts, dataset.images, part, **kw)
                if router_cache is not None
                else dict.fromkeys(part)
            )
            records = [
                make_record(
                    i,
                    int(dataset.labels[i]),
                    router[i],
                    [e[i] for e in experts],
                    sigma_e=dual.sigma_e,
                    sigmas=dual.sigmas,
                    alpha=alpha,
                    alpha_router=a_router,
                    p_skip=p_skip,
                    biases=dual.biases,
                    cascade=dual.cascade,
                )
                for i in part
            ]
            append_jsonl(_write_path(path, ctx), records)
            computed += len(part)
            advance(len(part))
    ctx.barrier()
    if ctx.is_main:
        caches = [*expert_caches, *([router_cache] if router_cache is not None else [])]
        written = [c.path for c in caches if c.appended]
        written += [path] if computed else []
        for p in (*(c.path for c in caches), path):
            if p in written or rank_shards(p):  # a fully cached run writes nothing
                merge_shards(p)
    ctx.barrier()
    records = read_records(path)
    # a run grows with its limit (the limit is not in its key): a smaller limit later reads only
    # its own first inputs, never the larger run's rest
    rows = [records[i] for i in sorted(records) if i < size]
    return RunResult(path=path, meta_path=meta_path, records=rows, computed=computed,
                     stored=len(records))  # fmt: skip


def _read_meta(path: Path) -> dict | None:
    """A run's settings as written, or None when absent or unreadable (then rewritten)."""
    try:
        return read_json(path) if path.is_file() else None
    except UsageError:
        return None


def load_run(path: str | Path) -> tuple[dict, list[dict]]:
    """(settings, records sorted by index) of a run's JSONL file (settings from its .json)."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist.")
    meta = read_json(path.with_suffix(".json"))
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path} is not the records of a `router certify` run.")
    records = read_records(path)
    return meta, [records[i] for i in sorted(records)]


def latest_run(artifacts: str | Path) -> Path:
    """The most recently written run under ``<artifacts>/certify/``."""
    runs = [
        p
        for p in (Path(artifacts) / "certify").glob("*.jsonl")
        if ".rank-" not in p.name and p.with_suffix(".json").exists()
    ]
    if not runs:
        raise UsageError(
            f"no certification run under {Path(artifacts) / 'certify'}; run `router certify` first."
        )
    return max(runs, key=lambda p: p.stat().st_mtime)


def runs_of_router(artifacts: str | Path, router_fingerprint: str) -> list[Path]:
    """The runs under ``<artifacts>/certify/`` that certified the router with this fingerprint
    (recorded in each run's settings), newest first: what a published card may show."""
    runs = []
    for path in (Path(artifacts) / "certify").glob("*.jsonl"):
        meta_path = path.with_suffix(".json")
        if ".rank-" in path.name or not meta_path.exists():
            continue
        meta = read_json(meta_path)
        if meta.get("format") == FORMAT and meta.get("router") == router_fingerprint:
            runs.append(path)
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)


# ---------------------------------------------------------------- workspace level

CERTIFY_DEFAULTS = {
    "split": "test",
    "n0": 100,
    "n": 10_000,
    "alpha": 0.001,
    "alpha_router": None,  # alpha / 2
    "seed": 0,
    "p_skip": 0.5,
    # the headline rule of a workspace's runs (every run decides every rule). None: the cascade
    # when the router carries one (a gate router fitted on val), else agreement, the best
    # measured (docs/results/routing.md); DualSmoothed's own default stays the paper's min
    "rule": None,
    "batch_size": 1000,
    "limit": None,
    "chunk": 32,
    # false: certify the cascade alone, without sampling the router it does not read (the
    # other rules' rows are then left out)
    "sample_router": True,
}


def certify_settings(ws, **overrides) -> dict:
    """[certify] of the workspace over the defaults, then the overrides that are not None."""
    return ws.settings_over("certify", CERTIFY_DEFAULTS, overrides)


RUN_OPTIONS = (
    "n0", "n", "alpha", "alpha_router", "seed", "limit", "p_skip", "rule", "chunk", "batch_size",
    "sample_router",
)  # fmt: skip


def run_options(settings: dict) -> dict:
    """certify_run's keyword arguments from certify_settings (every setting but the split)."""
    return {k: settings[k] for k in RUN_OPTIONS}


def workspace_dual(ws, *, device=None, rule: str | None = None) -> tuple[DualSmoothed, list[str]]:
    """The workspace's trained router over its experts (refused if they changed since), with
    the router's biases ("biases") and cascade ("cascade") from its config.json when it has
    them; ``rule`` None: ``headline_rule``."""
    from rsrouter.router.model import RouterModel
    from rsrouter.router.tables import check_classes

    folder = Path(ws.artifacts) / "router"
    if not (folder / "config.json").is_file():
        raise UsageError(f"no trained router in {folder}; run `router train` first.")
    experts = ws.load_experts(device=device or "cpu")
    check_classes(experts)
    names = list(experts)
    router = RouterModel.from_pretrained(folder, device=device or "cpu")
    router.check_experts(names, [e.fingerprint for e in experts.values()])
    biases = router.info.get("biases")
    try:
        biases = check_biases(biases, len(names))
    except UsageError as exc:
        raise UsageError(
            f'{folder / "config.json"}: "biases" must hold one finite number per expert '
            f"({len(names)}), got {biases!r}."
        ) from exc
    cascade = router.info.get("cascade")
    rule = headline_rule(rule, router.info)
    if rule == CASCADE and cascade is None:
        raise UsageError(f"{folder}: {NO_CASCADE}")
    dual = DualSmoothed(router, router.sigma_e, list(experts.values()), rule=rule, biases=biases,
                        cascade=cascade)  # fmt: skip
    return dual, names


def certify_workspace(
    ws, *, device=None, progress: bool = True, on_plan=None, **overrides
) -> RunResult:
    """`router certify`: the workspace's router and experts on its dataset split (``on_plan``:
    see certify_run)."""
    from rsrouter.router.tables import check_classes, workspace_dataset

    s = certify_settings(ws, **overrides)
    ctx = distributed.context()
    device = ctx.device(device)
    dual, names = workspace_dual(ws, device=device, rule=s["rule"])
    dataset = workspace_dataset(ws, s["split"])
    check_classes(dict(zip(names, dual.experts, strict=True)), dataset)
    return certify_run(
        dual,
        dataset,
        ws.artifacts,
        expert_names=names,
        progress=progress and ctx.is_main,
        device=device,
        on_plan=on_plan if ctx.is_main else None,
        **{**run_options(s), "rule": dual.rule},
    )
