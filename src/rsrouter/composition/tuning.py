"""Tuning on the validation split: every threshold or bias a router design needs is chosen here,
by the score the issue set for every method (the worst-case regret to the single-expert
envelope), from counts of the ``val`` split only. The test split is never read.

The score of a candidate is computed from counts exactly as a certify run would decide it, so
what is fitted is what is later certified; the candidates tried and their scores are returned
for the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rsrouter import distributed
from rsrouter.composition.certify_run import CountsCache, counts_key, expert_counts_path
from rsrouter.composition.dual import DualSmoothed, split_alpha
from rsrouter.composition.report import acr, certified_accuracy, radius_grid
from rsrouter.errors import UsageError
from rsrouter.progress import progress_bar
from rsrouter.router import gate as gates
from rsrouter.smoothing import (
    ROUTER_ESTIMATION,
    ROUTER_SELECTION,
    Certificate,
    certified_radius,
    sample_counts,
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
    pred = np.full((len(vc.sigmas), len(vc.labels)), -1, dtype=np.int64)
    rad = np.zeros((len(vc.sigmas), len(vc.labels)))
    for j, sigma in enumerate(vc.sigmas):
        for i in range(len(vc.labels)):
            c = Certificate.from_counts(vc.selection[j][i], vc.estimation[j][i], sigma, alpha)
            pred[j, i], rad[j, i] = c.prediction, c.radius
    return pred, rad


def dual_min_rule(
    router_sel: np.ndarray,
    router_est: np.ndarray,
    sigma_e: float,
    alpha_router: float,
    expert_pred: np.ndarray,
    expert_rad: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Theorem 4.2 decided for N inputs at once: (prediction, radius, routed expert or -1)."""
    rows = np.arange(len(router_sel))
    chosen = np.argmax(router_sel, axis=1)
    r_sigma = certified_radius(router_est[rows, chosen], router_est.sum(axis=1), sigma_e,
                               alpha_router)  # fmt: skip
    routed = np.where(r_sigma > 0, chosen, -1)
    pred = np.where(routed >= 0, expert_pred[chosen, rows], -1)
    radius = np.where(pred >= 0, np.minimum(r_sigma, expert_rad[chosen, rows]), 0.0)
    return pred, radius, routed


def regret(accuracy: np.ndarray, envelope: np.ndarray) -> float:
    """The largest shortfall from the envelope over the grid, in points (>= 0)."""
    return float(max(0.0, 100 * np.max(envelope - accuracy)))


@dataclass(frozen=True)
class Scored:
    """A candidate's score on the val split."""

    regret: float
    acr: float
    accuracy: list[float]


def score(pred, radius, labels, grid, envelope) -> Scored:
    correct = pred == labels
    accuracy = certified_accuracy(correct, radius, grid)
    return Scored(regret(accuracy, envelope), acr(correct, radius), accuracy.tolist())


def envelope_of(vc: ValidationCounts, alpha: float, step: float = 0.25):
    """(grid, envelope): the best single expert at full alpha on each radius of the grid."""
    pred, rad = expert_certificates(vc, alpha)
    correct = pred == vc.labels[None]
    grid = radius_grid(float((rad * correct).max()), step)
    curves = np.stack([certified_accuracy(c, r, grid) for c, r in zip(correct, rad, strict=True)])
    return grid, curves.max(axis=0)


# ---------------------------------------------------------------- counts of the val split


