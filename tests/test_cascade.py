"""The class-aware cascade: golden radii from scipy, Multiscale as its special case, the val
fit, and ground truth on linear experts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import beta, binom, norm

from rsrouter.composition.baselines import keep_multiscale_ceiling, multiscale
from rsrouter.composition.cascade import (
    NEVER,
    THRESHOLD_GRID,
    CascadeSpec,
    bounds_of,
    certify_cascade,
    check_cascade,
    fit_cascade,
    multiscale_spec,
)
from rsrouter.errors import UsageError
from rsrouter.smoothing import ABSTAIN, Certificate


def lo(k, n, a):  # one-sided Clopper-Pearson lower bound, written out independently
    return beta.ppf(a, k, n - k + 1) if k > 0 else 0.0


def up(k, n, a):
    return 1 - lo(n - k, n, a)


def one_hot(classes, c, n=100):
    row = [0] * classes
    row[c] = n
    return row


def decide(counts, sigmas, spec, alpha):
    sel = [[one_hot(len(c), int(np.argmax(c)))] for c in counts]
    est = [[c] for c in counts]
    pred, radius, expert = certify_cascade(bounds_of(sel, est, sigmas, alpha), spec)
    return int(pred[0]), float(radius[0]), int(expert[0])


def test_an_early_confident_small_sigma_overrides_and_caps_by_its_off_classes():
    """Stage 0 (sigma 0.5, tau 0.99 for class 0) fires with class 0 only when very sure; here
    it is not sure of class 2, so stage 1 (sigma 1) certifies class 2, capped by how far stage 0
    is from firing with another class."""
    alpha, a = 0.001, 0.001 / 2  # two stages
    small, big = [5, 0, 995], [0, 40, 960]
    spec = CascadeSpec((0, 1), ((0.99, 0.99, NEVER), (0.5, 0.5, 0.5)))
    c, r, e = decide([small, big], [0.5, 1.0], spec, alpha)
    sure = 1.0 * (norm.ppf(lo(960, 1000, a / 2)) - 0)
    cap0 = 0.5 * (norm.ppf(0.99) - norm.ppf(min(up(5, 1000, a / 6), 1 - lo(995, 1000, a / 2))))
    cap1 = 0.5 * (norm.ppf(0.99) - norm.ppf(min(up(0, 1000, a / 6), 1 - lo(995, 1000, a / 2))))
    assert (c, e) == (2, 1)
    assert r == pytest.approx(min(sure, cap0, cap1), rel=1e-9)
    # tau = 0.5 for class 2 at stage 0: stage 0 surely fires with 2 and stage 1 keeps its own
    # radius (stage 0 fires with class 2 only, which is the class certified)
    spec2 = CascadeSpec((0, 1), ((0.99, 0.99, 0.5), (0.5, 0.5, 0.5)))
    c2, r2, e2 = decide([small, big], [0.5, 1.0], spec2, alpha)
    assert c2 == 2 and r2 == pytest.approx(min(sure, cap0, cap1), rel=1e-9) and e2 == 1


def test_a_confident_disagreeing_early_stage_wins_at_small_radius():
    alpha, a = 0.001, 0.001 / 2
    small, big = [1000, 0, 0], [0, 0, 1000]  # sigma 0.5 sure of 0, sigma 1 sure of 2
    spec = CascadeSpec((0, 1), ((0.99, 0.99, 0.99), (0.5, 0.5, 0.5)))
    c, r, e = decide([small, big], [0.5, 1.0], spec, alpha)
    assert (c, e) == (0, 0)
    assert r == pytest.approx(0.5 * (norm.ppf(lo(1000, 1000, a / 2)) - norm.ppf(0.99)))
    never = CascadeSpec((0, 1), ((NEVER,) * 3, (0.5, 0.5, 0.5)))  # stage 0 switched off
    c, r, e = decide([small, big], [0.5, 1.0], never, alpha)
    assert (c, e) == (2, 1) and r == pytest.approx(norm.ppf(lo(1000, 1000, a / 2)))
    undecided = CascadeSpec((1, 0), ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert decide([[500, 0, 500], [500, 500, 0]], [0.5, 1.0], undecided, alpha)[0] == ABSTAIN


def test_multiscale_is_the_special_case_and_never_certifies_more():
    rng = np.random.default_rng(0)
    sigmas, alpha = [0.25, 0.5, 1.0], 0.001
    spec = multiscale_spec(sigmas, 4)
    agree = 0
    for _ in range(300):
        counts = [rng.multinomial(1000, rng.dirichlet(np.full(4, 0.3))) for _ in sigmas]
        certs = [Certificate.from_counts(one_hot(4, int(np.argmax(c))), c, s, alpha)
                 for c, s in zip(counts, sigmas, strict=True)]  # fmt: skip
        ms = multiscale(certs, alpha)
        c, r, _ = decide(counts, sigmas, spec, alpha)
        assert r >= ms.radius - 1e-12
        if not ms.abstained:
            agree += 1
            assert c == ms.prediction
    assert agree > 50


def test_check_cascade_refuses_bad_specs():
    good = {"order": [1, 0], "thresholds": [[0.5, 1.0], [0.7, 0.9]]}
    assert check_cascade(good, 2, 2) == CascadeSpec((1, 0), ((0.5, 1.0), (0.7, 0.9)))
    for bad in ({"order": [0, 0], "thresholds": good["thresholds"]},
                {"order": [0, 1], "thresholds": [[0.5, 0.5]]},
                {"order": [0, 1], "thresholds": [[0.4, 0.5], [0.5, 0.5]]},
                {"thresholds": good["thresholds"]}):  # fmt: skip
        with pytest.raises(UsageError):
            check_cascade(bad, 2, 2)


def test_fit_moves_a_threshold_only_when_the_score_improves():
    """Two classes: sigma 1 always says 0 (right on class 0, with large radii; wrong on class 1),
    sigma 0.25 is right on both. Best (every input right, then ACR): sigma 0.25 first (its firing
    with class 0 changes nothing), sigma 1 certifying class 0 up to where sigma 0.25 may fire
    with class 1: a tau above 1/2 there widens that at the cost of the class-1 radii."""
    alpha, sigmas = 0.001, [0.25, 1.0]
    labels = np.array([0] * 30 + [1] * 10)  # class 1 rarer: widening class 0 pays
    small = [[0, 1000] if y else [1000, 0] for y in labels]
    big = [[1000, 0] for _ in labels]
    counts = [small, big]
    sel = [[one_hot(2, int(np.argmax(c))) for c in rows] for rows in counts]
    bounds = bounds_of(sel, counts, sigmas, alpha)

    def score(pred, radius, expert):
        right = (pred == labels) & (radius > 0)
        return {"right": int(right.sum()), "acr": float(np.mean(np.where(right, radius, 0.0)))}

    def rank(t):
        return (-t["right"], -round(t["acr"], 9))

    spec, tried = fit_cascade(bounds, score, rank, classes=2)
    pred, radius, expert = certify_cascade(bounds, spec)
    assert spec.order == (0, 1) and spec.thresholds[0][1] == 0.99  # the most that still fires
    assert np.all(pred == labels) and list(expert) == [1] * 30 + [0] * 10
    shared = [t for t in tried if "shared" in t]  # one threshold per stage, every class
    assert len(shared) == 2 * len(THRESHOLD_GRID) and sum(t["kept"] for t in shared) == 2
    assert rank(score(pred, radius, expert)) <= min(rank(t) for t in shared)
    assert any("stage" in t for t in tried)  # then every (stage, class) threshold is tried
    assert any(not t["kept"] for t in tried)  # candidates that did not help are recorded too


def test_resampled_regret_is_the_mean_over_val_resamples():
    """The fit's objective against a known law: expert 1 (sigma 1) certifies every input far,
    expert 0 (sigma 0.25) every input near, so the envelope is expert 1's 100 % up to its radius.
    A method that is expert 1 but wrong on a fixed 10 % of the inputs trails it by exactly the
    resample's share of those inputs at every radius: Binomial(N, 0.1) / N, mean 10 points."""
    from rsrouter.composition.tuning import ValidationCounts, resampled_regret

    rows, alpha = 400, 0.001
    labels = np.zeros(rows, dtype=np.int64)
    counts = np.tile([1000, 0], (rows, 1))
    vc = ValidationCounts(labels, [counts // 10, counts // 10], [counts, counts], [0.25, 1.0])
    far = Certificate.from_counts(counts[0] // 10, counts[0], 1.0, alpha).radius
    objective = resampled_regret(vc, alpha, resamples=200)
    assert objective(np.ones(rows, bool), np.full(rows, far)) == pytest.approx(0.0, abs=1e-9)
    wrong = np.arange(rows) % 10 == 0
    mean = objective(~wrong, np.full(rows, far))
    assert abs(mean - 10.0) < 4 * 100 * np.sqrt(0.09 / rows / 200)  # 4 standard errors
    assert mean == resampled_regret(vc, alpha, resamples=200)(~wrong, np.full(rows, far))
    assert objective(np.ones(rows, bool), np.full(rows, far / 2)) == pytest.approx(100.0)
    with pytest.raises(UsageError, match="resamples must be a whole number"):
        resampled_regret(vc, alpha, resamples=0)


def test_the_val_fit_minimises_the_resampled_regret():
    """tuning.fit_cascade keeps, of every candidate it tries, one with the least mean resampled
    val regret (to 0.01 point), and records both that and the val sample's own regret."""
    from rsrouter.composition.tuning import ValidationCounts, resampled_regret
    from rsrouter.composition.tuning import fit_cascade as fit_on_val

    rng = np.random.default_rng(1)  # a draw where the val sample's own regret picks otherwise
    rows, alpha, sigmas = 120, 0.001, [0.25, 0.5, 1.0]
    labels = rng.integers(0, 3, rows)
    est = []
    for k in range(3):  # noisier experts at larger sigma, mostly right
        p = np.full((rows, 3), 0.1 + 0.1 * k)
        p[np.arange(rows), labels] = 1.0
        p += rng.uniform(0, 0.6 * k, (rows, 3))
        p /= p.sum(axis=1, keepdims=True)
        est.append(np.array([rng.multinomial(500, q) for q in p]))
    vc = ValidationCounts(labels, [e // 5 for e in est], est, sigmas)
    spec, tried = fit_on_val(vc, alpha=alpha)
    assert all("objective" in t and "regret" in t for t in tried)
    pred, radius, _ = certify_cascade(bounds_of(vc.selection, vc.estimation, sigmas, alpha), spec)
    chosen = resampled_regret(vc, alpha)(pred == labels, radius)
    assert chosen <= min(t["objective"] for t in tried) + 0.005
    for order in {tuple(t["order"]) for t in tried}:  # each step kept lowers the objective
        kept = [t for t in tried if tuple(t["order"]) == order and t["kept"]]
        ranks = [(round(t["objective"], 2), -t["acr"]) for t in kept]
        assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) == len(ranks)


def sure_but_sometimes_wrong(seed: int, rows: int = 150):
    """Val counts of three experts on 3 classes: sigma = 1 sure and right on 70 % of the inputs,
    sure and wrong on 12 %, split evenly on the rest; sigma = 0.25 and 0.5 right, less sure."""
    from rsrouter.composition.tuning import ValidationCounts

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    u = rng.uniform(size=rows)
    counts = []
    for top in (0.85, 0.7, None):
        p = np.full((rows, 3), 0.05)
        if top is None:
            said = np.where(u < 0.7, labels, (labels + 1) % 3)
            p[np.arange(rows), said] = 0.99
            p[u >= 0.82] = 1 / 3
        else:
            p[np.arange(rows), labels] = top
        p /= p.sum(axis=1, keepdims=True)
        counts.append(np.array([rng.multinomial(500, q) for q in p]))
    return ValidationCounts(labels, [c // 5 for c in counts], counts, [0.25, 0.5, 1.0])


def test_the_keep_multiscale_fit_keeps_every_certificate_of_the_largest_sigma():
    """fit="keep-multiscale": sigma = 1 first at 1/2 for every class, only the later stages
    fitted; so every input Multiscale certifies with sigma = 1 keeps its class and at least its
    radius (the regret fit here cuts about 20 of them). "plain" is Multiscale's spec."""
    from rsrouter.composition.tuning import fit_cascade as fit_on_val

    alpha, vc = 0.001, sure_but_sometimes_wrong(0)
    bounds = bounds_of(vc.selection, vc.estimation, vc.sigmas, alpha)
    regret_fit, _ = fit_on_val(vc, alpha=alpha)
    keep, tried = fit_on_val(vc, alpha=alpha, fit="keep-multiscale")
    plain = multiscale_spec(vc.sigmas, 3)
    assert regret_fit.order[0] != 2 and keep.order[0] == 2 and keep != plain  # it fitted
    assert keep.thresholds[0] == (0.5,) * 3 and all(t["order"][0] == 2 for t in tried)
    p_keep, r_keep, _ = certify_cascade(bounds, keep)
    by_big = 0
    for i in range(len(vc.labels)):
        draws = zip(vc.selection, vc.estimation, vc.sigmas, strict=True)
        certs = [Certificate.from_counts(s[i], e[i], sg, alpha) for s, e, sg in draws]
        ms = multiscale(certs, alpha)
        if ms.stage == 2:  # Multiscale's certificate from sigma = 1
            by_big += 1
            assert p_keep[i] == ms.prediction and r_keep[i] >= ms.radius - 1e-12
    assert by_big > 100
    assert fit_on_val(vc, alpha=alpha, fit="plain")[0] == plain
    with pytest.raises(UsageError, match="unknown cascade fit 'best'"):
        fit_on_val(vc, alpha=alpha, fit="best")


def test_the_keep_multiscale_ceiling_bounds_every_member_and_is_reached():
    """keep_multiscale_ceiling: per input, the best any cascade with sigma = 1 first at 1/2
    certifies the label. Written out here from the bounds (scipy's Phi^-1), it is the larger of
    sigma = 1's own radius and, for each later expert j, sigma_j Phi^-1(lo_j) capped by sigma = 1's
    caps off j's class; no member of the family (random orders and thresholds, the val fit)
    certifies the label further; a cascade outside the family (the regret fit) does on some."""
    from rsrouter.composition.tuning import fit_cascade as fit_on_val

    alpha, rng = 0.001, np.random.default_rng(3)
    for seed in range(3):
        vc = sure_but_sometimes_wrong(seed)
        y, bounds = vc.labels, bounds_of(vc.selection, vc.estimation, vc.sigmas, alpha)
        ceiling = keep_multiscale_ceiling(bounds, y)
        big, idx = bounds[2], np.arange(len(y))
        want = np.where((big.selected == y) & (big.lo > 0.5), norm.ppf(big.lo), 0.0)
        for j in (0, 1):
            b, caps = bounds[j], -norm.ppf(big.up)
            caps[idx, b.selected] = np.inf
            r = np.minimum(b.sigma * norm.ppf(b.lo), caps.min(axis=1))
            want = np.maximum(want, np.where((b.selected == y) & (r > 0), r, 0.0))
        np.testing.assert_allclose(ceiling, want, rtol=1e-9, atol=1e-12)
        assert np.sum(ceiling > 0) > 100
        members = [fit_on_val(vc, alpha=alpha, fit="keep-multiscale")[0],
                   multiscale_spec(vc.sigmas, 3)]  # fmt: skip
        for _ in range(30):
            rest = tuple(rng.permutation([0, 1]))
            rows = [(0.5,) * 3] + [tuple(rng.choice(THRESHOLD_GRID, 3)) for _ in rest]
            members.append(CascadeSpec((2, *rest), tuple(rows)))
        for spec in members:
            pred, radius, _ = certify_cascade(bounds, spec)
            assert np.all(np.where(pred == y, radius, 0.0) <= ceiling + 1e-12)
        outside, _ = fit_on_val(vc, alpha=alpha)  # sigma = 1 not first at 1/2
        pred, radius, _ = certify_cascade(bounds, outside)
        assert np.any(np.where(pred == y, radius, 0.0) > ceiling + 1e-9)


def test_cascade_ground_truth_on_linear_experts():
    """Three linear experts (3 classes, one-vs-rest argmax of linear scores is not a halfspace,
    so two classes: a halfspace each): the claimed class is the true output of g on the whole
    certified ball, checked exactly: p_k(c; x') = Phi(margin_k(x') / sigma_k) for a halfspace."""
    import torch

    from rsrouter.smoothing import sample_counts

    gen = torch.Generator().manual_seed(7)
    d, alpha = 3, 0.1
    experts = [(torch.randn(d, generator=gen), 0.1 * k, s) for k, s in enumerate([0.25, 0.5, 1.0])]
    xs = 0.7 * torch.randn(300, d, generator=gen)
    sel, est = [], []
    for w, b, sigma in experts:

        def base(x, w=w, b=b):
            return (x @ w + b > 0).long()

        sel.append(sample_counts(base, xs, sigma, 30, seed=2, stage=0, num_classes=2).numpy())
        est.append(sample_counts(base, xs, sigma, 1000, seed=2, stage=1, num_classes=2).numpy())
    spec = CascadeSpec((1, 2, 0), ((0.9, 0.7), (0.6, NEVER), (0.5, 0.5)))
    pred, radius, _ = certify_cascade(bounds_of(sel, est, [e[2] for e in experts], alpha), spec)

    def g_is_c_on_ball(x, c, r):
        """Exact: on B(x, r) stage k's margin for class 1 ranges over m_k +- r (unit w)."""
        for s, i in enumerate(spec.order):
            w, b, sigma = experts[i]
            m = (float(x @ w) + b) / float(w.norm())
            tau = spec.thresholds[s]
            # p(1) > tau[1] iff m > sigma Phi^-1(tau[1]);
            # p(0) > tau[0] iff m < -sigma Phi^-1(tau[0])
            can1 = tau[1] < NEVER and m + r > sigma * norm.ppf(tau[1])
            can0 = tau[0] < NEVER and m - r < -sigma * norm.ppf(tau[0])
            if (can1 and c != 1) or (can0 and c != 0):
                return False
            sure1 = tau[1] < NEVER and m - r >= sigma * norm.ppf(tau[1])
            sure0 = tau[0] < NEVER and m + r <= -sigma * norm.ppf(tau[0])
            if (c == 1 and sure1) or (c == 0 and sure0):
                return True
        return False

    certified = [t for t in range(len(xs)) if pred[t] != ABSTAIN]
    failures = sum(not g_is_c_on_ball(xs[t], int(pred[t]), float(radius[t])) for t in certified)
    assert len(certified) > 150
    assert failures <= binom.isf(1e-6, len(certified), alpha)


class Threshold:
    """A 2-class linear expert on x in R^2: class 1 where a (x[0] - t) > 0."""

    def __init__(self, a, t, sigma):
        self.a, self.t, self.sigma, self.num_classes = float(a), float(t), float(sigma), 2

    def __call__(self, x):
        return (self.a * (x[:, 0] - self.t) > 0).long()

    def p1(self, s):  # the smoothed probability of class 1 at x[0] = s, exactly
        return norm.cdf(self.a * (s - self.t) / self.sigma)


def test_dual_smoothed_cascade_certify_and_predict_on_ground_truth():
    """End to end through DualSmoothed(rule="cascade"): every certified class is g(x) and every
    radius at most g's true robust radius (g depends on x[0] only, so its breakpoints along x[0]
    give the exact radius); PREDICT's answers are g(x). No router is sampled."""
    import torch

    from rsrouter.composition import DualSmoothed

    experts = [Threshold(1, 0.3, 0.25), Threshold(-1, -0.2, 0.5), Threshold(1, 0.0, 1.0)]
    spec = CascadeSpec((2, 0, 1), ((0.8, 0.6), (0.9, NEVER), (0.5, 0.5)))

    def g(s):
        for k, i in enumerate(spec.order):
            p1 = experts[i].p1(s)
            for c, p in ((0, 1 - p1), (1, p1)):
                if spec.thresholds[k][c] < NEVER and p > spec.thresholds[k][c]:
                    return c
        return ABSTAIN

    breaks = sorted(  # where p_k(1) = tau (class 1) or p_k(0) = tau (class 0)
        experts[i].t + experts[i].a * (1 if c else -1) * experts[i].sigma * norm.ppf(tau)
        for k, i in enumerate(spec.order)
        for c, tau in enumerate(spec.thresholds[k])
        if tau < NEVER
    )

    def true_radius(s):
        here, eps = g(s), 1e-9
        right = next((b - s for b in breaks if b > s and g(b + eps) != here), np.inf)
        left = next((s - b for b in reversed(breaks) if b < s and g(b - eps) != here), np.inf)
        return min(right, left)

    class NoRouter:
        num_classes = 3

        def __call__(self, x):
            raise AssertionError("the cascade must not sample the router")

    dual = DualSmoothed(NoRouter(), 1.0, experts, rule="cascade", cascade=spec)
    s = np.random.default_rng(1).uniform(-2.5, 2.5, 200)
    xs = torch.tensor(np.stack([s, np.zeros_like(s)], 1), dtype=torch.float32)
    alpha = 0.05
    certs = dual.certify_batch(xs, n0=30, n=500, alpha=alpha, seed=3)
    preds = dual.predict_batch(xs, n=500, alpha=alpha, seed=3)
    fail_c = fail_p = 0
    for si, c, p in zip(s, certs, preds, strict=True):
        truth = g(si)
        if not c.abstained:
            fail_c += c.prediction != truth or c.radius > true_radius(si) + 1e-9
            assert c.rule == "cascade" and c.alpha_expert == alpha and c.expert in (0, 1, 2)
        fail_p += not p.abstained and p.prediction != truth
    certified = sum(not c.abstained for c in certs)
    assert certified > 120 and sum(not p.abstained for p in preds) > 120
    assert len({c.expert for c in certs if not c.abstained}) == 3  # every stage certifies some
    assert fail_c <= binom.isf(1e-6, len(s), alpha) and fail_p <= binom.isf(1e-6, len(s), alpha)
    with pytest.raises(UsageError, match="fitted cascade"):
        DualSmoothed(NoRouter(), 1.0, experts, rule="cascade")
    with pytest.raises(UsageError, match="order"):
        DualSmoothed(NoRouter(), 1.0, experts, rule="cascade", cascade={"order": [0, 1]})


def test_certify_run_decides_the_cascade_from_the_cached_expert_counts(tmp_path):
    """A run over a router with a cascade: every record holds the cascade rule, equal to the
    API's certificate, costing the experts' draws only; the spec is part of the run's key."""
    from types import SimpleNamespace

    import torch

    from rsrouter.composition import DualSmoothed
    from rsrouter.composition.certify_run import certify_run, load_run
    from rsrouter.composition.report import summarize, to_markdown

    class Fp(Threshold):
        def __init__(self, *args, name):
            super().__init__(*args)
            self.fingerprint = f"fp-{name}"

    class Router:
        num_classes, fingerprint = 2, "fp-router"

        def __call__(self, x):
            return (x[:, 1] > 0).long()

    experts = [Fp(1, 0.2, 0.25, name="a"), Fp(1, -0.1, 1.0, name="b")]
    spec = CascadeSpec((1, 0), ((0.7, 0.9), (0.5, 0.5)))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(20, 2, generator=gen)
    ds = SimpleNamespace(name="toy", split="test", images=images, labels=(images[:, 0] > 0).long(),
                         class_names=("neg", "pos"), fingerprint="ds-toy")  # fmt: skip
    kw = {
        "n0": 20,
        "n": 200,
        "alpha": 0.01,
        "seed": 5,
        "progress": False,
        "expert_names": ["a", "b"],
    }
    dual = DualSmoothed(Router(), 1.0, experts, rule="cascade", cascade=spec)
    run = certify_run(dual, ds, tmp_path, **kw)
    meta, records = load_run(run.path)
    assert meta["rule"] == "cascade" and meta["cascade"] == spec.to_dict()
    assert meta["rules"] == ["min", "pairwise", "agreement", "cascade"]
    api = dual.certify_batch(images, n0=20, n=200, alpha=0.01, seed=5)
    for r, c in zip(records, api, strict=True):
        got = r["rules"]["cascade"]
        assert (got["prediction"], got["expert"]) == (c.prediction, c.expert)
        assert got["radius"] == pytest.approx(c.radius)
        assert got["forwards"] == 2 * (20 + 200)  # both experts, no router
    s = summarize(meta, records)
    assert "cascade" in s["methods"]["dual"]["label"] and "dual:agreement" in s["methods"]
    plain = DualSmoothed(Router(), 1.0, experts, rule="agreement")
    other = certify_run(plain, ds, tmp_path, **kw)
    assert other.path != run.path and "cascade" not in load_run(other.path)[1][0]["rules"]
    with pytest.raises(UsageError, match="fitted cascade"):
        certify_run(plain, ds, tmp_path, **{**kw, "rule": "cascade"})

    # without the router: the same cascade decisions from the cached expert counts, the router
    # never sampled, no other rule; a non-cascade rule is refused
    class Unsampled(Router):
        def __call__(self, x):
            raise AssertionError("the router was sampled")

    bare = DualSmoothed(Unsampled(), 1.0, experts, rule="cascade", cascade=spec)
    plans = []
    alone = certify_run(bare, ds, tmp_path / "alone", sample_router=False, on_plan=plans.append,
                        **kw)  # fmt: skip
    meta_alone, solo = load_run(alone.path)
    assert meta_alone["rules"] == ["cascade"] and "router" not in plans[0].sample
    for r, full in zip(solo, records, strict=True):
        assert r["router"] is None and set(r["rules"]) == {"cascade"}
        assert r["rules"]["cascade"] == {**full["rules"]["cascade"], "seconds": r["rules"][
            "cascade"]["seconds"]}  # fmt: skip
        assert r["baselines"]["multiscale"]["radius"] == full["baselines"]["multiscale"]["radius"]
    assert not (tmp_path / "alone" / "certify" / "router").exists()
    s = summarize(meta_alone, solo)
    assert [k for k in s["methods"] if k.startswith("dual")] == ["dual"]
    assert "the cascade alone, no router sampled" in to_markdown(s).splitlines()[2]
    assert "no router sampled" not in to_markdown(summarize(meta, records))
    assert s["methods"]["dual"]["acr"] == pytest.approx(summarize(meta, records)["methods"][
        "dual"]["acr"])  # fmt: skip
    with pytest.raises(UsageError, match="only the cascade"):
        certify_run(plain, ds, tmp_path, sample_router=False, **kw)
