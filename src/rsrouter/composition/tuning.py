"""Tuning on the validation split: every threshold or bias a router design needs is chosen here,
by the score the issue set for every method (the worst-case regret to the single-expert
envelope): for the gates and the experts' cascade its mean over bootstrap resamples of val
(``resampled_regret``), for the learned router's biases the val sample's own. Counts of the
``val`` split only; the test split is never read.

The score of a candidate is computed from counts exactly as a certify run would decide it
(``rules.decide_rows``: every val input at once, the same numbers as ``dual.decide``), so what
is fitted is what is later certified; the candidates tried and their scores are returned for
the record.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsrouter import distributed
from rsrouter.composition import cascade as cascades
from rsrouter.composition.certify_run import (
    CountsCache,
    counts_key,
    merge_shards,
    rank_shards,
    read_records,
)
from rsrouter.composition.dual import split_alpha
from rsrouter.composition.report import (
    acr,
    bootstrap_weights,
    envelope,
    radius_grid,
    regret,
    resampled_accuracy,
)
from rsrouter.composition.rules import CASCADE, check_rule, decide_rows
from rsrouter.errors import UsageError
from rsrouter.progress import note, progress_bar
from rsrouter.router import gate as gates
from rsrouter.smoothing import (
    ESTIMATION,
    ROUTER_ESTIMATION,
    ROUTER_SELECTION,
    SELECTION,
    certify_rows,
    check_count,
    sample_counts,
    uses_bf16,
)


@dataclass(frozen=True)
class ValidationCounts:
    """Counts of every expert on the first inputs of the val split, and their labels."""

    labels: np.ndarray  # (N,)
    selection: list[np.ndarray]  # per expert (N, K)
    estimation: list[np.ndarray]  # per expert (N, K)
    sigmas: list[float]


def expert_certificates(vc: ValidationCounts, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, radius), each (E, N), of every expert alone at ``alpha``."""
    pred, rad = zip(*(certify_rows(s, e, sigma, alpha)
                      for s, e, sigma in zip(vc.selection, vc.estimation, vc.sigmas, strict=True)),
                    strict=True)  # fmt: skip
    return np.stack(pred), np.stack(rad)


def envelope_of(vc: ValidationCounts, alpha: float, step: float = 0.25, *, certificates=None):
    """(grid, envelope): the best single expert at full alpha at each radius of the grid, from 0
    up to the largest radius any expert certifies (the report's regret grid). ``certificates``:
    ``expert_certificates(vc, alpha)`` where the caller has them already."""
    pred, rad = expert_certificates(vc, alpha) if certificates is None else certificates
    grid = radius_grid(float(rad.max()), step)
    return grid, envelope([(p == vc.labels, r) for p, r in zip(pred, rad, strict=True)], grid)


def decide_all(rule, router_sel, router_est, vc: ValidationCounts, *, sigma_e, alpha_router,
               alpha_expert, biases=None, memo: dict | None = None):  # fmt: skip
    """``rule`` (min, pairwise or agreement) decided for every val input from counts, exactly as
    a certify run decides it (``rules.decide_rows``, all inputs at once): (prediction, radius,
    routed expert or -1) arrays. ``memo`` (a dict kept across the candidates of a fit) holds
    each expert's certificates of the val inputs at each level: they never change."""
    memo = {} if memo is None else memo
    width = len(vc.sigmas)
    level = alpha_expert / width if check_rule(rule) == "agreement" else alpha_expert
    if level not in memo:
        memo[level] = expert_certificates(vc, level)
    sel, est = (np.atleast_2d(np.asarray(c, dtype=np.int64)) for c in (router_sel, router_est))
    sel, est = (np.pad(c, ((0, 0), (0, width - c.shape[1]))) for c in (sel, est))
    return decide_rows(rule, sel, est, *memo[level], sigma_e=sigma_e, alpha_router=alpha_router,
                       biases=biases)  # fmt: skip


def _candidate(pred, radius, routed, vc: ValidationCounts, grid, env) -> dict:
    correct = pred == vc.labels
    return {
        "regret": regret(correct, radius, grid, env),
        "acr": acr(correct, radius),
        "routed": [float(np.mean(routed == j)) for j in range(len(vc.sigmas))],
        "abstained": float(np.mean(routed < 0)),
    }


