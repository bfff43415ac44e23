"""Sound composition rules, as pure functions of counts (docs/composition-rules.md has proofs).

The smoothed router routes to argmax_j Phi^-1(q_j(x)) + b_j, with q_j(x) = P[router(x + d) = j]
(d ~ N(0, sigma_e^2 I)) and fixed biases b (0: the plain argmax). Each Phi^-1(q_j) is
1/sigma_e-Lipschitz in x (Salman et al. 2019), so with simultaneous bounds q_lo on the leader j*
and q_hi on every other output k, output k cannot be the argmax anywhere in B(x, r) while
r < gap_k = sigma_e / 2 * [(Phi^-1(q_lo_j*) + b_j*) - (Phi^-1(q_hi_k) + b_k)].

- ``min``: the paper's Theorem 4.2 (plain argmax, a lower bound on q_j* alone), kept in dual.py.
- ``pairwise``: the route stays j* on B(x, min_k gap_k); the radius is min(that, R_c).
- ``agreement``: every expert k with gap_k < r may route inside B(x, r) (the set S(r)); the
  composition is constant on B(x, r) when every expert of S(r) certifies the same class there.
- ``cascade``: no router; the experts gate themselves on their own smoothed confidence with
  thresholds fitted on val (composition/cascade.py).

The router's E bounds are Bonferroni at alpha_router / E each. The agreement rule reads every
expert's certificate, each at alpha_expert / E: which experts enter S depends on the draws,
so the union bound runs over every expert that may enter it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import ndtri

from rsrouter.errors import UsageError
from rsrouter.smoothing import ABSTAIN, certify_rows, lower_confidence_bound

RULES = ("min", "pairwise", "agreement")  # the rules that read the router
# the experts' class-aware cascade (composition/cascade.py): no router is read; its stage order
# and thresholds are fitted on the val split and kept in the router's config ("cascade")
CASCADE = "cascade"
ALL_RULES = (*RULES, CASCADE)
DEFAULT_RULE = "min"


def check_rule(rule: str) -> str:
    if rule not in ALL_RULES:
        raise UsageError(f"unknown composition rule {rule!r}: use one of {', '.join(ALL_RULES)}.")
    return rule


def headline_rule(rule: str | None, info) -> str:
    """The rule asked for, or by default the cascade when the router's ``info`` (its
    config) carries one, else agreement (the best measured with and without one,
    docs/results/routing.md): the headline of `router certify`, of a bundle's card and the rule
    of a router loaded with ``load_router``."""
    if rule is not None:
        return check_rule(rule)
    return CASCADE if info.get("cascade") is not None else "agreement"


def check_biases(biases, size: int) -> np.ndarray:
    """``size`` finite router biases as a float array (zeros when None)."""
    if biases is None:
        return np.zeros(size)
    try:
        b = np.asarray(biases, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"router biases must be numbers, got {biases!r}.") from exc
    if b.shape != (size,) or not np.all(np.isfinite(b)):
        raise UsageError(
            f"router biases need {size} finite numbers (one per expert), got {biases!r}."
        )
    return b


def _scores(q, biases) -> np.ndarray:
    """Phi^-1(q) + b, with q = 0 -> -inf and q = 1 -> +inf."""
    return ndtri(np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)) + biases


def leader_rows(selection_counts, biases=None) -> np.ndarray:
    """The candidate route j* of each of N inputs: the biased argmax of its (N, E) selection
    draws' vote shares."""
    sel = np.atleast_2d(np.asarray(selection_counts, dtype=np.float64))
    shares = sel / np.maximum(sel.sum(axis=1, keepdims=True), 1.0)
    return np.argmax(_scores(shares, check_biases(biases, sel.shape[1])), axis=1)


def leader(selection_counts, biases=None) -> int:
    """The candidate route j* of one input (``leader_rows`` of one row)."""
    return int(leader_rows(selection_counts, biases)[0])


