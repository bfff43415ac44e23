"""Composition rules against ground truth: a bucket router and threshold experts along one line.

Every model reads only s = u.x, so Gaussian noise acts through s + N(0, sigma^2) and everything
is closed form: the router's votes q_j(s) = Phi((t_j - s) / sigma_e) - Phi((t_{j-1} - s) /
sigma_e), expert j's smoothed class 1[a_j (s - tau_j) > 0]. The composed smoothed classifier
h(s) (the biased argmax route, then that expert's smoothed class) changes only at the route's
breakpoints and the experts' thresholds, so its true robust radius at s is the distance to the
nearest point where it changes. Counts are drawn from the exact probabilities; a certificate
fails when it names a class other than h(s) or a radius beyond the true one.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
import torch
from scipy.special import ndtr, ndtri
from scipy.stats import binom, norm

from rsrouter.composition import DualSmoothed
from rsrouter.composition.dual import decide, split_alpha
from rsrouter.composition.rules import (
    RULES,
    agreement_radius,
    agreement_sweep,
    check_biases,
    leader,
    pairwise_radius,
    predict_route_set,
    router_bounds,
    score_gaps,
)
from rsrouter.errors import UsageError
from rsrouter.smoothing import ABSTAIN, Certificate

TOL = 1e-7


class World:
    """A random bucket router (E outputs, biased) over E threshold experts, all along s."""

    def __init__(self, seed: int, width: int = 3, sigma_e: float = 0.5, biased: bool = True,
                 mapping=None):  # fmt: skip
        rng = np.random.default_rng(seed)
        self.width, self.sigma_e = width, sigma_e
        # bucket k of s votes for expert mapping[k] (default: bucket j for expert j)
        self.mapping = np.arange(width) if mapping is None else np.asarray(mapping)
        self.t = np.sort(rng.uniform(-0.8, 0.8, len(self.mapping) - 1))
        self.b = rng.normal(0, 0.4, width) if biased else np.zeros(width)
        self.sigmas = rng.choice([0.25, 0.5, 1.0], width)
        self.a = rng.choice([-1.0, 1.0], width)
        self.tau = rng.uniform(-1.2, 1.2, width)
        grid = np.linspace(self.t[0] - 8 * sigma_e, self.t[-1] + 8 * sigma_e, 20_001)
        routes = self.route(grid)
        cuts = np.nonzero(routes[1:] != routes[:-1])[0]
        self.route_points = np.array([self._bisect(grid[i], grid[i + 1]) for i in cuts])
        candidates = np.concatenate([self.route_points, self.tau])
        flips = self.h(candidates - 1e-9) != self.h(candidates + 1e-9)
        self.h_points = candidates[flips]

    def q(self, s) -> np.ndarray:
        """(len(s), E) exact router vote shares (upper tails where they are the accurate side)."""
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))[:, None]
        edges = np.concatenate([[-np.inf], self.t, [np.inf]])
        lo, hi = (edges[None, :-1] - s) / self.sigma_e, (edges[None, 1:] - s) / self.sigma_e
        buckets = np.where(lo > 0, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))
        return np.stack([buckets[:, self.mapping == j].sum(1) for j in range(self.width)], 1)

    def route(self, s) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.argmax(ndtri(self.q(s)) + self.b, axis=1)

    def _bisect(self, left: float, right: float) -> float:
        start = self.route(left)[0]
        for _ in range(60):
            mid = (left + right) / 2
            left, right = (mid, right) if self.route(mid)[0] == start else (left, mid)
        return (left + right) / 2

    def expert_p1(self, s) -> np.ndarray:
        """(len(s), E) probability that expert j says class 1 under its own noise."""
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))[:, None]
        return ndtr(self.a * (s - self.tau) / self.sigmas)

    def h(self, s) -> np.ndarray:
        s = np.atleast_1d(np.asarray(s, dtype=np.float64))
        j = self.route(s)
        return (self.a[j] * (s - self.tau[j]) > 0).astype(int)

    def route_radius(self, s: float) -> float:
        return float(np.min(np.abs(self.route_points - s), initial=np.inf))

    def h_radius(self, s: float) -> float:
        return float(np.min(np.abs(self.h_points - s), initial=np.inf))

    def counts(self, s: float, n0: int, n: int, rng):
        """Router (selection, estimation) counts and each expert's, drawn from the truth."""
        q = self.q(s)[0]
        router = (rng.multinomial(n0, q), rng.multinomial(n, q))
        experts = []
        for p in self.expert_p1(s)[0]:
            k0, k = rng.binomial(n0, p), rng.binomial(n, p)
            experts.append(([n0 - k0, k0], [n - k, k]))
        return router, experts


