"""The class-aware cascade: experts that gate themselves on their own smoothed confidence.

No router is sampled. The stages are the experts in a fixed order (any order), each with one
threshold per class, tau[k][c] in [1/2, 1] (1: stage k never fires with class c). The composed
classifier is

    g(x) = the class c of the first stage k with p_k(c; x) > tau[k][c]   (none fires: abstain),

where p_k(c; x) is expert k's smoothed probability of class c (Gaussian noise at its own sigma).
As tau >= 1/2, a stage fires with at most one class. The Multiscale cascade of Jeong & Shin
(2024) is the special case of the experts from the largest sigma down and every tau = p_skip.

Certificate (from each expert's stored counts; proof in docs/composition-rules.md). Every bound
holds at once with probability >= 1 - alpha (a union bound): per stage, at alpha / K, a lower
Clopper-Pearson bound lo_k on p_k(c_k) (c_k: the stage's top class in its selection draws) at
alpha / (2K) and an upper bound up_k(b) on every class at alpha / (2KC) each (also <= 1 - lo_k
for b != c_k). Phi^-1(p_k(b; .)) is 1/sigma_k-Lipschitz (Salman et al. 2019), so on B(x, r)

- stage s surely fires with c_s while r < sure_s = sigma_s (Phi^-1(lo_s) - Phi^-1(tau[s][c_s]));
- stage k cannot fire with class b while r < cap_k(b) = sigma_k (Phi^-1(tau[k][b]) -
  Phi^-1(up_k(b))) (+inf when tau = 1).

If stage s surely fires with c and no stage before it can fire with another class, g = c on the
ball (a stage before s may fire with c itself: that changes nothing). So g is certified c on
B(x, R) with R = max over s of min(sure_s, min over k < s and b != c_s of cap_k(b)), and the
prediction is that stage's c_s (none positive: abstain).

Thresholds and order are fitted on the validation split (``fit_cascade``), never the test split.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri

from rsrouter.errors import UsageError
from rsrouter.smoothing import ABSTAIN, check_alpha, lower_confidence_bound

NEVER = 1.0  # tau = 1: the stage never fires with that class
# thresholds the fit tries (n = 2,000 at alpha = 0.001 / 3 bounds p at most at 0.9957)
THRESHOLD_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, NEVER)


@dataclass(frozen=True)
class CascadeSpec:
    """The stages (expert indices, first stage first) and tau[stage][class]."""

    order: tuple[int, ...]
    thresholds: tuple[tuple[float, ...], ...]

    def to_dict(self) -> dict:
        return {"order": list(self.order), "thresholds": [list(t) for t in self.thresholds]}


def check_cascade(spec, experts: int, classes: int) -> CascadeSpec:
    """A CascadeSpec (or its dict) checked against the expert and class counts."""
    if isinstance(spec, CascadeSpec):
        spec = spec.to_dict()
    try:
        order = tuple(int(i) for i in spec["order"])
        rows = tuple(tuple(float(t) for t in row) for row in spec["thresholds"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(
            "a cascade needs an order of expert indices and a row of thresholds per stage."
        ) from exc
    if sorted(order) != list(range(experts)):
        raise UsageError(f"cascade order must list each of the {experts} experts once.")
    if len(rows) != experts or any(len(r) != classes for r in rows):
        raise UsageError(f"cascade thresholds need {experts} rows of {classes} values.")
    if not all(0.5 <= t <= 1.0 for r in rows for t in r):
        raise UsageError("cascade thresholds must lie in [0.5, 1] (1: never fire).")
    return CascadeSpec(order, rows)


def multiscale_spec(sigmas: Sequence[float], classes: int, p_skip: float = 0.5) -> CascadeSpec:
    """Multiscale's cascade as a spec: the largest sigma first, every threshold p_skip."""
    order = tuple(sorted(range(len(sigmas)), key=lambda i: (-float(sigmas[i]), i)))
    return CascadeSpec(order, tuple((float(p_skip),) * classes for _ in order))


