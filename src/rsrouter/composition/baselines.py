"""Baselines computed from stored counts: the Multiscale cascade and the oracle.

MULTISCALE_LABEL is our re-implementation of the cascade rule of Jeong & Shin (2024,
"Multi-scale Diffusion Denoised Smoothing"), not their code. Stages run from the largest sigma
to the smallest, each at level alpha / K (K stages), so by a union bound every bound below holds
at once with probability >= 1 - alpha. Per stage k (c_k = its top class from the selection
draws): a lower Clopper-Pearson bound lo_k on p_k(c_k) at level alpha / (2K) and an upper bound
up_k(c) on every class probability at alpha / (2K C) each (C classes, Bonferroni).
Stage k fires when lo_k >= p_skip and predicts c_k with R_k = sigma_k (Phi^-1(lo_k) -
Phi^-1(p_skip)); when up_k(c_k) >= p_skip it can neither fire nor be ruled out and the cascade
abstains; otherwise it falls to the next smaller sigma. An earlier stage j must not fire with
another class anywhere in the ball, so R is capped by sigma_j (Phi^-1(p_skip) - Phi^-1(u_j)),
u_j = max over c != y of up_j(c) (also <= 1 - lo_j for c != c_j). Phi^-1(p) of a smoothed
classifier moves by at most ||delta|| / sigma (Salman et al. 2019), which gives both terms.
Their code bounds the off-class probabilities with a multinomial (Goodman) interval instead.

The oracle is the best single expert per input using the label: not a certificate. So is the
ceiling of the Multiscale-keeping cascades (``keep_multiscale_ceiling``): how far any cascade
whose first stage is the largest sigma at 1/2 could certify each input's label, from its bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

from rsrouter.composition.cascade import (
    CascadeSpec,
    StageBounds,
    certify_cascade,
    multiscale_spec,
    stage_bounds,
)
from rsrouter.errors import UsageError
from rsrouter.smoothing import ABSTAIN, Certificate, check_alpha

KEEP_CEILING_LABEL = "ceiling of every Multiscale-keeping cascade — not a certificate"
MULTISCALE_LABEL = "Multiscale (cascade rule of Jeong & Shin 2024, our re-implementation)"
ORACLE_LABEL = "oracle — not a certificate"


@dataclass(frozen=True)
class MultiscaleResult:
    prediction: int  # class, or -1 (abstain)
    radius: float
    stage: int  # index (in the given expert order) of the stage that fired, -1 if none
    sigma: float  # that stage's sigma, 0.0 if none
    alpha: float
    p_skip: float
    evaluated: tuple[int, ...] = ()  # experts the cascade had to sample, in cascade order

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def to_dict(self) -> dict:
        return asdict(self)


def _bounds(cert: Certificate, level: float) -> tuple[float, np.ndarray]:
    """lo on p(selected) at level / 2; upper bounds on every class at level / (2 C) each (the
    cascade's stage bounds, of which this cascade is a special case)."""
    b = stage_bounds(cert.selection_counts, cert.counts, cert.sigma, level)
    return float(b.lo[0]), b.up[0]


def _ppf(p: float) -> float:
    return float(norm.ppf(min(max(p, 0.0), 1.0)))


def multiscale(
    stages: Sequence[Certificate], alpha: float, *, p_skip: float = 0.5
) -> MultiscaleResult:
    """The cascade over the experts' stored counts (one Certificate per expert, any order).

    Only the counts and sigma of each certificate are used; its own alpha is ignored.
    """
    alpha = check_alpha(alpha)
    if not stages:
        raise UsageError("the Multiscale cascade needs at least one expert.")
    if not 0.5 <= p_skip < 1:
        raise UsageError(f"p_skip must lie in [0.5, 1), got {p_skip!r}.")
    level = alpha / len(stages)
    order = sorted(range(len(stages)), key=lambda i: -stages[i].sigma)  # largest sigma first
    passed: list[tuple[Certificate, np.ndarray]] = []
    z_skip = _ppf(p_skip)
    for k, i in enumerate(order):
        cert = stages[i]
        none = MultiscaleResult(ABSTAIN, 0.0, -1, 0.0, alpha, p_skip, tuple(order[: k + 1]))
        lo, up = _bounds(cert, level)
        hi = float(up[cert.selected]) if cert.selected < len(up) else 0.0
        if lo >= p_skip and lo > 0.5:
            y = cert.selected
            radius = cert.sigma * (_ppf(lo) - z_skip)
            for prev, prev_up in passed:
                off = np.delete(prev_up, y) if y < len(prev_up) else prev_up
                u = float(off.max()) if len(off) else 0.0
                radius = min(radius, prev.sigma * (z_skip - _ppf(u)))
            if not radius > 0:
                return none
            return MultiscaleResult(
                y, float(radius), i, cert.sigma, alpha, p_skip, tuple(order[: k + 1])
            )
        if hi >= p_skip:
            return none
        passed.append((cert, up))
    return none  # every stage fell through


def oracle(certificates: Sequence[Certificate], label: int) -> tuple[int, float]:
    """(expert, radius): the largest radius among experts correct on ``label``; (-1, 0.0) if none.

    It reads the label, so it is the ceiling a perfect router could reach, not a certificate.
    """
    radii = [c.radius if c.prediction == label else 0.0 for c in certificates]
    best = int(np.argmax(radii)) if radii else -1
    if best < 0 or radii[best] <= 0:
        return ABSTAIN, 0.0
    return best, float(radii[best])


def keep_multiscale_ceiling(bounds: Sequence[StageBounds], labels) -> np.ndarray:
    """Per input, the largest radius at which ANY cascade whose first stage is the largest sigma
    at tau = 1/2 for every class (the ``keep-multiscale`` family, which keeps every certificate
    Multiscale gives with that sigma) certifies the label from these bounds (0 where none does).
    It reads the label: the ceiling of the family, not a certificate.

    Why it bounds every member: stage 1 is the same in all of them, so its R_1 is too. A later
    stage s with class c_s has R_s = min(sure_s(tau_s), caps of the stages before it), and
    tau_s >= 1/2 only lowers sure_s, each cap only lowers R_s: so R_s <= min(sure_s(1/2), stage 1's
    caps off c_s), which is what s certifies right after stage 1 at 1/2. The certificate is the
    largest R_s. Each input's ceiling is reached by a member (the largest sigma, then the stage
    that gives it, then the rest, all at 1/2): the maximum of those K - 1 cascades' certificates
    of the label, computed by ``certify_cascade`` itself."""
    labels = np.asarray(labels, dtype=np.int64)
    sigmas = [b.sigma for b in bounds]
    classes = bounds[0].up.shape[1]
    big = multiscale_spec(sigmas, classes).order[0]
    others = [i for i in range(len(bounds)) if i != big]
    orders = [(big, j, *(i for i in others if i != j)) for j in others] or [(big,)]
    best = np.zeros(len(labels))
    for order in orders:
        spec = CascadeSpec(order, tuple((0.5,) * classes for _ in order))
        pred, radius, _ = certify_cascade(bounds, spec)
        best = np.maximum(best, np.where(pred == labels, radius, 0.0))
    return best