@cache
def _cases(biased: bool = True, worlds: int = 20, per_world: int = 60, seed: int = 0):
    """(world, s, h(s), true radius of h at s): s near the boundaries, where radii are tight.

    Two worlds in three have router biases when ``biased``; none otherwise (the min rule
    certifies the plain argmax, a different composed classifier when there are biases).
    """
    rng = np.random.default_rng(seed)
    out = []
    for w in range(worlds):
        world = World(seed + w, width=3 + w % 2, biased=biased and w % 3 != 0)
        for s in rng.uniform(world.t[0] - 0.6, world.t[-1] + 0.6, per_world):
            out.append((world, float(s), int(world.h(s)[0]), world.h_radius(float(s))))
    return tuple(out)


def gate_world(seed: int, width: int = 3) -> World:
    """A class gate along s: the sigma_e copy predicts class [s' > c] on a draw and is less sure
    near c, so its per-class entropy thresholds cut s' into bands (far left, near left, near
    right, far right, ...), each sent to some expert; several bands may share one."""
    rng = np.random.default_rng(10_000 + seed)
    bands = width + 1 + seed % 2
    mapping = rng.permutation(
        np.concatenate([np.arange(width), rng.integers(0, width, bands - width)])
    )
    return World(seed, width=width, biased=False, mapping=mapping)


@cache
def _gate_cases(worlds: int = 20, per_world: int = 60, seed: int = 5):
    rng = np.random.default_rng(seed)
    out = []
    for w in range(worlds):
        world = gate_world(seed + w, width=2 + w % 2)
        for s in rng.uniform(world.t[0] - 0.6, world.t[-1] + 0.6, per_world):
            out.append((world, float(s), int(world.h(s)[0]), world.h_radius(float(s))))
    return tuple(out)


N0, N, ALPHA = 30, 300, 0.02
A_ROUTER, A_EXPERT = split_alpha(ALPHA)


def _run(decider, seed=1, biased=True, cases=None):
    """Failures, certified inputs, mean certified / true radius, and the decisions."""
    rng = np.random.default_rng(seed)
    failures, certified, ratios, out = 0, 0, [], []
    for world, s, cls, truth in _cases(biased) if cases is None else cases:
        router, experts = world.counts(s, N0, N, rng)
        pred, radius, extra = decider(world, router, experts)
        if pred != ABSTAIN:
            certified += 1
            failures += pred != cls or radius > truth + TOL
            ratios.append(min(radius / truth, 1.0))
        out.append((world, s, pred, radius, extra))
    return failures, certified, float(np.mean(ratios)), out


def _rule(rule):
    def decider(world, router, experts):
        c = decide(
            rule, router, experts, sigma_e=world.sigma_e, sigmas=world.sigmas,
            alpha_router=A_ROUTER, alpha_expert=A_EXPERT, biases=world.b,
        )  # fmt: skip
        return c.prediction, c.radius, c

    return decider


def _limit(cases: int) -> float:
    return binom.isf(1e-6, cases, ALPHA)


CASES = 20 * 60


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_sound_on_ground_truth(rule):
    failures, certified, ratio, out = _run(_rule(rule), biased=rule != "min")
    assert failures <= _limit(CASES)
    assert certified > CASES / 2 and ratio > 0.3  # certifies often, not trivially small radii
    if rule == "agreement":  # it certifies where the router cannot tell the route
        rescued = [c for *_, c in out if c.radius_router == 0 and not c.abstained]
        assert len(rescued) > 20


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_is_sound_for_class_gates_on_ground_truth(rule):
    """Gate and class-gate routers send several bands of their score to one expert: the votes
    for an expert are a sum over bands, and every rule must stay sound on them."""
    cases = _gate_cases()
    assert any(len(set(w.mapping)) < len(w.mapping) for w, *_ in cases)  # bands shared
    failures, certified, ratio, _ = _run(_rule(rule), seed=3, cases=cases)
    assert failures <= _limit(len(cases))
    assert certified > len(cases) / 2 and ratio > 0.3


def test_pairwise_router_radius_is_sound_and_beats_the_majority_radius():
    rng = np.random.default_rng(2)
    failures, routed, wider = 0, 0, 0
    for world, s, *_ in _cases():
        (sel, est), _ = world.counts(s, N0, N, rng)
        j, lo, hi = router_bounds(sel, est, A_ROUTER, world.b)
        r = pairwise_radius(score_gaps(j, lo, hi, world.sigma_e, world.b))
        if r > 0:
            routed += 1
            failures += j != world.route(s)[0] or r > world.route_radius(s) + TOL
        if not world.b.any():  # the plain argmax: compare with sigma_e Phi^-1(q_lo)
            wider += r > Certificate.from_counts(sel, est, world.sigma_e, A_ROUTER).radius
    assert failures <= binom.isf(1e-6, CASES, A_ROUTER)
    assert routed > CASES / 2 and wider > 100


# ---------------------------------------------------------------- the check catches unsound rules


