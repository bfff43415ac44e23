"""Dual randomized smoothing: a smoothed router picks the expert, the expert certifies.

Theorem 4.2 of Sun, Mao & Vechev (ICLR 2026): if the smoothed router (global sigma_e) is
certified constant on B(x, R_sigma) with probability >= 1 - alpha_router and the chosen expert,
smoothed with its own sigma, is certified on B(x, R_c) with probability >= 1 - alpha_expert,
the composed prediction is constant on B(x, min(R_sigma, R_c)) with probability >= 1 - alpha.

A router is any base model returning (B, E) logits over the experts (or (B,) expert ids); an
expert is any base model with a ``.sigma``. Every count, bound and radius comes from
``rsrouter.smoothing``; the router draws its noise in its own stages so it never shares a
stream with the experts'.

``rule`` picks how the router's and the experts' certificates combine (rules.py): "min" is the
theorem above; "pairwise" bounds every router output at once (and honours fixed router
biases); "agreement" certifies wherever every expert the router may pick agrees; "cascade"
reads no router: the experts gate themselves with thresholds fitted on val (cascade.py), at
the whole alpha. ``decide`` turns stored counts into the certificate of any rule without
running a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rsrouter.composition.cascade import (
    certify_cascade,
    check_cascade,
    decide_cascade,
    predict_bounds,
)
from rsrouter.composition.rules import (
    CASCADE,
    DEFAULT_RULE,
    agreement_radius,
    check_biases,
    check_rule,
    pairwise_radius,
    predict_route_set,
    router_bounds,
    score_gaps,
)
from rsrouter.errors import UsageError
from rsrouter.smoothing import (
    ABSTAIN,
    ESTIMATION,
    ROUTER_ESTIMATION,
    ROUTER_SELECTION,
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
    """The composed certificate: which expert, both radii, the composed radius, the alpha split."""

    prediction: int  # class, or -1 (abstain)
    radius: float  # min(radius_router, radius_expert) for min/pairwise; 0.0 on abstention
    expert: int  # index of the routed expert, -1 when the route is not certified at x
    radius_router: float  # R_sigma of the rule (inf: one expert, or the cascade: no router)
    radius_expert: float  # R_c of the routed (or leading) expert, 0.0 when none was consulted
    router: Certificate | None  # the router's counts (its radius is the min rule's R_sigma);
    # None for the cascade, which samples no router
    expert_certificate: Certificate | None
    alpha: float
    alpha_router: float
    alpha_expert: float  # the experts' share in all (agreement: alpha_expert / E each)
    rule: str = DEFAULT_RULE
    expert_certificates: tuple[Certificate | None, ...] = ()  # agreement: every expert's

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
            "router": None if self.router is None else self.router.to_dict(),
            "expert_certificate": (
                None if self.expert_certificate is None else self.expert_certificate.to_dict()
            ),
            "alpha": self.alpha,
            "alpha_router": self.alpha_router,
            "alpha_expert": self.alpha_expert,
            "rule": self.rule,
            "expert_certificates": [
                None if c is None else c.to_dict() for c in self.expert_certificates
            ],
        }


def decide(
    rule: str,
    router_counts: tuple | None,
    expert_counts: Sequence[tuple | None],
    *,
    sigma_e: float,
    sigmas: Sequence[float],
    alpha_router: float,
    alpha_expert: float,
    biases=None,
    cascade=None,
) -> DualCertificate:
    """The certificate of ``rule`` from stored counts: (selection, estimation) of the router and
    of each expert (None for an expert the rule does not read, see ``experts_needed``; the
    router's may be None for the cascade, which reads none).

    "min" routes by the plain argmax and ignores ``biases``. "cascade" needs ``cascade`` (a
    checked CascadeSpec), ignores the router's counts and spends alpha_router + alpha_expert on
    the experts.
    """
    width = len(sigmas)
    if router_counts is None:  # a run that sampled no router decides the cascade alone
        if check_rule(rule) != CASCADE:
            raise UsageError(f"the {rule} rule reads the router's counts; none were sampled.")
        router = None
    else:
        sel, est = (np.pad(np.asarray(c), (0, width - len(c))) for c in router_counts)
        router = Certificate.from_counts(sel, est, sigma_e, alpha_router)

    def cert(i: int, level: float) -> Certificate:
        if expert_counts[i] is None:
            raise UsageError(f"the {rule} rule needs the counts of expert {i}.")
        return Certificate.from_counts(*expert_counts[i], sigmas[i], level)

    if check_rule(rule) == CASCADE:
        if cascade is None:
            raise UsageError(NO_CASCADE)
        alpha = alpha_router + alpha_expert
        certs = [cert(i, alpha / width) for i in range(width)]
        c, radius, stage = decide_cascade(cascade, expert_counts, sigmas, alpha)
        return DualCertificate(
            prediction=c, radius=radius, expert=stage, radius_router=np.inf,
            radius_expert=certs[stage].radius if stage >= 0 else 0.0, router=router,
            expert_certificate=certs[stage] if stage >= 0 else None, alpha=alpha,
            alpha_router=0.0, alpha_expert=alpha, rule=rule, expert_certificates=tuple(certs),
        )  # fmt: skip

    if check_rule(rule) == "min":
        chosen = None if router.abstained else cert(router.prediction, alpha_expert)
        return DualCertificate.compose(router, chosen)
    j, lo, hi = router_bounds(sel, est, alpha_router, biases)
    gaps = score_gaps(j, lo, hi, sigma_e, biases)
    r_router = pairwise_radius(gaps)
    common = {
        "expert": j if r_router > 0 else ABSTAIN,
        "radius_router": r_router,
        "router": router,
        "alpha": alpha_router + alpha_expert,
        "alpha_router": alpha_router,
        "alpha_expert": alpha_expert,
        "rule": rule,
    }
    if rule == "pairwise":
        chosen = cert(j, alpha_expert) if r_router > 0 else None
        ok = chosen is not None and not chosen.abstained
        return DualCertificate(
            prediction=chosen.prediction if ok else ABSTAIN,
            radius=min(r_router, chosen.radius) if ok else 0.0,
            radius_expert=chosen.radius if chosen is not None else 0.0,
            expert_certificate=chosen,
            **common,
        )
    certs = [cert(i, alpha_expert / width) for i in range(width)]
    c, radius = agreement_radius(j, gaps, [x.prediction for x in certs], [x.radius for x in certs])
    return DualCertificate(
        prediction=c,
        radius=radius,
        radius_expert=certs[j].radius,
        expert_certificate=certs[j],
        expert_certificates=tuple(certs),
        **common,
    )


NO_CASCADE = (
    "the cascade rule needs a fitted cascade: `router train --kind gate` or `--kind class-gate` "
    "fits one on the val split."
)


def experts_needed(
    rule: str, router_counts: tuple | None, width: int, alpha_router: float, biases=None
):
    """The experts whose counts ``decide`` reads for this input (the rule's sampling cost; the
    cascade and agreement read every expert, whatever the router's counts, which may be None)."""
    if check_rule(rule) in ("agreement", CASCADE):
        return list(range(width))
    sel, est = (np.pad(np.asarray(c), (0, width - len(c))) for c in router_counts)
    if rule == "min":  # whether the router abstains does not depend on sigma_e: 1.0 stands in
        router = Certificate.from_counts(sel, est, 1.0, alpha_router)
        return [] if router.abstained else [router.prediction]
    j, lo, hi = router_bounds(sel, est, alpha_router, biases)  # the same, for the sign of R_sigma
    return [j] if pairwise_radius(score_gaps(j, lo, hi, 1.0, biases)) > 0 else []


@dataclass(frozen=True)
class DualPrediction:
    """PREDICT at both stages: the router's choice, then the chosen expert's class."""

    prediction: int
    expert: int  # the route, -1 when the router cannot tell one
    router: Prediction  # the router's counts (its prediction is the min rule's)
    expert_prediction: Prediction | None
    alpha_router: float
    alpha_expert: float
    rule: str = DEFAULT_RULE
    consulted: tuple[int, ...] = ()  # experts asked (agreement: each that may be the route)

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
            "rule": self.rule,
            "consulted": list(self.consulted),
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
    ``experts[i]``. ``rule`` is one of rules.RULES; ``biases`` (one per expert, fixed before
    the test data) shift the router's scores for the "pairwise" and "agreement" rules, and the
    paper's "min" rule ignores them. Usable on its own, without a workspace.
    """

    def __init__(
        self,
        router: Callable[[torch.Tensor], torch.Tensor],
        sigma_e: float,
        experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        *,
        rule: str = DEFAULT_RULE,
        biases: Sequence[float] | None = None,
        cascade=None,
    ):
        self.router = router
        self.sigma_e = check_sigma(sigma_e)
        self.experts = list(experts)
        self.rule = check_rule(rule)
        if not self.experts:
            raise UsageError("dual smoothing needs at least one expert.")
        self.biases = check_biases(biases, len(self.experts))
        for i, expert in enumerate(self.experts):
            if not hasattr(expert, "sigma"):
                raise UsageError(f"expert {i} has no .sigma: bind each expert to its noise level.")
            check_sigma(expert.sigma)
        self.cascade = None
        if cascade is not None:
            classes = {getattr(e, "num_classes", None) for e in self.experts}
            if len(classes) != 1 or None in classes:
                raise UsageError("a cascade needs experts that all state one class count.")
            self.cascade = check_cascade(cascade, len(self.experts), classes.pop())
        if self.rule == CASCADE and self.cascade is None:
            raise UsageError(NO_CASCADE)
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
        """CERTIFY the router, then the experts the rule reads (min, pairwise: the routed one)."""
        xs = check_inputs(xs, batched=True)
        n0, n = check_count("n0", n0), check_count("n", n)
        a_router, a_expert = split_alpha(alpha, alpha_router)
        seed, idx = check_seed(seed), _indices(indices, len(xs))
        width = len(self.experts)
        if self.rule == CASCADE:  # no router to sample
            routers = [None] * len(xs)
        else:
            sel, est = self.router_counts(xs, n0=n0, n=n, indices=idx, seed=seed, **sampling)
            routers = list(zip(sel, est, strict=True))
        needs = [experts_needed(self.rule, r, width, a_router, self.biases) for r in routers]
        counts: list[list[tuple | None]] = [[None] * width for _ in range(len(xs))]
        for i in range(width):
            rows = [k for k, need in enumerate(needs) if i in need]
            if not rows:
                continue
            e_sel, e_est = self.expert_counts(
                i, xs[rows], n0=n0, n=n, indices=[idx[k] for k in rows], seed=seed, **sampling
            )
            for k, s, e in zip(rows, e_sel, e_est, strict=True):
                counts[k][i] = (s, e)
        return [
            decide(
                self.rule,
                r,
                c,
                sigma_e=self.sigma_e,
                sigmas=self.sigmas,
                alpha_router=a_router,
                alpha_expert=a_expert,
                biases=self.biases,
                cascade=self.cascade,
            )
            for r, c in zip(routers, counts, strict=True)
        ]

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
        """PREDICT the router at alpha_router, then the expert(s) it may pick at the rest.

        min: the router's binomial test, then the routed expert. pairwise: simultaneous bounds
        on every router output must single out the route. agreement: every expert that may be
        the route (each at alpha_expert / E) must PREDICT the same class.
        """
        xs = check_inputs(xs, batched=True)
        n = check_count("n", n)
        a_router, a_expert = split_alpha(alpha, alpha_router)
        seed, idx = check_seed(seed), _indices(indices, len(xs))
        self._eval()
        if self.rule == CASCADE:
            return self._predict_cascade(xs, n=n, alpha=alpha, seed=seed, indices=idx, **sampling)
        width = len(self.experts)
        counts = sample_counts(
            self.router,
            xs,
            self.sigma_e,
            n,
            stage=ROUTER_ESTIMATION,
            num_classes=width,
            seed=seed,
            indices=idx,
            **sampling,
        )
        self._routes(counts)
        counts = pad_counts(counts, torch.zeros(1, width, dtype=counts.dtype))[0].numpy()
        routers = [Prediction.from_counts(c, a_router) for c in counts]
        plans = [self._predict_plan(c, p, a_router) for c, p in zip(counts, routers, strict=True)]
        level = a_expert / width if self.rule == "agreement" else a_expert
        answers: list[dict[int, Prediction]] = [{} for _ in range(len(xs))]
        for i, expert in enumerate(self.experts):
            rows = [k for k, (_, ask) in enumerate(plans) if i in ask]
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
                answers[k][i] = Prediction.from_counts(row, level)
        out = []
        for r, (route, ask), got in zip(routers, plans, answers, strict=True):
            classes = {got[i].prediction for i in ask}
            agreed = len(classes) == 1 and ABSTAIN not in classes
            out.append(
                DualPrediction(
                    prediction=classes.pop() if agreed else ABSTAIN,
                    expert=route,
                    router=r,
                    expert_prediction=got[ask[0]] if ask else None,
                    alpha_router=a_router,
                    alpha_expert=a_expert,
                    rule=self.rule,
                    consulted=tuple(ask),
                )
            )
        return out

    def _predict_cascade(self, xs, *, n, alpha, seed, indices, **sampling):
        """The cascade's PREDICT: n draws of every expert, both bounds on every class (so the top
        class may come from the same draws); the class g is certified to at x, else abstain."""
        counts = [
            sample_counts(expert, xs, self.sigmas[i], n, stage=ESTIMATION, seed=seed,
                          num_classes=getattr(expert, "num_classes", None), indices=indices,
                          **sampling).numpy()
            for i, expert in enumerate(self.experts)
        ]  # fmt: skip
        pred, _, stage = certify_cascade(predict_bounds(counts, self.sigmas, alpha), self.cascade)
        empty = Prediction.from_counts(np.zeros(len(self.experts), dtype=np.int64), alpha)
        return [
            DualPrediction(
                prediction=int(c),
                expert=int(e),
                router=empty,
                expert_prediction=None if e < 0 else Prediction.from_counts(counts[e][k], alpha),
                alpha_router=0.0,
                alpha_expert=alpha,
                rule=self.rule,
                consulted=tuple(range(len(self.experts))),
            )  # fmt: skip
            for k, (c, e) in enumerate(zip(pred, stage, strict=True))
        ]

    def _predict_plan(self, counts, router: Prediction, a_router: float):
        """(route or -1, experts to ask) for one input's router counts."""
        if self.rule == "min":
            return router.prediction, ([] if router.abstained else [router.prediction])
        route, may = predict_route_set(counts, a_router, self.biases)
        return route, (may if self.rule == "agreement" else ([route] if route >= 0 else []))

    def predict(self, x: torch.Tensor, *, index: int | None = None, **kwargs) -> DualPrediction:
        """Dual PREDICT for one input; with a ``seed``, ``index`` names its noise stream."""
        x = check_inputs(x, batched=False)
        idx = single_indices(kwargs.get("seed"), index, kwargs.pop("indices", None))
        return self.predict_batch(x.unsqueeze(0), indices=idx, **kwargs)[0]
