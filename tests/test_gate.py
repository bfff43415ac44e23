"""Gate routers (experts that gate themselves) and their fitting on the val split."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import small_cnn_expert, val_split_workspace
from rsrouter.composition.tuning import CASCADE_FITS
from rsrouter.router import gate as gates
from rsrouter.router.model import RouterModel
from rsrouter.smoothing import ROUTER_ESTIMATION, sample_counts


def gate_router(thresholds, order=(1, 0), seed=0, class_thresholds=None) -> RouterModel:
    expert = small_cnn_expert(0.5, num_classes=3, seed=seed)
    gate = {"thresholds": list(thresholds), "order": list(order), "classes": 3}
    if class_thresholds is not None:
        gate["class_thresholds"] = [list(row) for row in class_thresholds]
    router = RouterModel(
        arch="small_cnn", arch_args={"width": 2}, expert_names=["a", "b"], sigmas=[0.25, 0.5],
        fingerprints=["x", "y"], in_chans=1, input_size=[8, 8], mean=[0.0], std=[1.0],
        gate=gate,
    )  # fmt: skip
    router.classifier.load_state_dict(expert.classifier.state_dict())
    return router.eval()


def test_gate_routes_confident_draws_to_the_largest_sigma():
    logits = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 0.0], [2.0, 1.5, 0.0]])
    h = gates.normalized_entropy(logits)
    assert h[0] < 0.05 and h[1] == pytest.approx(1.0) and 0.3 < h[2] < 1
    thresholds, order = torch.tensor([0.2, 0.9]), torch.tensor([2, 1, 0])
    assert gates.route_by_score(h, thresholds, order).tolist() == [2, 0, 1]
    assert gates.default_order([0.25, 1.0, 0.5]) == [1, 2, 0]


def test_gate_counts_from_score_bins_equal_the_gate_routers_own_counts():
    """The fitting pass is exact: for thresholds on the bin edges, summing the bins gives the
    very counts the gate router draws under the same noise."""
    torch.manual_seed(1)
    xs = torch.rand(6, 1, 8, 8)
    edges = gates.bin_edges(10)
    kw = {"seed": 3, "indices": list(range(6)), "stage": ROUTER_ESTIMATION}
    bins = sample_counts(gates.ScoreBins(gate_router([1.0]), edges), xs, 0.5, 64,
                         num_classes=10, **kw).numpy()  # fmt: skip
    assert bins.sum(axis=1).tolist() == [64] * 6
    for cut in range(11):
        thresholds = gates.cut_thresholds([cut], edges)
        own = sample_counts(gate_router(thresholds), xs, 0.5, 64, num_classes=2, **kw).numpy()
        assert np.array_equal(gates.counts_for(bins, [cut], [1, 0]), own), cut


def test_class_gate_counts_from_class_bins_equal_the_class_gate_routers_own_counts():
    """The same for a class gate: (predicted class, score bin) counts split by each class's own
    cut give the counts of the class-gate router with those rows, under the same noise."""
    torch.manual_seed(2)
    xs = torch.rand(6, 1, 8, 8)
    edges = gates.bin_edges(5)
    kw = {"seed": 4, "indices": list(range(6)), "stage": ROUTER_ESTIMATION}
    binner = gates.ScoreBins(gate_router([1.0]), edges, per_class=True)
    assert binner.num_classes == 15
    bins = sample_counts(binner, xs, 0.5, 64, num_classes=15, **kw).numpy()
    plain = sample_counts(gates.ScoreBins(gate_router([1.0]), edges), xs, 0.5, 64,
                          num_classes=5, **kw).numpy()  # fmt: skip
    assert np.array_equal(bins.reshape(6, 3, 5).sum(axis=1), plain)  # same draws, same bins
    for cuts in ([(0,), (5,), (2,)], [(3,), (1,), (4,)]):
        rows = [gates.cut_thresholds(c, edges) for c in cuts]
        router = gate_router([0.5], class_thresholds=rows)
        assert router.kind == "class-gate"
        own = sample_counts(router, xs, 0.5, 64, num_classes=2, **kw).numpy()
        assert np.array_equal(gates.class_counts_for(bins, cuts, [1, 0]), own), cuts


def test_fit_class_gate_gives_each_class_its_own_threshold():
    """Inputs predicted as class 0 need the small sigma when uncertain, inputs of class 1 do
    not: a shared threshold must trade one against the other, a row per class need not."""
    from rsrouter.composition.tuning import ValidationCounts, fit_class_gate, fit_gate

    n = 400
    labels = np.zeros(8, dtype=np.int64)
    # inputs 0-3 predicted class 0, 4-7 class 1; all draws of each in the middle score bin (1)
    mid = np.zeros((8, 2, 3), dtype=np.int64)
    mid[:4, 0, 1] = n
    mid[4:, 1, 1] = n
    est_bins = mid.reshape(8, 6)
    right, wrong = [n, 0], [0, n]
    # class-0 inputs: only expert 0 (sigma 0.25) is right; class-1 inputs: only expert 1
    est = [np.array([right] * 4 + [wrong] * 4), np.array([wrong] * 4 + [right] * 4)]
    vc = ValidationCounts(labels, [e // 4 for e in est], est, [0.25, 1.0])
    fit = {"sigma_e": 1.0, "alpha": 0.01, "rule": "min"}
    gate, tried = fit_class_gate(est_bins // 4, est_bins, vc, classes=2, **fit)
    shared, _ = fit_gate(mid.sum(axis=1) // 4, mid.sum(axis=1), vc, **fit)
    assert gate["thresholds"] == shared["thresholds"]  # the start: the best shared row
    rows = gate["class_thresholds"]
    assert rows[0][0] < gates.bin_edges(3)[1] <= rows[1][0]  # class 0 -> sigma 0.25 band
    best = min(tried, key=lambda t: (round(t["objective"], 2), -t["acr"]))  # resampled regret
    assert best["routed"] == [0.5, 0.5]
    kept = [t for t in tried if t["class"] is not None and t["kept"]]
    assert kept and kept[-1] is best  # the rows kept are the descent's strict improvements
    start = [t for t in tried if t["class"] is None]
    assert len(start) == 4
    assert all(t["objective"] >= best["objective"] and t["acr"] < best["acr"] for t in start)


def test_gate_spec_is_checked():
    from rsrouter.errors import UsageError

    with pytest.raises(UsageError, match="must not decrease"):
        gates.check_gate({"thresholds": [0.5, 0.2], "order": [0, 1, 2], "classes": 3}, [1, 2, 3])
    with pytest.raises(UsageError, match="each of the 2 experts once"):
        gates.check_gate({"thresholds": [0.5], "order": [0, 0], "classes": 3}, [1, 2])
    with pytest.raises(UsageError, match="needs 3 rows"):
        gates.check_gate(
            {"thresholds": [0.5], "order": [0, 1], "classes": 3, "class_thresholds": [[0.1]]},
            [1, 2],
        )
    with pytest.raises(UsageError, match="row 1 must have 1 values"):
        gates.check_gate(
            {"thresholds": [0.5], "order": [0, 1], "classes": 2,
             "class_thresholds": [[0.1], [0.1, 0.2]]},
            [1, 2],
        )  # fmt: skip
    router = gate_router([0.4])
    again = RouterModel.from_config(json.loads(json.dumps(router.config())))
    assert again.gate == router.gate and again.kind == "gate"
    router = gate_router([0.4], class_thresholds=[[0.1], [0.5], [0.9]])
    again = RouterModel.from_config(json.loads(json.dumps(router.config())))
    assert again.gate == router.gate and again.kind == "class-gate"
    assert router.fingerprint != gate_router([0.4]).fingerprint  # the rows are in the config


def test_fit_gate_picks_the_thresholds_with_least_val_regret():
    """Two experts; expert 0 (small sigma) is right where the score is high, expert 1 where it
    is low: the fitted cut must split the inputs there. The fit ranks by the mean regret over
    val resamples (``objective``, as the cascade's fit does) and records the sample's own."""
    from rsrouter.composition.dual import split_alpha
    from rsrouter.composition.tuning import (
        ValidationCounts,
        decide_all,
        fit_gate,
        resampled_regret,
    )

    n, bins = 400, 4
    labels = np.zeros(8, dtype=np.int64)
    hi_score = np.array([[0, 0, 0, n]] * 4 + [[n, 0, 0, 0]] * 4)  # inputs 0-3 uncertain
    right, wrong = [n, 0], [0, n]
    sel = [np.array([right] * 4 + [wrong] * 4), np.array([wrong] * 4 + [right] * 4)]
    vc = ValidationCounts(labels, [s // 4 for s in sel], sel, [0.25, 1.0])
    gate, tried = fit_gate(hi_score // 4, hi_score, vc, sigma_e=1.0, alpha=0.01)
    assert len(tried) == bins + 1
    assert gate["order"] == [1, 0] and 0 < gate["thresholds"][0] < 0.75
    chosen = next(t for t in tried if t["thresholds"] == gate["thresholds"])
    assert chosen["routed"] == [0.5, 0.5] and chosen["abstained"] == 0
    others = [t for t in tried if t["routed"] != chosen["routed"]]  # cuts 0 and 4
    assert len(others) == 2 and all(
        t["regret"] >= chosen["regret"] and t["acr"] < chosen["acr"] for t in others
    )
    assert all(t["objective"] >= chosen["objective"] for t in others)
    # the objective recorded is the resampled regret of the chosen gate's own decisions
    full = [-1.0, *gates.bin_edges(bins), 1.0]
    cuts = [full.index(t) for t in gate["thresholds"]]
    a_router, a_expert = split_alpha(0.01)
    routed = [gates.counts_for(b, cuts, gate["order"]) for b in (hi_score // 4, hi_score)]
    pred, radius, _ = decide_all(
        "min", *routed, vc, sigma_e=1.0, alpha_router=a_router, alpha_expert=a_expert
    )
    assert chosen["objective"] == pytest.approx(resampled_regret(vc, 0.01)(pred == labels, radius))


def test_router_train_kind_gate_end_to_end(tmp_path, monkeypatch, capsys):
    """`router train --kind gate` fits on the val split only, then certify routes with it."""
    from rsrouter.cli.main import run

    ws = val_split_workspace(tmp_path, (0.25, 0.5))
    read = []
    import rsrouter.data as data

    original = data.load_dataset
    monkeypatch.setattr(
        data, "load_dataset", lambda *a, **k: read.append(a[1]) or original(*a, **k)
    )
    w = ["-w", str(ws.root), "--device", "cpu"]
    assert run(["train", "--kind", "gate", *w]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "gate router: a copy of g0.5" in out and "among 5 on 12 val inputs" in out, out
    assert read == ["train"]  # the val split is carved from train; test is never read
    router = RouterModel.from_pretrained(ws.artifacts / "router")
    assert router.kind == "gate" and router.info["tuning"]["split"] == "val"
    tried = json.loads((ws.artifacts / "router" / "tuning.json").read_text())["tried"]
    assert len(tried) == 5  # one cut among the 5 bin boundaries
    assert run(["certify", *w]) == 0, capsys.readouterr().err
    capsys.readouterr()
    read.clear()
    assert run(["train", "--kind", "class-gate", *w]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "class-gate router: a copy of g0.5" in out, out
    assert "entropy thresholds per predicted class" in out and "on 12 val inputs" in out, out
    assert "the experts' cascade, fitted on the same val inputs (regret): stages" in out, out
    assert read == ["train"]
    router = RouterModel.from_pretrained(ws.artifacts / "router")
    assert router.kind == "class-gate" and len(router.gate["class_thresholds"]) == 10
    assert run(["certify", *w]) == 0, capsys.readouterr().err
    # the same val counts fit the experts' cascade: its rule is decided in every run
    cascade = router.info["cascade"]
    assert sorted(cascade["order"]) == [0, 1] and len(cascade["thresholds"][0]) == 10
    tuning = json.loads((ws.artifacts / "router" / "tuning.json").read_text())
    assert len(tuning["cascade"]) > 2 and router.info["tuning"]["cascade"]["regret"] >= -100
    chosen = router.info["tuning"]["cascade"]  # the fit's pick: the least resampled val regret
    assert chosen["objective"] == min(t["objective"] for t in tuning["cascade"])
    capsys.readouterr()
    assert run(["certify", "--rule", "cascade", *w]) == 0, capsys.readouterr().err
    assert "class-aware cascade" in capsys.readouterr().out


def test_router_train_cascade_fits(tmp_path, capsys):
    """`router train --cascade`: keep-multiscale keeps the largest sigma first at 1/2 and fits
    the rest; plain is Multiscale's spec; a bad name, or a router that fits no cascade, is
    refused in one sentence and the saved router is left as it was."""
    from rsrouter.cli.main import run
    from rsrouter.composition.cascade import multiscale_spec

    ws = val_split_workspace(tmp_path, (0.25, 0.5, 1.0))
    w = ["-w", str(ws.root), "--device", "cpu"]
    folder = ws.artifacts / "router"
    for fit in ("keep-multiscale", "plain"):
        assert run(["train", "--kind", "class-gate", "--cascade", fit, *w]) == 0, (
            capsys.readouterr().err
        )
        assert f"fitted on the same val inputs ({fit}): stages g1.0 → " in (capsys.readouterr().out)
        router = RouterModel.from_pretrained(folder)
        cascade = router.info["cascade"]
        assert cascade["order"][0] == 2 and cascade["thresholds"][0] == [0.5] * 10
        assert router.info["tuning"]["cascade_fit"] == fit
        assert router.info["tuning"]["cascade_fit_meaning"] == CASCADE_FITS[fit]
        tried = json.loads((folder / "tuning.json").read_text())["cascade"]
        assert all(t["order"][0] == 2 for t in tried)
        if fit == "plain":
            assert cascade == multiscale_spec([0.25, 0.5, 1.0], 10).to_dict() and len(tried) == 1
        else:
            assert len(tried) > 1 and all(t["thresholds"][0] == [0.5] * 10 for t in tried
                                          if "thresholds" in t)  # fmt: skip
    saved = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    for argv, match in (
        (["--kind", "class-gate", "--cascade", "bogus"], "unknown cascade fit 'bogus': use one"),
        (["--kind", "learned", "--cascade", "plain"], "a learned router fits no cascade"),
    ):
        status = run(["train", *argv, *w])
        err = capsys.readouterr().err
        assert status != 0 and match in " ".join(err.split()), err
        assert {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()} == saved


def test_card_of_a_gate_router_states_its_bands():
    from rsrouter.composition.card import render_card

    pins = [{"name": n, "sigma": s} for n, s in (("s25", 0.25), ("s50", 0.5), ("s1", 1.0))]
    config = {
        "arch": "small_cnn", "sigma_e": 1.0, "in_chans": 1, "input_size": [8, 8], "init": "s1",
        "class_names": ["Coat", "Shirt"], "bundle": {"experts": pins},
        "gate": {"score": "entropy", "thresholds": [0.55, 0.55], "order": [2, 1, 0],
                 "classes": 2},
    }  # fmt: skip
    text = str(render_card(config))
    assert "a copy of expert s1 whose normalised entropy h on each noisy draw" in text
    assert "h ≤ 0.55 → s1; h > 0.55 → s25." in text  # the empty band of s50 is left out
    config["gate"]["class_thresholds"] = [[1.0, 1.0], [0.2, 0.7]]
    text = str(render_card(config))
    assert "Coat: every draw → s1; Shirt: h ≤ 0.2 → s1; 0.2 < h ≤ 0.7 → s50; h > 0.7 → s25" in text
    assert "cascade" not in text
    config["cascade"] = {"order": [2, 0, 1], "thresholds": [[0.5, 0.9], [0.5, 1.0], [0.5, 0.5]]}
    text = str(render_card(config))
    assert "class-aware cascade of the experts" in text and "| cascade.order | [2, 0, 1] |" in text
    assert "(fit " not in text  # a router fitted before the fit was recorded
    config["tuning"] = {"cascade_fit": "keep-multiscale"}  # the name, and what it means
    assert "no router is read (fit keep-multiscale)" in str(render_card(config))
    config["tuning"]["cascade_fit_meaning"] = "the largest sigma first at 1/2"
    assert "no router is read (fit keep-multiscale: the largest sigma first" in str(
        render_card(config)
    )


def test_router_train_defaults_to_the_class_gate_where_there_is_a_val_split(tmp_path):
    from rsrouter.registry import Workspace
    from rsrouter.router.train import router_kind, router_settings

    ws = Workspace.init(tmp_path / "ws")
    assert router_kind(router_settings(ws)) == "learned"  # nothing to fit a gate on
    ws.update_settings("data", validation=30)
    assert router_kind(router_settings(ws)) == "class-gate"
    assert router_kind(router_settings(ws, kind="gate")) == "gate"
    assert router_kind(router_settings(ws, kind="learned")) == "learned"
    assert router_kind(router_settings(ws, kind="class-map", class_map={"0": "a"})) == "class-map"
    ws.update_settings("router", kind="learned")  # what the pipeline writes for the paper's
    assert router_kind(router_settings(ws)) == "learned"


def test_fit_biases_moves_the_route_where_val_says_it_pays():
    """The router leans to expert 1 on the inputs only expert 0 gets right: a negative bias on
    expert 1 (fitted on val) sends them back, while its confident votes stay with expert 1."""
    from rsrouter.composition.dual import split_alpha
    from rsrouter.composition.tuning import (
        ValidationCounts,
        decide_all,
        fit_biases,
        resampled_regret,
    )

    n = 1000
    labels = np.zeros(8, dtype=np.int64)
    right, wrong = [n, 0], [0, n]
    est = [np.array([right] * 4 + [wrong] * 4), np.array([wrong] * 4 + [[900, 100]] * 4)]
    vc = ValidationCounts(labels, [e // 10 for e in est], est, [0.25, 1.0])
    r_est = np.array([[450, 550]] * 4 + [[5, 995]] * 4)
    biases, tried = fit_biases(r_est // 10, r_est, vc, sigma_e=1.0, alpha=0.01, rule="pairwise")
    assert biases[0] == 0.0 and biases[1] < 0 and len(tried) == 13
    chosen = next(t for t in tried if t["biases"] == biases)
    plain = next(t for t in tried if t["biases"] == [0.0, 0.0])
    assert chosen["routed"] == [0.5, 0.5] and plain["routed"][0] == 0.0
    assert chosen["regret"] <= plain["regret"] and chosen["acr"] > plain["acr"]
    # the fit minimises the val sample's regret (the resampled objective is recorded beside),
    # and one scorer decides every candidate as a fresh decide_all does
    assert chosen["regret"] == min(t["regret"] for t in tried)
    objective = resampled_regret(vc, 0.01)
    a_router, a_expert = split_alpha(0.01, None)
    for t in tried:
        pred, radius, routed = decide_all("pairwise", r_est // 10, r_est, vc, sigma_e=1.0,
                                          biases=t["biases"], alpha_router=a_router,
                                          alpha_expert=a_expert)  # fmt: skip
        assert t["routed"] == [float(np.mean(routed == j)) for j in range(2)]
        assert t["objective"] == pytest.approx(objective(pred == labels, radius))


@pytest.mark.parametrize("rule", ["min", "pairwise", "agreement"])
@pytest.mark.parametrize("biased", [False, True])
def test_decide_all_decides_as_decide_input_by_input(rule, biased):
    """The val fits decide every input at once (rules.decide_rows); certify runs call decide
    per input. Random counts, router and expert abstentions, near-ties and unanimous votes
    included: the same class, radius and route, to the last bit."""
    from rsrouter.composition.dual import decide
    from rsrouter.composition.tuning import ValidationCounts, decide_all
    from rsrouter.smoothing import Certificate

    rng = np.random.default_rng(4)
    rows, n, classes = 300, 500, 3
    sigmas = [0.25, 0.5, 1.0]

    def counts(k):  # a mix of sure, split and one-class votes
        p = rng.dirichlet(np.full(k, rng.choice([0.1, 1.0, 10.0])), size=rows)
        c = np.array([rng.multinomial(n, q) for q in p])
        c[rng.random(rows) < 0.1] = np.eye(k, dtype=np.int64)[rng.integers(0, k)] * n
        return c

    labels = rng.integers(0, classes, rows)
    est = [counts(classes) for _ in sigmas]
    vc = ValidationCounts(labels, [e // 5 for e in est], est, sigmas)
    router = counts(len(sigmas))
    # near ties, where the biases move the leader
    router[:30] = rng.permuted(np.tile([[240, 210, 50]], (30, 1)), axis=1)
    biases = rng.normal(0, 0.5, len(sigmas)) if biased else None
    kw = {"sigma_e": 1.0, "alpha_router": 0.0005, "alpha_expert": 0.0005}
    memo: dict = {}
    pred, radius, routed = decide_all(rule, router // 5, router, vc, biases=biases, memo=memo,
                                      **kw)  # fmt: skip
    for i in range(rows):
        c = decide(rule, (router[i] // 5, router[i]), [(s[i], e[i]) for s, e in
                   zip(vc.selection, vc.estimation, strict=True)], sigmas=sigmas, biases=biases,
                   **kw)  # fmt: skip
        assert (pred[i], radius[i], routed[i]) == (c.prediction, c.radius, c.expert)
    assert len(set(routed.tolist())) > 1 and (pred == -1).any() and (pred >= 0).any()
    # the experts' certificates are kept per level for the next candidate
    ((level, (e_pred, e_rad)),) = memo.items()
    assert level == 0.0005 / (3 if rule == "agreement" else 1)
    for j, sigma in enumerate(sigmas):
        for i in range(rows):
            c = Certificate.from_counts(vc.selection[j][i], vc.estimation[j][i], sigma, level)
            assert (e_pred[j, i], e_rad[j, i]) == (c.prediction, c.radius)