def _plug_in_pairwise(world, router, experts):
    """UNSOUND: vote shares taken as exact probabilities (no confidence bounds at all)."""
    sel, est = router
    share = np.asarray(est) / np.sum(est)
    j = leader(sel, world.b)
    r = pairwise_radius(score_gaps(j, share[j], share, world.sigma_e, world.b))
    votes = np.asarray(experts[j][1])
    c = int(np.argmax(votes))
    r_c = world.sigmas[j] * float(ndtri(min(votes[c] / votes.sum(), 1 - 1e-12)))
    if r <= 0 or r_c <= 0:
        return ABSTAIN, 0.0, None
    return c, min(r, r_c), None


def _agreement_ignoring_s(world, router, experts):
    """UNSOUND: the leader's certificate alone wherever the router may route elsewhere."""
    j = leader(router[0], world.b)
    e = Certificate.from_counts(*experts[j], world.sigmas[j], A_EXPERT / world.width)
    return e.prediction, e.radius, None


def _pairwise_without_halving(world, router, experts):
    """UNSOUND: sigma_e * (score gap) instead of sigma_e / 2 * (score gap)."""
    c = _rule("pairwise")(world, router, experts)[2]
    radius = min(2 * c.radius_router, c.radius_expert)
    return c.prediction, radius, None


@pytest.mark.parametrize(
    "unsound", [_plug_in_pairwise, _agreement_ignoring_s, _pairwise_without_halving]
)
def test_the_check_fails_deliberately_unsound_rules(unsound):
    failures, *_ = _run(unsound)
    assert failures > _limit(CASES)
    failures, *_ = _run(unsound, seed=3, cases=_gate_cases())  # and on the class gates
    assert failures > _limit(CASES)


# ---------------------------------------------------------------- golden values and edges


def test_golden_split_votes():
    """q = (0.6, 0.3, 0.1): 0.39 sigma_e from the pairwise bound, 0.25 sigma_e from q_lo."""
    gaps = score_gaps(0, 0.6, [1.0, 0.3, 0.1], sigma_e=1.0)
    assert round(pairwise_radius(gaps), 4) == 0.3889
    assert round(float(norm.ppf(0.6)), 4) == 0.2533
    assert pairwise_radius(score_gaps(0, 0.6, [1.0, 0.3, 0.1], sigma_e=0.5)) == pytest.approx(
        0.5 * 0.38887, abs=1e-5
    )
    j, lo, hi = router_bounds([60, 30, 10], [600_000, 300_000, 100_000], 0.001)
    assert j == 0 and round(pairwise_radius(score_gaps(j, lo, hi, 1.0)), 3) == 0.384
    # a bias of +0.3 on output 1 narrows the gap to 0.3 by 0.15 sigma_e
    biased = score_gaps(0, 0.6, [1.0, 0.3, 0.1], 1.0, biases=[0.0, 0.3, 0.0])
    assert pairwise_radius(biased) == pytest.approx(0.3889 - 0.15, abs=1e-4)


def test_infinite_scores_are_handled_soundly():
    assert pairwise_radius(score_gaps(0, 0.0, [1.0, 0.2], 1.0)) == 0.0  # q_lo = 0: -inf
    assert pairwise_radius(score_gaps(0, 0.7, [1.0, 1.0], 1.0)) == 0.0  # q_hi = 1: +inf
    assert score_gaps(0, 1.0, [1.0, 1.0], 1.0)[1] == -np.inf  # inf - inf excludes nothing
    assert pairwise_radius(score_gaps(0, 0.9, [1.0], 1.0)) == np.inf  # one expert: never moves
    c = decide("pairwise", ([5], [50]), [([0, 5], [0, 50])], sigma_e=1.0, sigmas=[0.5],
               alpha_router=0.01, alpha_expert=0.01)  # fmt: skip
    assert c.radius == pytest.approx(Certificate.from_counts([0, 5], [0, 50], 0.5, 0.01).radius)
    assert leader([0, 0, 10], [5.0, 0.0, 0.0]) == 2  # a bias never beats a zero-vote output


def test_agreement_radius_matches_its_definition_and_reduces_to_min():
    rng = np.random.default_rng(3)
    for _ in range(500):
        width = int(rng.integers(1, 5))
        gaps = rng.choice([-np.inf, -0.2, 0.1, 0.4, 0.9, 2.0], width)
        j = int(rng.integers(width))
        gaps[j] = np.inf
        preds = rng.choice([ABSTAIN, 0, 1], width)
        radii = np.where(preds >= 0, rng.choice([0.05, 0.3, 0.4, 1.2], width), 0.0)
        assert agreement_radius(j, gaps, preds, radii) == pytest.approx(
            agreement_sweep(j, gaps, preds, radii)
        )
        if all(preds[k] != preds[j] for k in range(width) if k != j) and preds[j] >= 0:
            # nobody agrees: S(r) must stay {j*}, so it is min(R_sigma, R_c)
            want = min(pairwise_radius(gaps), radii[j])
            got = agreement_radius(j, gaps, preds, radii)[1]
            assert got == pytest.approx(want if want > 0 else 0.0)