def _rank(t: dict) -> tuple:
    """Smaller is better: the val sample's regret (to 0.01 point), then the larger ACR (the
    biases; docs/results/routing.md, twelfth round: the resampled objective did not help them)."""
    return (round(t["regret"], 2), -t["acr"])


def _objective_rank(t: dict) -> tuple:
    """Smaller is better: the mean resampled val regret (to 0.01 point), then the larger ACR
    (the gates and the cascade)."""
    return (round(t["objective"], 2), -t["acr"])


# ---------------------------------------------------------------- counts of the val split

# Tuning draws its noise in stages of its own (10 + the certification stage: 10/11 for the
# experts, 12/13 for the router). Noise is seeded by (seed, stage, input index), and val input i
# and test input i share an index: with the certification stages the fitted thresholds would
# depend on the very draws that later certify test input i.
TUNING_STAGE = 10


VAL_CHUNK = 64  # val inputs sampled between two flushes of the counts cache


def tuning_counts(model, dataset, path: Path, *, sigma, width, size, n0, n, seed, stages,
                  advance=None, progress: bool = False,
                  **sampling) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(selection, estimation) counts (size, width) of ``model`` at ``sigma`` on the first
    ``size`` inputs, drawn in the tuning ``stages`` and cached (flushed JSONL) at ``path``,
    ``VAL_CHUNK`` inputs at a time: a killed fit resumes where its counts stopped (the noise is
    seeded by input index, so the counts are those of an uninterrupted run). Under torchrun
    each rank samples the missing inputs of its round-robin share, and every rank returns all
    of them. ``advance(k)`` is told of every k inputs done (cached ones first)."""

    def counts(xs, *, indices, n0, n, seed, **kw):
        common = {"num_classes": width, "indices": indices, "seed": seed, **kw}
        sel = sample_counts(model, xs, sigma, n0, stage=stages[0], **common)
        est = sample_counts(model, xs, sigma, n, stage=stages[1], **common)
        return (np.pad(c.numpy(), ((0, 0), (0, width - c.shape[1]))) for c in (sel, est))

    idx = list(range(size))
    ctx = distributed.context()
    cache = CountsCache(path, ctx)
    # a fixed share per rank, as certify_run's: whatever each rank finds on disk, every
    # missing input is some rank's to sample
    share = distributed.shard_indices(idx, ctx)
    mine = [i for i in share if i not in cache.have]
    if 0 < len(mine) < len(share):
        note(f"resuming: {len(share) - len(mine)} of {len(share)} val counts are in {path}",
             enabled=progress)  # fmt: skip
    advance = advance or (lambda k=1: None)
    advance(len(share) - len(mine))
    for start in range(0, len(mine), VAL_CHUNK):
        part = mine[start : start + VAL_CHUNK]
        cache.fill(counts, dataset.images, part, n0=n0, n=n, seed=seed, **sampling)
        advance(len(part))
    have = cache.have
    if ctx.world > 1:  # as certify_run ends: rank 0 merges the shares, then every rank reads
        ctx.barrier()  # every rank's share is on disk
        if ctx.is_main and rank_shards(path):
            merge_shards(path)
        ctx.barrier()
        have = read_records(path)
        advance(size - len(share))
    return (
        np.array([have[i]["selection_counts"] for i in idx]),
        np.array([have[i]["counts"] for i in idx]),
    )


def _tuning_path(artifacts, what: str, fingerprint: str, dataset, n0, n, seed, sampling) -> Path:
    bf16 = uses_bf16(sampling.get("device"), sampling.get("bf16"))  # as sample_counts runs
    key = counts_key(f"{fingerprint}:tuning", dataset.fingerprint, n0, n, seed, bf16)
    return Path(artifacts) / "tune" / what / f"{key}.jsonl"


def validation_counts(
    experts: Sequence,
    dataset,
    artifacts: str | Path,
    *,
    n0: int,
    n: int,
    seed: int,
    limit: int | None,
    progress: bool = True,
    **sampling,
) -> ValidationCounts:
    """Every expert's counts on the first ``limit`` val inputs (tuning stages, cached under
    ``<artifacts>/tune/experts``)."""
    if dataset.split != "val":
        raise UsageError(f"tuning reads the val split only, not {dataset.split!r}.")
    size = len(dataset) if limit is None else min(limit, len(dataset))
    sel, est = [], []
    stages = (TUNING_STAGE + SELECTION, TUNING_STAGE + ESTIMATION)
    with progress_bar("val counts", len(experts) * size, enabled=progress) as advance:
        for expert in experts:
            expert.eval()
            path = _tuning_path(artifacts, "experts", expert.fingerprint, dataset, n0, n, seed,
                                sampling)  # fmt: skip
            s, e = tuning_counts(expert, dataset, path, sigma=expert.sigma, stages=stages,
                                 width=expert.num_classes, size=size, n0=n0, n=n, seed=seed,
                                 advance=advance, progress=progress, **sampling)  # fmt: skip
            sel.append(s)
            est.append(e)
    labels = dataset.labels[:size].numpy()
    return ValidationCounts(labels, sel, est, [float(e.sigma) for e in experts])


ROUTER_TUNING_STAGES = (TUNING_STAGE + ROUTER_SELECTION, TUNING_STAGE + ROUTER_ESTIMATION)


def bin_counts(router, dataset, artifacts, *, size: int, bins: int = gates.BINS,
               per_class: bool = False, progress: bool = False, **counting):  # fmt: skip
    """(selection, estimation) counts (N, bins) of the gate router's score bins in the router's
    tuning stages (per_class: (N, classes * bins), class-major): the gate's counts for
    thresholds on the bin edges are their sums."""
    model = gates.ScoreBins(router, gates.bin_edges(bins), per_class=per_class).eval()
    what = f"gate-{'class-' if per_class else ''}bins{bins}"
    path = _tuning_path(artifacts, what, router.fingerprint, dataset, counting["n0"],
                        counting["n"], counting["seed"], counting)  # fmt: skip
    with progress_bar("gate val counts", size, enabled=progress) as advance:
        return tuning_counts(model, dataset, path, sigma=router.sigma_e,
                             width=model.num_classes, size=size, stages=ROUTER_TUNING_STAGES,
                             advance=advance, progress=progress, **counting)  # fmt: skip


# ---------------------------------------------------------------- fitting


def _scorer(vc: ValidationCounts, *, sigma_e, alpha, alpha_router=None, rule="min", step=0.25):
    """score(router selection counts, router estimation counts) -> a candidate's val scores
    (``objective``: the mean regret over bootstrap resamples of val, ``resampled_regret``;
    ``regret``: the val sample's own), each input decided under ``rule`` exactly as a certify
    run decides it; ``biases`` on the router's Phi^-1(q) as ``decide``'s. The experts'
    certificates are computed once for all the candidates of one fit."""
    a_router, a_expert = split_alpha(alpha, alpha_router)
    certificates = expert_certificates(vc, alpha)
    grid, env = envelope_of(vc, alpha, step, certificates=certificates)
    mean_regret = resampled_regret(vc, alpha, step, certificates=certificates)
    memo: dict = {}

    def score(router_sel, router_est, biases=None) -> dict:
        decided = decide_all(rule, router_sel, router_est, vc, sigma_e=sigma_e, biases=biases,
                             alpha_router=a_router, alpha_expert=a_expert, memo=memo)  # fmt: skip
        pred, radius = decided[0], decided[1]
        return {
            **_candidate(*decided, vc, grid, env),
            "objective": mean_regret(pred == vc.labels, radius),
        }

    return score


def fit_gate(
    sel_bins: np.ndarray,
    est_bins: np.ndarray,
    vc: ValidationCounts,
    *,
    sigma_e: float,
    alpha: float,
    alpha_router: float | None = None,
    rule: str = "min",
    order: Sequence[int] | None = None,
    step: float = 0.25,
) -> tuple[dict, list[dict]]:
    """The gate thresholds (on the bin edges) with the least mean regret over bootstrap
    resamples of val under ``rule`` (``resampled_regret``), ties to the larger ACR: (gate spec
    without "classes", every candidate's scores)."""
    score = _scorer(vc, sigma_e=sigma_e, alpha=alpha, alpha_router=alpha_router, rule=rule,
                    step=step)  # fmt: skip
    return _fit_shared(score, sel_bins, est_bins, order, vc.sigmas)


def _fit_shared(score, sel_bins, est_bins, order, sigmas) -> tuple[dict, list[dict]]:
    """``fit_gate``'s search with a given ``_scorer``: every threshold row on the bin edges
    (``order`` None: ``gates.default_order`` of the experts' ``sigmas``)."""
    order = list(order if order is not None else gates.default_order(sigmas))
    edges = gates.bin_edges(sel_bins.shape[1])
    tried = [
        {"thresholds": gates.cut_thresholds(cuts, edges),
         **score(gates.counts_for(sel_bins, cuts, order), gates.counts_for(est_bins, cuts, order))}
        for cuts in gates.threshold_grid(sel_bins.shape[1], len(order))
    ]  # fmt: skip
    best = min(tried, key=_objective_rank)
    return {"score": "entropy", "thresholds": best["thresholds"], "order": order}, tried


def fit_class_gate(
    sel_bins: np.ndarray,
    est_bins: np.ndarray,
    vc: ValidationCounts,
    *,
    classes: int,
    sweeps: int = 2,
    **fit,
) -> tuple[dict, list[dict]]:
    """Class-gate thresholds from (N, classes * bins) class-major bin counts of the val split;
    ``fit``: the options of ``fit_gate`` (sigma_e, alpha, alpha_router, rule, order, step).

    Coordinate descent on the mean resampled val regret (ties to the larger ACR; docs/results/
    routing.md, eleventh round: held out in 2-fold splits, 7.9 -> 6.5 against the val sample's
    regret on Fashion-MNIST, 10.1 -> 10.6 on the 20-class set, within its noise): it starts
    from the best
    thresholds shared by every class (``fit_gate`` on the bins summed over the classes), then,
    class by class, tries every threshold row for that class with the others held, keeping a
    row only if it scores strictly better (marked ``"kept"``); ``sweeps`` passes over the
    classes at most. Returns (gate spec without "classes", every candidate: the shared rows
    first, then {"class", "thresholds", "kept"} per row tried).
    """
    bins = sel_bins.shape[1] // classes
    if bins * classes != sel_bins.shape[1] or bins < 2:
        raise UsageError(f"class-gate bin counts of width {sel_bins.shape[1]} do not split into "
                         f"{classes} classes of score bins.")  # fmt: skip
    per_class = (np.asarray(c).reshape(len(c), classes, bins) for c in (sel_bins, est_bins))
    sel_shared, est_shared = (c.sum(axis=1) for c in per_class)
    order = fit.pop("order", None)
    score = _scorer(vc, **fit)  # one for the shared start and the descent: one memo
    start, shared_tried = _fit_shared(score, sel_shared, est_shared, order, vc.sigmas)
    order = start["order"]
    edges = gates.bin_edges(bins)
    candidates = list(gates.threshold_grid(bins, len(order)))
    tried = [{"class": None, **t} for t in shared_tried]
    best = min(tried, key=_objective_rank)
    current = [candidates[next(i for i, t in enumerate(tried) if t is best)]] * classes
    for _ in range(sweeps):
        changed = False
        for c in range(classes):
            for cuts in candidates:
                if cuts == current[c]:
                    continue
                trial = [*current[:c], cuts, *current[c + 1 :]]
                t = {"class": c, "thresholds": gates.cut_thresholds(cuts, edges),
                     **score(gates.class_counts_for(sel_bins, trial, order),
                             gates.class_counts_for(est_bins, trial, order))}  # fmt: skip
                t["kept"] = _objective_rank(t) < _objective_rank(best)
                tried.append(t)
                if t["kept"]:
                    best, current, changed = t, trial, True
        if not changed:
            break
    rows = [gates.cut_thresholds(cuts, edges) for cuts in current]
    return {**start, "class_thresholds": rows}, tried


FIT_RESAMPLES = 20  # val resamples whose mean worst-case regret the gate and cascade fits minimise


def resampled_regret(vc: ValidationCounts, alpha: float, step: float = 0.25, *,
                     resamples: int = FIT_RESAMPLES, seed: int = 0,
                     certificates=None):  # fmt: skip
    """A function (correct, radius) -> the mean, over ``resamples`` seeded bootstrap resamples of
    the val inputs (the envelope recomputed on each), of the worst-case regret in points. The
    regret of the one val sample is a maximum over radii of noisy shortfalls, which a fit with
    many thresholds learns to chase; the mean over resamples is smoother (docs/results/routing.md,
    sixth round: 2-fold held-out regret 3.85 against 4.92 on 2,000 Fashion-MNIST val images).
    ``certificates`` as in ``envelope_of``."""
    check_count("resamples", resamples)
    pred, rad = expert_certificates(vc, alpha) if certificates is None else certificates
    grid = radius_grid(float(rad.max()), step)
    weights = bootstrap_weights(len(vc.labels), resamples, np.random.default_rng(seed))
    env = np.max([resampled_accuracy(p == vc.labels, r, grid, weights)
                  for p, r in zip(pred, rad, strict=True)], axis=0)  # fmt: skip

    def mean_regret(correct, radius) -> float:
        shortfall = env - resampled_accuracy(correct, radius, grid, weights)
        return float(100 * np.mean(shortfall.max(axis=1)))

    return mean_regret


# how the cascade is fitted ([tune] cascade, `router train --cascade`; docs/results/routing.md)
CASCADE_FITS = {
    "regret": "every stage's order and thresholds fitted (the least regret measured)",
    "keep-multiscale": "the largest sigma first at 1/2 for every class (Multiscale's first "
    "stage, so never below Multiscale where only it certifies), the rest fitted",
    "plain": "Multiscale's stages and thresholds, nothing fitted",
}


def check_cascade_fit(fit) -> str:
    """``fit`` if it names a way of fitting the cascade, else a UsageError listing them."""
    if not isinstance(fit, str) or fit not in CASCADE_FITS:
        raise UsageError(f"unknown cascade fit {fit!r}: use one of {', '.join(CASCADE_FITS)}.")
    return fit


def fit_cascade(
    vc: ValidationCounts,
    *,
    alpha: float,
    step: float = 0.25,
    grid: Sequence[float] = cascades.THRESHOLD_GRID,
    resamples: int = FIT_RESAMPLES,
    fit: str = "regret",
) -> tuple[cascades.CascadeSpec, list[dict]]:
    """The class-aware cascade's stage order and thresholds with the least mean worst-case regret
    over ``resamples`` bootstrap resamples of val (``resampled_regret``; ties to the larger
    ACR), from the experts' val counts alone (no router is sampled): (spec, every candidate
    tried with its val scores: ``objective`` that mean, ``regret`` the val sample's own).
    ``fit`` (CASCADE_FITS): "keep-multiscale" fits only the stages after the largest sigma,
    which decides first at 1/2; "plain" scores Multiscale's spec alone (one candidate)."""
    fit = check_cascade_fit(fit)
    certificates = expert_certificates(vc, alpha)  # every expert alone, read by both below
    grid_r, env = envelope_of(vc, alpha, step, certificates=certificates)
    mean_regret = resampled_regret(vc, alpha, step, resamples=resamples, certificates=certificates)
    bounds = cascades.bounds_of(vc.selection, vc.estimation, vc.sigmas, alpha)

    def score(pred, radius, expert) -> dict:
        return {**_candidate(pred, radius, expert, vc, grid_r, env),
                "objective": mean_regret(pred == vc.labels, radius)}  # fmt: skip

    classes = vc.selection[0].shape[1]
    plain = cascades.multiscale_spec(vc.sigmas, classes)
    if fit == "plain":  # one candidate, recorded as the fit records its rows
        return plain, [{**plain.to_dict(), "kept": True,
                        **score(*cascades.certify_cascade(bounds, plain))}]  # fmt: skip
    first = plain.order[0] if fit == "keep-multiscale" else None
    return cascades.fit_cascade(bounds, score, _objective_rank, classes=classes, grid=grid,
                                first=first)  # fmt: skip


BIAS_GRID = tuple(np.round(np.arange(-1.5, 1.51, 0.25), 2))


def fit_biases(
    router_sel: np.ndarray,
    router_est: np.ndarray,
    vc: ValidationCounts,
    *,
    sigma_e: float,
    alpha: float,
    alpha_router: float | None = None,
    rule: str = "agreement",
    grid_values: Sequence[float] = BIAS_GRID,
    step: float = 0.25,
) -> tuple[list[float], list[dict]]:
    """Per-expert biases b on Phi^-1(q) (expert 0's fixed at 0) under ``rule`` (pairwise or
    agreement: "min" ignores biases) with the least val regret, ties to the larger ACR:
    (biases, every candidate's scores, each with the resampled ``objective`` beside its
    ``regret``). Not ranked by that objective, as the other fits are: on 2-fold splits of 500
    Fashion-MNIST val images it chose the same biases on four halves of six and ones with a
    higher held-out regret on the other two (docs/results/routing.md, twelfth round)."""
    if rule == "min":
        raise UsageError("biases need the pairwise or agreement rule: min ignores them.")
    score = _scorer(vc, sigma_e=sigma_e, alpha=alpha, alpha_router=alpha_router, rule=rule,
                    step=step)  # fmt: skip
    tried = []
    for rest in itertools.product(grid_values, repeat=len(vc.sigmas) - 1):
        biases = [0.0, *map(float, rest)]
        tried.append({"biases": biases, **score(router_sel, router_est, biases)})
    return min(tried, key=_rank)["biases"], tried


# ---------------------------------------------------------------- workspace level

# [tune]: limit None fits on the whole val split ([data] validation = K); a number caps it
TUNE_DEFAULTS = {"limit": None, "bins": gates.BINS, "step": 0.25, "cascade": "regret"}


def _chosen(tried: list[dict], gate: dict) -> dict:
    """The scores of the fitted gate: the best candidate tried (for a class gate, the last row
    kept)."""
    if "class_thresholds" in gate:
        return min(tried, key=_objective_rank)
    return next(t for t in tried if t["thresholds"] == gate["thresholds"])


def _val_setup(ws, device, cascade_fit: str | None = None):
    """([tune] settings, ``cascade_fit`` over its cascade, checked; [certify] settings, the val
    split, the sampling keywords)."""
    from rsrouter.composition.certify_run import certify_settings
    from rsrouter.router.tables import workspace_dataset

    tune = ws.settings_over("tune", TUNE_DEFAULTS, {"cascade": cascade_fit})
    check_cascade_fit(tune["cascade"])
    c = certify_settings(ws)
    common = {"n0": c["n0"], "n": c["n"], "seed": c["seed"], "batch_size": c["batch_size"],
              "device": device}  # fmt: skip
    return tune, c, workspace_dataset(ws, "val"), common


def _experts_val(ws, experts: dict, tune: dict, val, common: dict, progress: bool):
    """Every expert's counts on the first [tune] limit inputs of the loaded val split."""
    return validation_counts(list(experts.values()), val, ws.artifacts, limit=tune["limit"],
                             progress=progress, **common)  # fmt: skip


def experts_val_counts(ws, experts: dict, *, device=None, progress: bool = True):
    """Every expert's counts on the first [tune] limit val inputs, in the tuning stages."""
    tune, _, val, common = _val_setup(ws, distributed.context().device(device))
    return _experts_val(ws, experts, tune, val, common, progress)


def router_val_counts(ws, router, experts: dict, *, device=None, progress: bool = True):
    """(val counts of every expert, router selection counts, router estimation counts) on the
    first [tune] limit val inputs, in the tuning stages."""
    tune, _, val, common = _val_setup(ws, distributed.context().device(device))
    vc = _experts_val(ws, experts, tune, val, common, progress)
    path = _tuning_path(ws.artifacts, "router", router.fingerprint, val, common["n0"],
                        common["n"], common["seed"], common)  # fmt: skip
    with progress_bar("router val counts", len(vc.labels), enabled=progress) as advance:
        sel, est = tuning_counts(router.eval(), val, path, sigma=router.sigma_e,
                                 width=len(experts), size=len(vc.labels),
                                 stages=ROUTER_TUNING_STAGES, advance=advance,
                                 progress=progress, **common)  # fmt: skip
    return vc, sel, est


def _with_copy(router, copy):
    """The gate ``router`` with every weight of ``copy`` (None: unchanged)."""
    from rsrouter.router.train import init_from_expert

    if copy is not None:
        init_from_expert(router, copy, "the gate's copy", head=True)
        router.info["copy"] = copy.fingerprint
    return router


def train_gate_workspace(
    ws,
    *,
    device=None,
    progress: bool = True,
    router_overrides=None,
    folder: str | Path | None = None,
    rule: str | None = None,
    copy=None,
    cascade_fit: str | None = None,
):
    """`router train --kind gate` (or ``class-gate``): copy the sigma_e expert, fit its
    thresholds on the val split ([tune] limit inputs; [certify] n0 / n / alpha / seed; ``rule``,
    default [certify] rule; agreement for the cascade), fit the experts' class-aware cascade
    from the same val counts (the router's config field "cascade", for the cascade rule; fitted
    as ``cascade_fit`` says, default [tune] cascade, CASCADE_FITS), save
    the router (default: the workspace's router folder) and ``tuning.json`` (every candidate
    tried). Returns (router, tried, folder).

    ``copy``: an expert of the same architecture whose weights the gate copies instead (say,
    the sigma_e expert taught to abstain); the experts routed to are the workspace's."""
    from rsrouter.io import write_json
    from rsrouter.router.train import (
        GATE_KINDS,
        build_router,
        router_folder,
        router_kind,
        router_settings,
    )

    ctx = distributed.context()  # under torchrun the ranks share the val counts
    device, progress = ctx.device(device), progress and ctx.is_main
    settings = router_settings(ws, **(router_overrides or {}))
    kind = router_kind(settings)
    kind = kind if kind in GATE_KINDS else "gate"
    settings = {**settings, "kind": kind, "gate": None}
    tune, c, val, common = _val_setup(ws, device, cascade_fit)
    rule = check_rule(rule or c.get("rule") or "agreement")
    if rule == CASCADE:  # the gate itself is fitted for the best rule that reads it
        rule = "agreement"
    experts = ws.load_experts(device=device)
    info = {"dataset": val.name, "class_names": list(val.class_names)}
    router = _with_copy(build_router(experts, settings, info=info), copy).to(device).eval()
    vc = _experts_val(ws, experts, tune, val, common, progress)
    per_class = kind == "class-gate"
    sel, est = bin_counts(router, val, ws.artifacts, size=len(vc.labels), bins=tune["bins"],
                          per_class=per_class, progress=progress, **common)  # fmt: skip
    fit = {"sigma_e": router.sigma_e, "rule": rule, "step": tune["step"], "alpha": c["alpha"],
           "alpha_router": c["alpha_router"]}  # fmt: skip
    if per_class:
        gate, tried = fit_class_gate(sel, est, vc, classes=router.gate["classes"], **fit)
    else:
        gate, tried = fit_gate(sel, est, vc, **fit)
    spec, cascade_tried = fit_cascade(vc, alpha=c["alpha"], step=tune["step"],
                                      fit=tune["cascade"])  # fmt: skip
    info["cascade"] = spec.to_dict()
    info["tuning"] = {
        "split": "val",
        "inputs": len(vc.labels),
        "dataset": val.fingerprint,
        "rule": rule,
        "objective": f"least mean worst-case regret to the single-expert envelope over "
        f"{FIT_RESAMPLES} bootstrap resamples of val, then ACR",
        "chosen": _chosen(tried, gate),
        "cascade": min(cascade_tried, key=_objective_rank),  # the chosen spec's scores
        "cascade_objective": f"least mean worst-case regret over {FIT_RESAMPLES} bootstrap "
        "resamples of val, then ACR",
        "cascade_fit": tune["cascade"],
        "cascade_fit_meaning": CASCADE_FITS[tune["cascade"]],
    }
    router = _with_copy(build_router(experts, {**settings, "gate": gate}, info=info), copy).eval()
    folder = Path(folder) if folder is not None else router_folder(ws)
    if ctx.is_main:  # every rank fitted the same router from the same counts; one saves it
        router.save_pretrained(folder)
        write_json(folder / "tuning.json", {"objective": info["tuning"]["objective"],
                                            "rule": rule, "tried": tried,
                                            "cascade": cascade_tried})  # fmt: skip
    ctx.barrier()
    return router, tried, folder
