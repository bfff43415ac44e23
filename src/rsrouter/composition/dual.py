"""Dual randomized smoothing: a smoothed router picks the expert, the expert certifies.

Theorem 4.2 of Sun, Mao & Vechev (ICLR 2026): if the smoothed router (global sigma_e) is
certified constant on B(x, R_sigma) with probability >= 1 - alpha_router and the chosen expert,
smoothed with its own sigma, is certified on B(x, R_c) with probability >= 1 - alpha_expert,
the composed prediction is constant on B(x, min(R_sigma, R_c)) with probability >= 1 - alpha.

A router is any base model returning (B, E) logits over the experts (or (B,) expert ids); an
expert is any base model with a ``.sigma``. Every count, bound and radius comes from
``rsrouter.smoothing``; the router draws its noise in its own stages so it never shares a
stream with the experts'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rsrouter.errors import UsageError
from rsrouter.smoothing import (
    ABSTAIN,
    ESTIMATION,
    SELECTION,
    Certificate,
    Prediction,
    check_alpha,
    check_count,
    check_inputs,
    check_seed,
    check_sigma,
    pad_counts,
    sample_counts,
    single_indices,
)

ROUTER_SELECTION, ROUTER_ESTIMATION = 2, 3  # noise stages of the router (experts use 0 and 1)


def split_alpha(alpha: float, alpha_router: float | None = None) -> tuple[float, float]:
    """(alpha_router, alpha_expert) summing to alpha; alpha_router defaults to alpha / 2."""
    alpha = check_alpha(alpha)
    if alpha_router is None:
        alpha_router = alpha / 2
    if not isinstance(alpha_router, (int, float)) or not 0 < alpha_router < alpha:
        raise UsageError(
            f"alpha_router must lie strictly between 0 and alpha={alpha}, got {alpha_router!r}."
        )
    return float(alpha_router), alpha - float(alpha_router)


@dataclass(frozen=True)
class DualCertificate:
    """The composed certificate: which expert, both radii, their minimum, and the alpha split."""

    prediction: int  # class, or -1 (abstain) when either stage abstains
    radius: float  # min(radius_router, radius_expert); 0.0 on abstention
    expert: int  # index of the routed expert, -1 when the router abstains
    radius_router: float  # R_sigma
    radius_expert: float  # R_c (0.0 when no expert was consulted)
    router: Certificate
    expert_certificate: Certificate | None
    alpha: float
    alpha_router: float
    alpha_expert: float

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    @classmethod
    def compose(cls, router: Certificate, expert: Certificate | None) -> DualCertificate:
        """Combine a router certificate with the certificate of the expert it routed to."""
        if router.abstained:
            expert = None
        elif expert is None:
            raise UsageError("the router chose an expert, but no expert certificate was given.")
        radius_expert = expert.radius if expert is not None else 0.0
        ok = expert is not None and not expert.abstained
        alpha_expert = expert.alpha if expert is not None else 0.0
        return cls(
            prediction=expert.prediction if ok else ABSTAIN,
            radius=min(router.radius, radius_expert) if ok else 0.0,
            expert=router.prediction,
            radius_router=router.radius,
            radius_expert=radius_expert,
            router=router,
            expert_certificate=expert,
            alpha=router.alpha + alpha_expert,
            alpha_router=router.alpha,
            alpha_expert=alpha_expert,
        )

    def to_dict(self) -> dict:
        return {
            "prediction": self.prediction,
            "radius": self.radius,
            "expert": self.expert,
            "radius_router": self.radius_router,
            "radius_expert": self.radius_expert,
            "router": self.router.to_dict(),
            "expert_certificate": (
                None if self.expert_certificate is None else self.expert_certificate.to_dict()
            ),
            "alpha": self.alpha,
            "alpha_router": self.alpha_router,
            "alpha_expert": self.alpha_expert,
        }


@dataclass(frozen=True)
class DualPrediction:
    """PREDICT at both stages: the router's choice, then the chosen expert's class."""

    prediction: int
    expert: int
    router: Prediction
    expert_prediction: Prediction | None
    alpha_router: float
    alpha_expert: float

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def to_dict(self) -> dict:
        return {
            "prediction": self.prediction,
            "expert": self.expert,
            "router": self.router.to_dict(),
            "expert_prediction": (
                None if self.expert_prediction is None else self.expert_prediction.to_dict()
            ),
            "alpha_router": self.alpha_router,
            "alpha_expert": self.alpha_expert,
        }


def _indices(indices: Sequence[int] | None, size: int) -> list[int]:
    """The dataset index of each of ``size`` inputs (their noise streams): 0..size-1 by default."""
    idx = list(range(size)) if indices is None else [int(i) for i in indices]
    if len(idx) != size:
        raise UsageError(f"indices has {len(idx)} entries for {size} inputs.")
    return idx


def _pad_pair(sel: torch.Tensor, est: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    sel, est = pad_counts(sel, est)
    return sel.numpy(), est.numpy()


class DualSmoothed:
    """A router smoothed at ``sigma_e`` over ``experts`` (each smoothed at its own ``.sigma``).

    ``router`` maps noisy [0, 1] inputs to (B, len(experts)) logits; router output i is
    ``experts[i]``. Usable on its own, without a workspace.
    """

    def __init__(
        self,
        router: Callable[[torch.Tensor], torch.Tensor],
        sigma_e: float,
        experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    ):
        self.router = router
        self.sigma_e = check_sigma(sigma_e)
        self.experts = list(experts)
        if not self.experts:
            raise UsageError("dual smoothing needs at least one expert.")
        for i, expert in enumerate(self.experts):
            if not hasattr(expert, "sigma"):
                raise UsageError(f"expert {i} has no .sigma: bind each expert to its noise level.")
            check_sigma(expert.sigma)
        width = getattr(router, "num_classes", None)
        if isinstance(width, int) and width != len(self.experts):
            raise UsageError(
                f"the router chooses among {width} experts, but {len(self.experts)} were given."
            )

    @property
    def sigmas(self) -> list[float]:
        return [float(e.sigma) for e in self.experts]

    # ------------------------------------------------------------ sampling

    def _eval(self) -> None:
        for model in (self.router, *self.experts):
            if isinstance(model, torch.nn.Module):
                model.eval()

    def _routes(self, counts: torch.Tensor) -> None:
        if counts.shape[1] > len(self.experts):
            raise UsageError(
                f"the router chose expert {counts.shape[1] - 1}, "
                f"but only {len(self.experts)} experts are configured."
            )

    def router_counts(
        self, xs: torch.Tensor, *, n0: int, n: int, indices=None, **sampling
    ) -> tuple[np.ndarray, np.ndarray]:
        """Selection (n0) and estimation (n) counts of the router, (N, E) each."""
        self._eval()
        width = len(self.experts)
        kw = {"num_classes": width, "indices": indices, **sampling}
        sel = sample_counts(self.router, xs, self.sigma_e, n0, stage=ROUTER_SELECTION, **kw)
        est = sample_counts(self.router, xs, self.sigma_e, n, stage=ROUTER_ESTIMATION, **kw)
        self._routes(sel)
        self._routes(est)
        return _pad_pair(sel, est)

    def expert_counts(
        self, i: int, xs: torch.Tensor, *, n0: int, n: int, indices=None, **sampling
    ) -> tuple[np.ndarray, np.ndarray]:
        """Selection and estimation counts of expert i (stages 0 and 1, as standard CERTIFY)."""
        self._eval()
        expert, sigma = self.experts[i], self.sigmas[i]
        kw = {"num_classes": getattr(expert, "num_classes", None), "indices": indices, **sampling}
        sel = sample_counts(expert, xs, sigma, n0, stage=SELECTION, **kw)
        est = sample_counts(expert, xs, sigma, n, stage=ESTIMATION, **kw)
        return _pad_pair(sel, est)

    # ------------------------------------------------------------ CERTIFY

    def certify_batch(
        self,
        xs: torch.Tensor,
        *,
        n0: int = 100,
        n: int = 10_000,
        alpha: float = 0.001,
        alpha_router: float | None = None,
        seed: int | None = None,
        indices: Sequence[int] | None = None,
        **sampling,
    ) -> list[DualCertificate]:
        """CERTIFY the router, then CERTIFY only the routed expert, for every input of ``xs``."""
        xs = check_inputs(xs, batched=True)
        n0, n = check_count("n0", n0), check_count("n", n)
        a_router, a_expert = split_alpha(alpha, alpha_router)
        seed, idx = check_seed(seed), _indices(indices, len(xs))
        sel, est = self.router_counts(xs, n0=n0, n=n, indices=idx, seed=seed, **sampling)
        routers = [
            Certificate.from_counts(s, e, self.sigma_e, a_router)
            for s, e in zip(sel, est, strict=True)
        ]
        experts: list[Certificate | None] = [None] * len(xs)
        for i in range(len(self.experts)):
            rows = [k for k, c in enumerate(routers) if c.prediction == i]
            if not rows:
                continue
            e_sel, e_est = self.expert_counts(
                i, xs[rows], n0=n0, n=n, indices=[idx[k] for k in rows], seed=seed, **sampling
            )
            for k, s, e in zip(rows, e_sel, e_est, strict=True):
                experts[k] = Certificate.from_counts(s, e, self.sigmas[i], a_expert)
        return [DualCertificate.compose(r, e) for r, e in zip(routers, experts, strict=True)]

    def certify(self, x: torch.Tensor, *, index: int | None = None, **kwargs) -> DualCertificate:
        """Dual CERTIFY for one input; with a ``seed``, ``index`` names its noise stream."""
        x = check_inputs(x, batched=False)
        idx = single_indices(kwargs.get("seed"), index, kwargs.pop("indices", None))
        return self.certify_batch(x.unsqueeze(0), indices=idx, **kwargs)[0]

    # ------------------------------------------------------------ PREDICT

    def predict_batch(
        self,
        xs: torch.Tensor,
        *,
        n: int = 10_000,
        alpha: float = 0.001,
        alpha_router: float | None = None,
        seed: int | None = None,
        indices: Sequence[int] | None = None,
        **sampling,
    ) -> list[DualPrediction]:
        """PREDICT the router at alpha_router, then PREDICT the chosen expert at the rest."""
        xs = check_inputs(xs, batched=True)
        n = check_count("n", n)
        a_router, a_expert = split_alpha(alpha, alpha_router)
        seed, idx = check_seed(seed), _indices(indices, len(xs))
        self._eval()
        counts = sample_counts(
            self.router,
            xs,
            self.sigma_e,
            n,
            stage=ROUTER_ESTIMATION,
            num_classes=len(self.experts),
            seed=seed,
            indices=idx,
            **sampling,
        )
        self._routes(counts)
        routers = [Prediction.from_counts(c, a_router) for c in counts.numpy()]
        experts: list[Prediction | None] = [None] * len(xs)
        for i, expert in enumerate(self.experts):
            rows = [k for k, p in enumerate(routers) if p.prediction == i]
            if not rows:
                continue
            c = sample_counts(
                expert,
                xs[rows],
                self.sigmas[i],
                n,
                stage=ESTIMATION,
                num_classes=getattr(expert, "num_classes", None),
                seed=seed,
                indices=[idx[k] for k in rows],
                **sampling,
            )
            for k, row in zip(rows, c.numpy(), strict=True):
                experts[k] = Prediction.from_counts(row, a_expert)
        return [
            DualPrediction(
                prediction=e.prediction if e is not None else ABSTAIN,
                expert=r.prediction,
                router=r,
                expert_prediction=e,
                alpha_router=a_router,
                alpha_expert=a_expert,
            )
            for r, e in zip(routers, experts, strict=True)
        ]

    def predict(self, x: torch.Tensor, *, index: int | None = None, **kwargs) -> DualPrediction:
        """Dual PREDICT for one input; with a ``seed``, ``index`` names its noise stream."""
        x = check_inputs(x, batched=False)
        idx = single_indices(kwargs.get("seed"), index, kwargs.pop("indices", None))
        return self.predict_batch(x.unsqueeze(0), indices=idx, **kwargs)[0]
