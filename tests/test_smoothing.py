"""The statistics core against golden values and against ground truth on linear classifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binom, norm

from rsrouter.errors import UsageError
from rsrouter.smoothing import (
    ABSTAIN,
    Certificate,
    Prediction,
    certified_radius,
    certify,
    certify_batch,
    lower_confidence_bound,
    predict,
    sample_counts,
)


@pytest.mark.parametrize(
    ("n", "alpha", "golden"),
    [(100, 1e-3, 1.5005), (100, 5e-4, 1.4524), (10_000, 5e-4, 3.1709), (100_000, 1e-3, 3.8115)],
)
def test_golden_radius_when_all_draws_agree(n, alpha, golden):
    assert round(certified_radius(n, n, 1.0, alpha), 4) == golden
    assert certified_radius(n, n, 0.5, alpha) == pytest.approx(0.5 * golden, abs=1e-4)


def test_issue_example_and_edges():
    assert round(certified_radius(99_000, 100_000, 1.0, 0.001), 4) == 2.29
    assert certified_radius(0, 100, 1.0, 0.001) == 0.0
    assert certified_radius(50, 100, 1.0, 0.001) == 0.0  # p_lower <= 1/2 abstains
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    radii = certified_radius(np.array([0, 60, 100]), 100, 1.0, 0.001)
    assert radii[0] == 0.0 and radii[1] == 0.0 and radii[2] == pytest.approx(1.5005, abs=1e-4)


def test_certificate_recomputes_offline_for_another_alpha():
    c = Certificate.from_counts([0, 100], [3, 997], 0.5, 0.001)
    assert c.prediction == 1 and c.count == 997 and c.n == 1000 and c.n0 == 100
    looser = c.with_alpha(0.01)
    assert looser.radius > c.radius
    assert looser.radius == pytest.approx(certified_radius(997, 1000, 0.5, 0.01))
    assert (
        Certificate(**{**c.to_dict(), "counts": c.counts, "selection_counts": c.selection_counts})
        == c
    )


def _linear_base(w: torch.Tensor, b: float):
    def base(x: torch.Tensor) -> torch.Tensor:
        return (x @ w + b > 0).long()

    return base


def test_ground_truth_linear_soundness_and_tightness():
    """Certified radius above the true one (or a wrong class) only within alpha's binomial tail."""
    gen = torch.Generator().manual_seed(1)
    alpha, trials, sigma, d = 0.01, 300, 0.5, 8
    failures, ratios_small, ratios_large = 0, [], []
    for t in range(trials):
        w = torch.randn(d, generator=gen)
        b = float(torch.randn(1, generator=gen))
        # place x so that p_A = Phi(margin / sigma) spans 0.6 .. 0.999
        margin = sigma * float(norm.ppf(0.6 + 0.399 * float(torch.rand(1, generator=gen))))
        x = torch.randn(d, generator=gen)
        x = x - ((x @ w + b) / w.norm() ** 2) * w  # onto the boundary
        side = 1 if t % 2 else -1
        x = x + side * margin * w / w.norm()
        true_class = int(float(x @ w) + b > 0)
        true_radius = abs(float(x @ w) + b) / float(w.norm())
        c = certify(_linear_base(w, b), x, sigma, n0=50, n=1000, alpha=alpha, seed=t, index=0)
        if not c.abstained and (c.prediction != true_class or c.radius > true_radius):
            failures += 1
        if t < 40:
            big = certify(
                _linear_base(w, b), x, sigma, n0=50, n=100_000, alpha=alpha, seed=t, index=0
            )
            ratios_small.append(c.radius / true_radius)
            ratios_large.append(big.radius / true_radius)
    limit = binom.isf(1e-6, trials, alpha)  # the count alpha allows, with 1e-6 slack
    assert failures <= limit
    assert np.mean(ratios_large) > 0.9  # approaches the true radius as n grows
    assert np.mean(ratios_large) > np.mean(ratios_small)
    assert sum(r > 1.0 for r in ratios_large) <= binom.isf(1e-6, len(ratios_large), alpha)


def test_inflated_radius_would_be_caught():
    """The soundness count above is not vacuous: the plug-in estimate fails it often."""
    w, b, sigma = torch.tensor([1.0, 0.0]), 0.0, 1.0
    x = torch.tensor([0.5, 0.0])
    over = 0
    for t in range(100):
        counts = sample_counts(_linear_base(w, b), x[None], sigma, 1000, seed=t)[0]
        p_hat = counts[1].item() / 1000
        over += sigma * norm.ppf(p_hat) > 0.5
    assert over > 20


def test_seeded_counts_are_reproducible_and_batch_independent():
    base = _linear_base(torch.tensor([1.0, -2.0, 0.5]), 0.1)
    xs = torch.randn(7, 3)
    a = sample_counts(base, xs, 0.7, 2500, seed=3, batch_size=1000)
    b = sample_counts(base, xs, 0.7, 2500, seed=3, batch_size=37)
    c = sample_counts(base, xs[4:], 0.7, 2500, seed=3, indices=range(4, 7))
    assert torch.equal(a, b)
    assert torch.equal(a[4:], c)
    assert a.sum(1).eq(2500).all()
    assert not torch.equal(a, sample_counts(base, xs, 0.7, 2500, seed=4))


def test_batch_certify_matches_single_and_selection_is_independent():
    base = _linear_base(torch.tensor([1.0, 1.0]), 0.0)
    xs = torch.tensor([[0.3, 0.2], [-0.4, 0.1], [2.0, 2.0]])
    batch = certify_batch(base, xs, 0.5, n0=64, n=500, alpha=0.001, seed=9)
    singles = [
        certify(base, x, 0.5, n0=64, n=500, alpha=0.001, seed=9, indices=[i])
        for i, x in enumerate(xs)
    ]
    assert batch == singles
    assert batch[2].prediction == 1 and batch[1].prediction in (0, ABSTAIN)
    assert sum(batch[0].selection_counts) == 64 and batch[0].n == 500