def router_bounds_rows(selection_counts, counts, alpha_router: float, biases=None):
    """(j* (N,), q_lo of j* (N,), q_hi of every output (N, E)) of N inputs: per input, E
    one-sided bounds at alpha_router / E each.

    j* comes from the selection draws only. q_hi_k is also capped by 1 - q_lo (the q's sum to
    1). The entry of q_hi at j* is 1.0 and unused.
    """
    est = np.atleast_2d(np.asarray(counts, dtype=np.int64))
    rows, width = est.shape
    idx, n, level = np.arange(rows), est.sum(axis=1), alpha_router / width
    j = leader_rows(selection_counts, biases)
    lo = np.atleast_1d(lower_confidence_bound(est[idx, j], n, level)).astype(np.float64)
    hi = 1.0 - np.atleast_2d(lower_confidence_bound(n[:, None] - est, n[:, None], level))
    hi = np.minimum(hi, 1.0 - lo[:, None])
    hi[idx, j] = 1.0
    return j, lo, hi


def router_bounds(
    selection_counts, counts, alpha_router: float, biases=None
) -> tuple[int, float, np.ndarray]:
    """(j*, q_lo of j*, q_hi of every output) of one input (``router_bounds_rows`` of one row)."""
    j, lo, hi = router_bounds_rows(selection_counts, counts, alpha_router, biases)
    return int(j[0]), float(lo[0]), hi[0]


def score_gaps_rows(j, q_lo, q_hi, sigma_e: float, biases=None) -> np.ndarray:
    """gap_k = sigma_e / 2 * (score_lo(j*) - score_hi(k)) for each output k of N inputs (N, E)
    (+inf at j*).

    Output k is not the router's argmax anywhere in B(x, r) while r < gap_k. An undefined gap
    (inf - inf) counts as -inf: nothing is excluded on it.
    """
    j = np.atleast_1d(np.asarray(j, dtype=np.int64))
    q_lo = np.atleast_1d(np.asarray(q_lo, dtype=np.float64))
    q_hi = np.atleast_2d(np.asarray(q_hi, dtype=np.float64))
    b = check_biases(biases, q_hi.shape[1])
    with np.errstate(invalid="ignore"):
        gaps = sigma_e / 2 * (_scores(q_lo, b[j])[:, None] - _scores(q_hi, b))
    gaps = np.where(np.isnan(gaps), -np.inf, gaps)
    gaps[np.arange(len(j)), j] = np.inf
    return gaps


def score_gaps(j: int, q_lo: float, q_hi, sigma_e: float, biases=None) -> np.ndarray:
    """The gaps of one input (``score_gaps_rows`` of one row)."""
    return score_gaps_rows([j], [q_lo], [q_hi], sigma_e, biases)[0]


def pairwise_rows(gaps) -> np.ndarray:
    """The radius on which each input's route stays j*: min_k gap_k (0.0 if not positive; inf
    if E = 1), from (N, E) gaps."""
    r = np.atleast_2d(gaps).min(axis=1)
    return np.where(r > 0, r, 0.0)


def pairwise_radius(gaps) -> float:
    """The pairwise radius of one input (``pairwise_rows`` of one row)."""
    return float(pairwise_rows(gaps)[0])


def agreement_rows(j, gaps, predictions, radii) -> tuple[np.ndarray, np.ndarray]:
    """(class, radius) of the agreement rule for N inputs: j* (N,), gaps (N, E), and each
    expert's certified class and radius (E, N).

    The composition is constant on B(x, R) if the leader j* certifies c to R and, for every
    other k, either k cannot route inside B(x, R) (R <= gap_k) or k certifies c to R (R <= R_k).
    Every constraint is an interval [0, bound], so R is the minimum of the bounds: the largest r
    at which every expert of S(r) = {j*} + {k: gap_k <= r} certifies c with radius >= r.
    """
    j = np.atleast_1d(np.asarray(j, dtype=np.int64))
    gaps = np.atleast_2d(np.asarray(gaps, dtype=np.float64))
    pred = np.asarray(predictions, dtype=np.int64).reshape(gaps.shape[1], len(j))
    rad = np.asarray(radii, dtype=np.float64).reshape(pred.shape)
    idx = np.arange(len(j))
    c = pred[j, idx]
    bound = np.maximum(gaps, np.where(c[:, None] == pred.T, rad.T, 0.0))  # k != j* binds here
    bound[idx, j] = rad[j, idx]
    radius = bound.min(axis=1)
    ok = (c != ABSTAIN) & (radius > 0)
    return np.where(ok, c, ABSTAIN), np.where(ok, radius, 0.0)


