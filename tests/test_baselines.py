"""Multiscale cascade and oracle on hand-made counts, checked against scipy directly."""

from __future__ import annotations

import pytest
from scipy.stats import beta, norm

from rsrouter.composition.baselines import MULTISCALE_LABEL, ORACLE_LABEL, multiscale, oracle
from rsrouter.errors import UsageError
from rsrouter.smoothing import ABSTAIN, Certificate


def cert(counts, sigma, selected=None):
    sel = [0] * len(counts)
    sel[max(range(len(counts)), key=counts.__getitem__) if selected is None else selected] = 100
    return Certificate.from_counts(sel, counts, sigma, 0.001)


def lo(k, n, a):  # one-sided Clopper-Pearson lower bound, written out independently
    return beta.ppf(a, k, n - k + 1) if k > 0 else 0.0


def test_first_stage_fires_with_the_largest_sigma():
    stages = [cert([5, 995, 0], 0.25), cert([0, 990, 10], 1.0)]
    r = multiscale(stages, 0.001)
    a = 0.001 / 2  # two stages
    expected = 1.0 * norm.ppf(lo(990, 1000, a / 2))
    assert (r.prediction, r.stage, r.sigma) == (1, 1, 1.0)
    assert r.radius == pytest.approx(expected, rel=1e-9)
    assert r.radius < Certificate.from_counts([0, 100, 0], [0, 990, 10], 1.0, 0.001).radius


def test_fall_to_smaller_sigma_and_cap_by_earlier_stage():
    big = cert([300, 200, 250, 250], 1.0)  # no class can reach 1/2: falls through
    small = cert([0, 0, 1995, 5], 0.25)
    r = multiscale([small, big], 0.01)
    a = 0.01 / 2
    own = 0.25 * norm.ppf(lo(1995, 2000, a / 2))
    up = max(1 - lo(1000 - k, 1000, a / 8) for k in (300, 200, 250))  # classes != 2
    cap = 1.0 * (0 - norm.ppf(up))
    assert (r.prediction, r.stage, r.sigma) == (2, 0, 0.25)
    assert r.radius == pytest.approx(min(own, cap), rel=1e-9)
    assert r.radius == pytest.approx(cap, rel=1e-9)  # here the earlier stage is the limit
    assert r.evaluated == (1, 0)  # largest sigma first, then the one that fired
    swapped = multiscale([big, small], 0.01)
    assert (swapped.prediction, swapped.radius, swapped.stage) == (2, r.radius, 1)


def test_undecided_stage_abstains_and_so_does_a_negative_cap():
    undecided = cert([480, 520], 1.0)  # interval straddles 1/2
    sure = cert([0, 1000], 0.5)
    stopped = multiscale([undecided, sure], 0.001)
    assert stopped.prediction == ABSTAIN and stopped.evaluated == (0,)  # never reached 0.5
    lopsided = cert([490, 10, 0], 1.0, selected=1)  # selection missed the big class
    r = multiscale([lopsided, cert([0, 0, 1000], 0.5)], 0.001)
    assert r.prediction == ABSTAIN and r.radius == 0.0


def test_p_skip_shrinks_the_radius():
    stages = [cert([0, 1000], 0.5)]
    r5, r7 = multiscale(stages, 0.001), multiscale(stages, 0.001, p_skip=0.7)
    assert r7.radius == pytest.approx(r5.radius - 0.5 * norm.ppf(0.7), rel=1e-9)
    assert multiscale([cert([200, 800], 0.5)], 0.001, p_skip=0.9).prediction == ABSTAIN
    with pytest.raises(UsageError, match="p_skip"):
        multiscale(stages, 0.001, p_skip=0.3)
    with pytest.raises(UsageError):
        multiscale([], 0.001)


def test_oracle_takes_the_best_correct_expert_and_is_labelled():
    certs = [cert([0, 1000], 0.25), cert([10, 990], 1.0), cert([1000, 0], 0.5)]
    assert oracle(certs, 1) == (1, certs[1].radius)
    assert oracle(certs, 0) == (2, certs[2].radius)
    assert oracle(certs, 5) == (ABSTAIN, 0.0)
    assert "not a certificate" in ORACLE_LABEL and "re-implementation" in MULTISCALE_LABEL


def test_multiscale_ground_truth_on_linear_stages():
    """Two linear stages: the claimed class must keep firing, and no earlier stage may fire
    with another class, on the whole certified ball (exact for halfspaces)."""
    import numpy as np
    import torch
    from scipy.stats import binom

    from rsrouter.smoothing import sample_counts

    gen = torch.Generator().manual_seed(4)
    d, alpha, p_skip = 3, 0.1, 0.7
    z = norm.ppf(p_skip)
    stages = [
        (torch.randn(d, generator=gen), 0.2, 1.0),
        (torch.randn(d, generator=gen), -0.1, 0.25),
    ]
    xs = 0.8 * torch.randn(300, d, generator=gen)

    def margin(w, b, x):
        return (float(x @ w) + b) / float(w.norm())

    counts = []
    for w, b, sigma in stages:

        def base(x, w=w, b=b):
            return (x @ w + b > 0).long()

        sel = sample_counts(base, xs, sigma, 30, seed=1, stage=0, num_classes=2)
        est = sample_counts(base, xs, sigma, 1000, seed=1, stage=1, num_classes=2)
        counts.append((sel.numpy(), est.numpy(), sigma))
    failures, fired = 0, [0, 0]
    for t, x in enumerate(xs):
        certs = [Certificate.from_counts(s[t], e[t], sg, alpha) for s, e, sg in counts]
        r = multiscale(certs, alpha, p_skip=p_skip)
        if r.abstained:
            continue
        fired[r.stage] += 1
        sign = 1 if r.prediction == 1 else -1
        w, b, sigma = stages[r.stage]
        ok = sign * margin(w, b, x) - sigma * z >= r.radius
        for j in range(r.stage):  # stages with a larger sigma come first here
            wj, bj, sj = stages[j]
            ok &= sign * margin(wj, bj, x) + sj * z >= r.radius
        failures += not ok
    assert fired[0] > 30 and fired[1] > 30  # both stages do certify inputs
    assert failures <= binom.isf(1e-6, len(xs), alpha)
    assert np.isfinite(failures), (fired, failures)