def test_logits_and_class_ids_give_the_same_counts():
    w = torch.randn(4, 3)

    def logits(x):
        return x @ w

    def ids(x):
        return (x @ w).argmax(1)

    xs = torch.randn(5, 4)
    assert torch.equal(
        sample_counts(logits, xs, 0.3, 300, seed=0),
        sample_counts(ids, xs, 0.3, 300, seed=0, num_classes=3),
    )


def test_images_and_channels_last():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    conv(torch.zeros(1, 3, 8, 8))
    x = torch.rand(3, 8, 8)
    a = certify(conv, x, 0.25, n0=20, n=200, alpha=0.01, seed=1, index=0)
    b = certify(conv, x, 0.25, n0=20, n=200, alpha=0.01, seed=1, index=0, channels_last=True)
    assert a.counts == b.counts and a.n == 200


def test_out_of_memory_halves_the_batch_and_gives_the_same_counts():
    base = _linear_base(torch.tensor([1.0, -1.0]), 0.0)
    calls = []

    def fragile(x):
        calls.append(len(x))
        if len(x) > 64:
            raise torch.cuda.OutOfMemoryError("simulated")
        return base(x)

    xs = torch.randn(3, 2)
    assert torch.equal(
        sample_counts(fragile, xs, 0.5, 400, seed=2, batch_size=1000),
        sample_counts(base, xs, 0.5, 400, seed=2),
    )
    assert max(c for c in calls if c <= 64) == 1000 // 16  # halved four times


def test_predict_abstains_on_tie_and_answers_on_majority():
    assert Prediction.from_counts([50, 50, 0], 0.001).prediction == ABSTAIN
    assert Prediction.from_counts([0, 90, 10], 0.001).prediction == 1
    tie = predict(lambda x: torch.arange(len(x)) % 2, torch.zeros(2), 0.5, n=1000, alpha=0.001)
    assert tie.prediction == ABSTAIN
    clear = predict(
        _linear_base(torch.tensor([1.0, 0.0]), 0.0),
        torch.tensor([3.0, 0.0]),
        0.5,
        n=200,
        alpha=0.001,
    )
    assert clear.prediction == 1 and clear.pvalue < 1e-10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": -1.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"n0": 0}, "n0"),
        ({"n": 0}, "n must"),
        ({"x": torch.tensor([0.1, float("nan")])}, "NaN"),
        ({"x": torch.zeros(2, 2)}, "shape"),
    ],
)
def test_bad_input_names_the_problem(kwargs, message):
    args = {"x": torch.zeros(2), "sigma": 0.5, "n0": 10, "n": 10, "alpha": 0.01} | kwargs
    base = _linear_base(torch.tensor([1.0, 0.0]), 0.0)
    with pytest.raises(ValueError, match=message):
        certify(base, args.pop("x"), args.pop("sigma"), **args)


def test_a_seeded_single_input_call_needs_its_index():
    """`certify(model, x, seed=0)` in a loop would give every input the noise of index 0."""
    from rsrouter.composition.dual import DualSmoothed

    base = _linear_base(torch.tensor([1.0, 0.0]), 0.0)

    class Expert(torch.nn.Module):
        sigma = 0.5

        def forward(self, x):
            return base(x)

    dual = DualSmoothed(lambda x: torch.zeros(len(x), dtype=torch.long), 0.5, [Expert()])
    calls = [
        lambda **kw: certify(base, torch.zeros(2), 0.5, n0=10, n=50, alpha=0.01, **kw),
        lambda **kw: predict(base, torch.zeros(2), 0.5, n=50, alpha=0.01, **kw),
        lambda **kw: dual.certify(torch.zeros(2), n0=10, n=50, alpha=0.01, **kw),
        lambda **kw: dual.predict(torch.zeros(2), n=50, alpha=0.01, **kw),
    ]
    for call in calls:
        with pytest.raises(UsageError, match=r"single-input call with seed= needs index="):
            call(seed=0)
        with pytest.raises(UsageError, match="index must be a non-negative whole number"):
            call(seed=0, index=-1)
        call()  # unseeded: fresh noise, no index needed
        assert call(seed=0, index=3) == call(seed=0, index=3)
    x = torch.zeros(2)
    loop = [certify(base, x, 0.5, n0=10, n=200, alpha=0.01, seed=0, index=i) for i in range(4)]
    batch = certify_batch(base, x.expand(4, 2), 0.5, n0=10, n=200, alpha=0.01, seed=0)
    assert [c.counts for c in loop] == [c.counts for c in batch]
    assert len({tuple(c.counts) for c in loop}) > 1  # four inputs, four noise streams


def test_base_with_wrong_output_shape_is_refused():
    with pytest.raises(UsageError, match="base model returned"):
        certify(lambda x: torch.zeros(3, 2), torch.zeros(2), 0.5, n0=10, n=10, alpha=0.01)
    with pytest.raises(UsageError, match="base model returned"):
        certify(lambda x: x.sum(1), torch.zeros(2), 0.5, n0=10, n=10, alpha=0.01)


def test_pad_counts_zero_pads_to_the_widest():
    from rsrouter.smoothing import pad_counts

    sel, est = pad_counts(torch.tensor([[3, 1]]), torch.tensor([[0, 2, 5, 1]]))
    assert sel.tolist() == [[3, 1, 0, 0]] and est.tolist() == [[0, 2, 5, 1]]