def agreement_radius(j: int, gaps, predictions: Sequence[int], radii: Sequence[float]):
    """(class, radius) of the agreement rule for one input (``agreement_rows`` of one row)."""
    c, radius = agreement_rows([j], [gaps], predictions, radii)
    return int(c[0]), float(radius[0])


def agreement_sweep(j: int, gaps, predictions, radii) -> tuple[int, float]:
    """The agreement radius by its definition, a finite search over the breakpoints.

    The largest r among the gaps and the experts' radii such that every expert that may route
    inside the open ball B(x, r) (j*, and each k with gap_k < r) certifies j*'s class with
    radius >= r. A check on ``agreement_radius``.
    """
    c = int(predictions[j])
    if c == ABSTAIN:
        return ABSTAIN, 0.0
    points = {float(v) for v in (*gaps, *radii) if 0 < v < np.inf}
    best = 0.0
    for r in points:
        inside = [k for k in range(len(gaps)) if k == j or gaps[k] < r]
        if all(int(predictions[k]) == c and radii[k] >= r for k in inside):
            best = max(best, r)
    return (c, best) if best > 0 else (ABSTAIN, 0.0)


def decide_rows(rule: str, router_sel, router_est, expert_pred, expert_rad, *, sigma_e: float,
                alpha_router: float, biases=None):  # fmt: skip
    """(prediction, radius, route) arrays of ``dual.decide`` under ``rule`` (min, pairwise or
    agreement) for N inputs at once, with the same numbers input by input: the router's (N, E)
    selection and estimation counts, and each expert's certified class and radius (E, N) at the
    level the rule reads them (alpha_expert for min and pairwise, alpha_expert / E for
    agreement). The val fits decide thousands of candidates this way; certify runs call
    ``decide``, which keeps every certificate for the record."""
    sel = np.atleast_2d(np.asarray(router_sel, dtype=np.int64))
    est = np.atleast_2d(np.asarray(router_est, dtype=np.int64))
    e_pred, e_rad = np.asarray(expert_pred), np.asarray(expert_rad, dtype=np.float64)
    idx = np.arange(est.shape[0])
    if check_rule(rule) == "min":  # the router's own certificate picks the expert
        j, r_router = certify_rows(sel, est, sigma_e, alpha_router)
        routed = j >= 0
        pred = np.where(routed, e_pred[np.maximum(j, 0), idx], ABSTAIN)
        ok = pred != ABSTAIN
        radius = np.where(ok, np.minimum(r_router, e_rad[np.maximum(j, 0), idx]), 0.0)
        return pred, radius, j
    if rule == CASCADE:
        raise UsageError("decide_rows reads the router: the cascade is decided by certify_cascade.")
    j, lo, hi = router_bounds_rows(sel, est, alpha_router, biases)
    gaps = score_gaps_rows(j, lo, hi, sigma_e, biases)
    r_router = pairwise_rows(gaps)
    route = np.where(r_router > 0, j, ABSTAIN)
    if rule == "pairwise":
        c, r_j = e_pred[j, idx], e_rad[j, idx]
        ok = (r_router > 0) & (c != ABSTAIN)
        return np.where(ok, c, ABSTAIN), np.where(ok, np.minimum(r_router, r_j), 0.0), route
    return (*agreement_rows(j, gaps, e_pred, e_rad), route)


def simultaneous_bounds(counts, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds on every q_j at once (2E one-sided bounds at alpha / (2E) each)."""
    est = np.asarray(counts, dtype=np.int64)
    n, level = int(est.sum()), alpha / (2 * len(est))
    lo = np.atleast_1d(lower_confidence_bound(est, n, level)).astype(np.float64)
    hi = 1.0 - np.atleast_1d(lower_confidence_bound(n - est, n, level))
    return lo, hi


def predict_route_set(counts, alpha_router: float, biases=None) -> tuple[int, list[int]]:
    """PREDICT for the biased router: (route or -1, experts that may be the argmax at x).

    With all 2E bounds holding at once the leader may be picked from the same draws: k is ruled
    out when its highest score is below the leader's lowest.
    """
    lo, hi = simultaneous_bounds(counts, alpha_router)
    b = check_biases(biases, len(lo))
    low, high = _scores(lo, b), _scores(hi, b)
    j = int(np.argmax(low))
    may = [j] + [k for k in range(len(lo)) if k != j and not high[k] < low[j]]
    return (j if may == [j] else ABSTAIN), may