def validation_counts(
    dual: DualSmoothed,
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
    """Every expert's counts on the first ``limit`` val inputs, through the certify cache (a
    later `router certify --split val` reuses them, and they reuse an earlier one's)."""
    if dataset.split != "val":
        raise UsageError(f"tuning reads the val split only, not {dataset.split!r}.")
    size = len(dataset) if limit is None else min(limit, len(dataset))
    idx = list(range(size))
    root = Path(artifacts) / "certify"
    bf16 = bool(sampling.get("bf16"))
    sel, est = [], []
    with progress_bar("val counts", len(dual.experts), enabled=progress) as advance:
        for j, expert in enumerate(dual.experts):
            path = expert_counts_path(root, expert.fingerprint, dataset, n0, n, seed, bf16)
            have = CountsCache(path, distributed.context()).fill(
                lambda xs, j=j, **kw: dual.expert_counts(j, xs, **kw),
                dataset.images, idx, n0=n0, n=n, seed=seed, **sampling,
            )  # fmt: skip
            sel.append(np.array([have[i]["selection_counts"] for i in idx]))
            est.append(np.array([have[i]["counts"] for i in idx]))
            advance(1)
    labels = dataset.labels[:size].numpy()
    return ValidationCounts(labels, sel, est, [float(s) for s in dual.sigmas])


def bin_counts(
    router,
    dataset,
    artifacts: str | Path,
    *,
    n0: int,
    n: int,
    seed: int,
    size: int,
    bins: int = gates.BINS,
    **sampling,
) -> tuple[np.ndarray, np.ndarray]:
    """(selection, estimation) counts (N, bins) of the gate router's score bins under the
    router's own noise stages: the gate's counts for thresholds on the bin edges are their sums.
    Cached under ``<artifacts>/certify/gate-bins``."""
    model = gates.ScoreBins(router, gates.bin_edges(bins)).eval()
    key = counts_key(router.fingerprint + f":bins{bins}", dataset.fingerprint, n0, n, seed,
                     bool(sampling.get("bf16")))  # fmt: skip
    path = Path(artifacts) / "certify" / "gate-bins" / f"{key}.jsonl"

    def counts(xs, *, indices, n0, n, seed, **kw):
        common = {"num_classes": bins, "indices": indices, "seed": seed, **kw}
        sel = sample_counts(model, xs, router.sigma_e, n0, stage=ROUTER_SELECTION, **common)
        est = sample_counts(model, xs, router.sigma_e, n, stage=ROUTER_ESTIMATION, **common)
        return sel.numpy(), est.numpy()

    idx = list(range(size))
    cache = CountsCache(path, distributed.context())
    have = cache.fill(counts, dataset.images, idx, n0=n0, n=n, seed=seed, **sampling)
    return (
        np.array([have[i]["selection_counts"] for i in idx]),
        np.array([have[i]["counts"] for i in idx]),
    )


# ---------------------------------------------------------------- fitting


def fit_gate(
    sel_bins: np.ndarray,
    est_bins: np.ndarray,
    vc: ValidationCounts,
    *,
    sigma_e: float,
    alpha: float,
    alpha_router: float | None = None,
    order: Sequence[int] | None = None,
    step: float = 0.25,
) -> tuple[dict, list[dict]]:
    """The gate thresholds (on the bin edges) with the least val regret, ties to the larger ACR:
    (gate spec without "classes", every candidate's scores)."""
    a_router, a_expert = split_alpha(alpha, alpha_router)
    order = list(order if order is not None else gates.default_order(vc.sigmas))
    grid, envelope = envelope_of(vc, alpha, step)
    pred_e, rad_e = expert_certificates(vc, a_expert)
    edges = gates.bin_edges(sel_bins.shape[1])
    tried = []
    for cuts in gates.threshold_grid(sel_bins.shape[1], len(order)):
        rs, re = gates.counts_for(sel_bins, cuts, order), gates.counts_for(est_bins, cuts, order)
        pred, radius, routed = dual_min_rule(rs, re, sigma_e, a_router, pred_e, rad_e)
        s = score(pred, radius, vc.labels, grid, envelope)
        shares = [float(np.mean(routed == j)) for j in range(len(order))]
        tried.append({"thresholds": gates.cut_thresholds(cuts, edges), "regret": s.regret,
                      "acr": s.acr, "routed": shares,
                      "abstained": float(np.mean(routed < 0))})  # fmt: skip
    best = min(tried, key=lambda t: (round(t["regret"], 6), -t["acr"]))
    return {"score": "entropy", "thresholds": best["thresholds"], "order": order}, tried


# ---------------------------------------------------------------- workspace level

TUNE_DEFAULTS = {"limit": 500, "bins": gates.BINS, "step": 0.25}


def train_gate_workspace(ws, *, device=None, progress: bool = True, router_overrides=None):
    """`router train --kind gate`: copy the sigma_e expert, fit its thresholds on the val split
    ([tune] limit inputs, [certify] n0 / n / alpha / seed), save the router and ``tuning.json``
    (every candidate tried). Returns (router, tried, folder)."""
    from rsrouter.composition.certify_run import certify_settings
    from rsrouter.io import write_json
    from rsrouter.router.tables import workspace_dataset
    from rsrouter.router.train import build_router, router_folder, router_settings
    from rsrouter.runtime import resolve_device

    device = resolve_device(device)
    settings = {**router_settings(ws, **(router_overrides or {})), "kind": "gate", "gate": None}
    tune = ws.settings_over("tune", TUNE_DEFAULTS, {})
    c = certify_settings(ws)
    experts = ws.load_experts(device=device)
    val = workspace_dataset(ws, "val")
    info = {"dataset": val.name, "class_names": list(val.class_names)}
    router = build_router(experts, settings, info=info).to(device).eval()
    dual = DualSmoothed(router, router.sigma_e, list(experts.values()))
    sampling = {"batch_size": c["batch_size"], "device": device}
    common = {"n0": c["n0"], "n": c["n"], "seed": c["seed"], **sampling}
    vc = validation_counts(dual, val, ws.artifacts, limit=tune["limit"], progress=progress,
                           **common)  # fmt: skip
    sel, est = bin_counts(router, val, ws.artifacts, size=len(vc.labels), bins=tune["bins"],
                          **common)  # fmt: skip
    gate, tried = fit_gate(sel, est, vc, sigma_e=router.sigma_e, alpha=c["alpha"],
                           alpha_router=c["alpha_router"], step=tune["step"])  # fmt: skip
    info["tuning"] = {
        "split": "val",
        "inputs": len(vc.labels),
        "dataset": val.fingerprint,
        "objective": "least worst-case regret to the single-expert envelope, then ACR",
        "chosen": next(t for t in tried if t["thresholds"] == gate["thresholds"]),
    }
    router = build_router(experts, {**settings, "gate": gate}, info=info).eval()
    folder = router_folder(ws)
    router.save_pretrained(folder)
    write_json(folder / "tuning.json", {"objective": info["tuning"]["objective"], "tried": tried})
    return router, tried, folder