def test_agreement_splits_alpha_over_every_expert():
    experts = [([0, 10], [0, 100])] * 3
    c = decide("agreement", ([4, 3, 3], [40, 30, 30]), experts, sigma_e=1.0,
               sigmas=[0.25, 0.5, 1.0], alpha_router=0.01, alpha_expert=0.03)  # fmt: skip
    assert [e.alpha for e in c.expert_certificates] == pytest.approx([0.01] * 3)
    assert c.radius_router == 0.0 and c.expert == ABSTAIN  # the router cannot tell the route
    least = min(e.radius for e in c.expert_certificates)
    assert c.prediction == 1 and c.radius == pytest.approx(least)
    assert c.alpha == pytest.approx(0.04)


def test_bad_rule_and_biases_are_one_sentence():
    expert = type("E", (), {"sigma": 0.5, "__call__": lambda self, x: x[:, 0] > 0})()
    with pytest.raises(UsageError, match="unknown composition rule 'max'"):
        DualSmoothed(lambda x: x[:, 0] > 0, 0.5, [expert], rule="max")
    with pytest.raises(UsageError, match="1 finite numbers"):
        DualSmoothed(lambda x: x[:, 0] > 0, 0.5, [expert], biases=[0.0, 1.0])
    with pytest.raises(UsageError, match="1 finite numbers"):
        check_biases([float("nan")], 1)


# ---------------------------------------------------------------- end to end through DualSmoothed


class Bucket:
    """The world's router as a torch base model on x in R^2 (s = x[:, 0])."""

    def __init__(self, world):
        self.t = torch.tensor(world.t, dtype=torch.float32)
        self.num_classes = world.width

    def __call__(self, x):
        return torch.bucketize(x[:, 0].contiguous(), self.t)


class Threshold:
    def __init__(self, a, tau, sigma):
        self.a, self.tau, self.sigma, self.num_classes = float(a), float(tau), float(sigma), 2

    def __call__(self, x):
        return (self.a * (x[:, 0] - self.tau) > 0).long()


@pytest.mark.parametrize("rule", ["pairwise", "agreement"])
def test_dual_smoothed_certify_and_predict_on_ground_truth(rule):
    world = World(7, width=3)
    experts = [Threshold(a, t, s) for a, t, s in zip(world.a, world.tau, world.sigmas, strict=True)]
    dual = DualSmoothed(Bucket(world), world.sigma_e, experts, rule=rule, biases=world.b)
    s = np.random.default_rng(0).uniform(world.t[0] - 0.6, world.t[-1] + 0.6, 150)
    xs = torch.tensor(np.stack([s, np.zeros_like(s)], 1), dtype=torch.float32)
    certs = dual.certify_batch(xs, n0=N0, n=N, alpha=ALPHA, seed=4)
    preds = dual.predict_batch(xs, n=N, alpha=ALPHA, seed=4)
    fail_c = fail_p = certified = 0
    for si, c, p in zip(s, certs, preds, strict=True):
        cls = int(world.h(si)[0])
        if not c.abstained:
            certified += 1
            fail_c += c.prediction != cls or c.radius > world.h_radius(si) + 1e-6
        fail_p += not p.abstained and p.prediction != cls
        assert c.rule == p.rule == rule
    assert fail_c <= binom.isf(1e-6, len(s), ALPHA) and fail_p <= binom.isf(1e-6, len(s), ALPHA)
    assert certified > 50 and sum(not p.abstained for p in preds) > 75


def test_pairwise_samples_only_the_routed_expert_and_predict_route_set():
    world = World(7, width=3, biased=False)
    experts = [Threshold(a, t, s) for a, t, s in zip(world.a, world.tau, world.sigmas, strict=True)]
    calls = [0] * 3

    def counted(i):
        def base(x):
            calls[i] += len(x)
            return experts[i](x)

        base.sigma, base.num_classes = experts[i].sigma, 2
        return base

    far = float(world.t[-1] + 3.0)  # deep in the last bucket: route 2 for sure
    dual = DualSmoothed(Bucket(world), world.sigma_e, [counted(i) for i in range(3)],
                        rule="pairwise")  # fmt: skip
    c = dual.certify(torch.tensor([far, 0.0]), n0=10, n=100, alpha=0.01, seed=0, index=0)
    assert c.expert == 2 and calls == [0, 0, 110]
    assert predict_route_set([0, 0, 1000], 0.01) == (2, [2])
    assert predict_route_set([480, 520, 0], 0.01) == (ABSTAIN, [1, 0])
