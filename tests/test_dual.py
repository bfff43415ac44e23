"""DualSmoothed against ground truth: a linear router over linear experts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom

from rsrouter.composition import DualCertificate, DualSmoothed, split_alpha
from rsrouter.errors import UsageError
from rsrouter.smoothing import ABSTAIN, Certificate


class Linear:
    """f(x) = 1[w.x + b > 0]; smoothing keeps the boundary, at distance abs(w.x + b) / norm(w)."""

    def __init__(self, w, b, sigma=None):
        self.w, self.b = torch.as_tensor(w, dtype=torch.float32), float(b)
        if sigma is not None:
            self.sigma, self.num_classes = sigma, 2
        self.calls = 0

    def __call__(self, x):
        self.calls += len(x)
        return (x @ self.w + self.b > 0).long()

    def side(self, x) -> int:
        return int(float(x @ self.w) + self.b > 0)

    def distance(self, x) -> float:
        return abs(float(x @ self.w) + self.b) / float(self.w.norm())


def _world(d=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    router = Linear(torch.randn(d, generator=gen), 0.2)
    experts = [
        Linear(torch.randn(d, generator=gen), 0.1, sigma=0.25),
        Linear(torch.randn(d, generator=gen), -0.1, sigma=0.5),
    ]
    return router, experts, gen


def test_composed_certificate_is_sound_and_not_trivial():
    router, experts, gen = _world()
    dual = DualSmoothed(router, 0.5, experts)
    xs = 0.6 * torch.randn(400, 4, generator=gen)
    alpha = 0.05
    certs = dual.certify_batch(xs, n0=30, n=500, alpha=alpha, seed=11)
    failures, inflated, ratios = 0, 0, []
    for x, c in zip(xs, certs, strict=True):
        if c.abstained:
            continue
        route = router.side(x)
        truth = min(router.distance(x), experts[route].distance(x))
        wrong = c.expert != route or c.prediction != experts[route].side(x)
        failures += wrong or c.radius > truth
        inflated += wrong or max(c.radius_router, c.radius_expert) > truth
        ratios.append(c.radius / truth)
    certified = len(ratios)
    limit = binom.isf(1e-6, len(xs), alpha)
    assert certified > 200
    assert failures <= limit
    assert np.mean(ratios) > 0.5  # close to the true radius, not a trivially small one
    assert inflated > limit  # the check would catch max() in place of min()


def test_certificate_records_the_split_and_min():
    router, experts, _ = _world()
    dual = DualSmoothed(router, 0.5, experts)
    x = torch.tensor([1.0, 0.5, -0.3, 0.2])
    c = dual.certify(x, n0=20, n=400, alpha=0.01, alpha_router=0.002, seed=3, index=7)
    assert isinstance(c, DualCertificate)
    assert (c.alpha_router, c.alpha_expert) == pytest.approx((0.002, 0.008))
    assert c.alpha == pytest.approx(0.01)
    assert c.router.alpha == pytest.approx(0.002) and c.router.sigma == 0.5
    if not c.abstained:
        assert c.expert_certificate.sigma == experts[c.expert].sigma
        assert c.radius == min(c.radius_router, c.radius_expert)
    again = dual.certify_batch(x[None], n0=20, n=400, alpha=0.01, alpha_router=0.002,
                               seed=3, indices=[7])[0]  # fmt: skip
    assert again == c
    assert c.to_dict()["router"]["counts"] == list(c.router.counts)


def test_router_abstention_consults_no_expert():
    experts = [Linear([1.0, 0.0], 0.0, sigma=0.25), Linear([0.0, 1.0], 0.0, sigma=0.5)]
    router = Linear([1.0, 0.0], 0.0)  # x on its boundary: the router cannot decide
    dual = DualSmoothed(router, 1.0, experts)
    c = dual.certify(torch.tensor([0.0, 2.0]), n0=20, n=200, alpha=0.01, seed=0, index=0)
    assert c.abstained and c.expert == ABSTAIN and c.expert_certificate is None
    assert c.radius == 0.0 and experts[0].calls == experts[1].calls == 0


def test_only_the_routed_expert_is_sampled():
    experts = [Linear([1.0, 0.0], 0.0, sigma=0.25), Linear([0.0, 1.0], 0.0, sigma=0.5)]
    dual = DualSmoothed(Linear([1.0, 0.0], 0.0), 0.25, experts)
    c = dual.certify(torch.tensor([3.0, 2.0]), n0=10, n=100, alpha=0.01, seed=0, index=0)
    assert c.expert == 1 and c.prediction == 1
    assert experts[0].calls == 0 and experts[1].calls == 110


def test_compose_from_counts_matches_with_alpha():
    r = Certificate.from_counts([0, 50], [3, 997], 1.0, 0.0005)
    e = Certificate.from_counts([50, 0], [990, 10], 0.25, 0.001).with_alpha(0.0005)
    c = DualCertificate.compose(r, e)
    assert c.expert == 1 and c.prediction == 0
    assert c.radius == pytest.approx(min(r.radius, e.radius)) and c.alpha == pytest.approx(0.001)
    with pytest.raises(UsageError):
        DualCertificate.compose(r, None)


def test_predict_runs_predict_at_each_stage():
    experts = [Linear([1.0, 0.0], 0.0, sigma=0.25), Linear([0.0, 1.0], 0.0, sigma=0.5)]
    dual = DualSmoothed(Linear([1.0, 0.0], -1.0), 0.5, experts)
    xs = torch.tensor([[3.0, -2.0], [-2.0, 2.0], [1.0, 0.0]])
    p = dual.predict_batch(xs, n=300, alpha=0.01, seed=1)
    assert (p[0].expert, p[0].prediction) == (1, 0)
    assert (p[1].expert, p[1].prediction) == (0, 0)
    assert p[2].expert == ABSTAIN and p[2].abstained and p[2].expert_prediction is None
    assert p[0].router.alpha == pytest.approx(0.005)


def test_bad_configuration_is_one_sentence():
    e = Linear([1.0], 0.0, sigma=0.5)
    with pytest.raises(UsageError, match="alpha_router"):
        split_alpha(0.001, 0.001)
    with pytest.raises(UsageError, match="sigma"):
        DualSmoothed(Linear([1.0], 0.0), 0.5, [Linear([1.0], 0.0)])
    with pytest.raises(UsageError, match="at least one expert"):
        DualSmoothed(Linear([1.0], 0.0), 0.5, [])
    three = Linear([1.0], 0.0)
    three.num_classes = 3
    with pytest.raises(UsageError, match="among 3 experts"):
        DualSmoothed(three, 0.5, [e])
    dual = DualSmoothed(lambda x: torch.full((len(x),), 3), 0.5, [e])
    with pytest.raises(UsageError, match="only 1 experts"):
        dual.certify(torch.tensor([1.0]), n0=5, n=10, alpha=0.01, seed=0, index=0)
    with pytest.raises(UsageError, match="indices has 1 entries for 2 inputs"):
        dual.predict_batch(torch.ones(2, 1), n=10, alpha=0.01, seed=0, indices=[0])
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError, match="seed must be a non-negative whole number"):
            dual.certify(torch.tensor([1.0]), n0=5, n=10, alpha=0.01, seed=bad)
        with pytest.raises(UsageError, match="seed must be a non-negative whole number"):
            dual.predict(torch.tensor([1.0]), n=10, alpha=0.01, seed=bad)