@dataclass(frozen=True)
class StageBounds:
    """Each expert's bounds on N inputs at level alpha / K: top class (N,), lo (N,), up (N, C)."""

    selected: np.ndarray
    lo: np.ndarray
    up: np.ndarray
    sigma: float


def _bounds(selected, est, sigma: float, lo_level: float, up_level: float) -> StageBounds:
    """lo on each row's ``selected`` class at ``lo_level``, up on every class at ``up_level``
    (and <= 1 - lo off the selected class), from (N, C) estimation counts."""
    rows, classes = est.shape
    n = est.sum(axis=1)
    lo = np.atleast_1d(lower_confidence_bound(est[np.arange(rows), selected], n, lo_level))
    up = 1.0 - np.atleast_2d(lower_confidence_bound(n[:, None] - est, n[:, None], up_level))
    off = np.arange(classes)[None, :] != selected[:, None]
    up = np.where(off, np.minimum(up, 1.0 - lo[:, None]), up)
    return StageBounds(selected, lo, up, float(sigma))


def stage_bounds(selection, counts, sigma: float, level: float) -> StageBounds:
    """Bounds of one expert from its (N, C) selection and estimation counts at ``level``: lo on
    the selected class at level / 2, up on each class at level / (2 C) (and <= 1 - lo off it)."""
    sel = np.atleast_2d(np.asarray(selection, dtype=np.int64))
    est = np.atleast_2d(np.asarray(counts, dtype=np.int64))
    return _bounds(sel.argmax(axis=1), est, sigma, level / 2, level / (2 * est.shape[1]))


def bounds_of(selection: Sequence, counts: Sequence, sigmas: Sequence[float], alpha: float):
    """Every expert's StageBounds at alpha / K (K experts): the union bound of the cascade."""
    alpha = check_alpha(alpha)
    level = alpha / len(sigmas)
    return [stage_bounds(s, e, sg, level) for s, e, sg in zip(selection, counts, sigmas,
                                                              strict=True)]  # fmt: skip


def predict_bounds(counts: Sequence, sigmas: Sequence[float], alpha: float):
    """PREDICT's bounds from one set of (N, C) draws per expert (no selection draws): the top
    class comes from the same draws, so every class gets a lower and an upper bound, each at
    alpha / (2KC) (all 2KC at once), and the top class's lower bound is one of them."""
    alpha = check_alpha(alpha)
    out = []
    for est, sigma in zip(counts, sigmas, strict=True):
        est = np.atleast_2d(np.asarray(est, dtype=np.int64))
        level = alpha / (2 * len(sigmas) * est.shape[1])
        out.append(_bounds(est.argmax(axis=1), est, sigma, level, level))
    return out


def decide_cascade(spec: CascadeSpec, expert_counts: Sequence[tuple], sigmas, alpha: float):
    """(class or -1, radius, certifying expert or -1) of one input from each expert's
    (selection, estimation) counts."""
    sel = [[np.asarray(c[0])] for c in expert_counts]
    est = [[np.asarray(c[1])] for c in expert_counts]
    pred, radius, expert = certify_cascade(bounds_of(sel, est, sigmas, alpha), spec)
    return int(pred[0]), float(radius[0]), int(expert[0])


def _ppf(p) -> np.ndarray:
    return ndtri(np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0))


def certify_cascade(bounds: Sequence[StageBounds], spec: CascadeSpec):
    """(prediction (N,), radius (N,), certifying expert (N,), -1 on abstention) of the cascade."""
    rows = len(bounds[0].lo)
    best_r = np.zeros(rows)
    best_c = np.full(rows, ABSTAIN, dtype=np.int64)
    best_e = np.full(rows, -1, dtype=np.int64)
    caps = []  # per earlier stage: (N, C) radius below which it cannot fire with each class
    idx = np.arange(rows)
    for s, i in enumerate(spec.order):
        b = bounds[i]
        tau = np.asarray(spec.thresholds[s], dtype=np.float64)
        c = b.selected
        with np.errstate(invalid="ignore", divide="ignore"):
            sure = np.where(tau[c] < NEVER, b.sigma * (_ppf(b.lo) - _ppf(tau[c])), -np.inf)
            radius = sure.copy()
            for cap in caps:
                masked = cap.copy()
                masked[idx, c] = np.inf  # firing with c itself changes nothing
                radius = np.minimum(radius, masked.min(axis=1))
            better = radius > best_r
            best_r = np.where(better, radius, best_r)
            best_c = np.where(better, c, best_c)
            best_e = np.where(better, i, best_e)
            cap = np.where(tau[None, :] < NEVER, b.sigma * (_ppf(tau)[None, :] - _ppf(b.up)),
                           np.inf)  # fmt: skip
        caps.append(np.where(np.isnan(cap), -np.inf, cap))
    return best_c, best_r, best_e


def cascade_orders(experts: int):
    """Every stage order of the experts."""
    return itertools.permutations(range(experts))


def fit_cascade(
    bounds: Sequence[StageBounds],
    score: Callable[[np.ndarray, np.ndarray, np.ndarray], dict],
    rank: Callable[[dict], tuple],
    *,
    classes: int,
    grid: Sequence[float] = THRESHOLD_GRID,
    sweeps: int = 2,
    first: int | None = None,
) -> tuple[CascadeSpec, list[dict]]:
    """The order and thresholds with the best ``rank(score(prediction, radius, expert))`` on the
    val split's bounds. For every stage order: first one threshold shared by every class of a
    stage, every combination on ``grid`` (a small-sigma stage that fires only when very sure is
    one such); then, from the best, coordinate descent over each (stage, class) threshold,
    keeping a change only when it ranks strictly better, ``sweeps`` passes at most. The last
    stage keeps 1/2 (its thresholds only shrink its own radii). ``first``: only orders that
    start with that expert, its thresholds kept at 1/2 too (with the largest sigma, Multiscale's
    first stage: every certificate it gives is kept, so the cascade's large radii are
    Multiscale's). Returns (spec, every candidate tried: the shared rows, marked ``"shared"``,
    then one row per (stage, class, tau) tried, ``"kept"`` when taken)."""
    tried: list[dict] = []
    best, best_spec = None, None
    grid = [float(t) for t in grid]
    fixed = 0 if first is None else 1  # leading stages kept at 1/2
    if first is not None and first not in range(len(bounds)):
        raise UsageError(f"the cascade's first stage must be one of {len(bounds)} experts.")
    for order in cascade_orders(len(bounds)):
        if first is not None and order[0] != first:
            continue

        def scored(rows, order=order, **what) -> dict:
            spec = CascadeSpec(tuple(order), tuple(map(tuple, rows)))
            return {"order": list(order), **what, **score(*certify_cascade(bounds, spec))}

        shared = []
        for taus in itertools.product(grid, repeat=len(order) - 1 - fixed):
            taus = (0.5,) * fixed + taus
            rows = [[t] * classes for t in taus] + [[0.5] * classes]
            shared.append(scored(rows, shared=list(taus), thresholds=rows))
        current = min(shared, key=rank)
        for t in shared:
            t["kept"] = t is current
        tried += shared
        rows = [list(r) for r in current["thresholds"]]
        for _ in range(sweeps):
            changed = False
            for s, c in itertools.product(range(fixed, len(order) - 1), range(classes)):
                for tau in grid:
                    if tau == rows[s][c]:
                        continue
                    trial = [list(r) for r in rows]
                    trial[s][c] = tau
                    t = scored(trial, stage=s, **{"class": c}, tau=tau)
                    t["kept"] = rank(t) < rank(current)
                    tried.append(t)
                    if t["kept"]:
                        rows, changed = trial, True
                        current = {**t, "thresholds": [list(r) for r in trial]}
            if not changed:
                break
        if best is None or rank(current) < rank(best):
            best = current
            best_spec = CascadeSpec(tuple(order), tuple(map(tuple, rows)))
    return best_spec, tried
