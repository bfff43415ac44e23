"""Report numbers recomputed by hand from six hand-made records."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from rsrouter.composition.report import (
    bootstrap_weights,
    breakpoints,
    certified_accuracy,
    radius_grid,
    regret,
    regret_every_radius,
    regret_intervals,
    resampled_accuracy,
    summarize,
    to_markdown,
    write_report,
)
from rsrouter.errors import UsageError

META = {
    "run": "r",
    "dataset": {"name": "toy", "split": "test"},
    "experts": ["a", "b"],
    "sigmas": [0.25, 0.5],
    "sigma_e": 0.5,
    "n0": 10,
    "n": 100,
    "alpha": 0.001,
    "alpha_router": 0.0005,
    "alpha_expert": 0.0005,
    "p_skip": 0.5,
}


def rec(label, expert, pred, radius, expert_pred, a, b, ms, oracle):
    """a, b, ms: (prediction, radius) of each baseline; oracle: (expert, radius)."""

    def base(p):
        return {"prediction": p[0], "radius": p[1], "correct": p[0] == label, "seconds": 1.0}

    return {
        "label": label,
        "expert": expert,
        "prediction": pred,
        "radius": radius,
        "correct": pred == label,
        "expert_counts": None if expert < 0 else {"prediction": expert_pred},
        "seconds": 2.0,
        "baselines": {
            "experts": [base(a), base(b)],
            "multiscale": {**base(ms), "seconds": 1.5},
            "oracle": {"expert": oracle[0], "radius": oracle[1], "correct": oracle[0] >= 0},
        },
    }


RECORDS = [
    rec(1, 1, 1, 0.6, 1, (1, 0.3), (1, 0.6), (1, 0.5), (1, 0.6)),
    rec(0, 0, 0, 0.2, 0, (0, 0.2), (1, 0.9), (1, 0.4), (0, 0.2)),
    rec(2, 0, 1, 0.3, 1, (1, 0.3), (-1, 0.0), (-1, 0.0), (-1, 0.0)),
    rec(0, 1, 0, 1.1, 0, (-1, 0.0), (0, 1.1), (0, 1.0), (1, 1.1)),
    rec(1, 0, -1, 0.0, -1, (-1, 0.0), (0, 0.4), (-1, 0.0), (-1, 0.0)),
    rec(3, -1, -1, 0.0, None, (2, 0.5), (2, 0.3), (-1, 0.0), (-1, 0.0)),
]


def test_numbers_by_hand():
    s = summarize(META, RECORDS)
    assert s["grid"] == [0, 0.25, 0.5, 0.75, 1.0]  # largest radius seen: 1.1
    m = s["methods"]
    assert m["dual"]["certified_accuracy"] == pytest.approx([3 / 6, 2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert m["dual"]["acr"] == pytest.approx((0.6 + 0.2 + 1.1) / 6)
    assert m["expert:a"]["certified_accuracy"] == pytest.approx([2 / 6, 1 / 6, 0, 0, 0])
    assert m["expert:b"]["certified_accuracy"] == pytest.approx([2 / 6, 2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert m["expert:b"]["acr"] == pytest.approx(1.7 / 6)
    assert m["multiscale"]["certified_accuracy"] == pytest.approx(
        [2 / 6, 2 / 6, 2 / 6, 1 / 6, 1 / 6]
    )
    assert m["oracle"]["certified_accuracy"] == pytest.approx([3 / 6, 2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert s["gap_to_best_single"] == pytest.approx([1 / 6, 0, 0, 0, 0])
    assert s["gap_to_multiscale"] == pytest.approx([1 / 6, 0, 0, 0, 0])
    # below Multiscale [2, 2, 2, 1, 1] / 6 at most: a [2, 1, 0, 0, 0] / 6 by 2/6 at r = 0.5
    assert m["expert:a"]["below_multiscale"] == pytest.approx(100 * 2 / 6)
    assert m["dual"]["below_multiscale"] == 0.0 and m["expert:b"]["below_multiscale"] == 0.0
    assert s["best_single"][1:] == ["expert:b"] * 4
    assert s["routing"] == pytest.approx({"a": 3 / 6, "b": 2 / 6})
    assert s["abstention"] == pytest.approx(
        {"router": 1 / 6, "expert": 1 / 6, "expert_among_routed": 1 / 5}
    )
    assert m["dual"]["seconds_per_input"] == 2.0 and m["oracle"]["seconds_per_input"] is None
    assert "not a certificate" in m["oracle"]["label"]
    assert "re-implementation" in m["multiscale"]["label"]


def test_regret_and_cost_by_hand():
    s = summarize(META, RECORDS)
    m = s["methods"]
    # envelope: best of a [2, 1, 0, 0, 0] / 6 and b [2, 2, 2, 1, 1] / 6 up to b's radius 1.1
    assert s["envelope"]["grid"] == [0, 0.25, 0.5, 0.75, 1.0]
    assert s["envelope"]["certified_accuracy"] == pytest.approx([2 / 6, 2 / 6, 2 / 6, 1 / 6, 1 / 6])
    assert m["expert:a"]["regret"] == pytest.approx(100 * 2 / 6)  # at r = 0.5
    assert m["expert:b"]["regret"] == pytest.approx(0.0)
    assert m["dual"]["regret"] == pytest.approx(0.0)  # level with b from r = 0.25 on
    assert m["dual"]["regret_at"] == pytest.approx(
        {"0": -100 / 6, "0.5": 0.0, "1": 0.0, "1.5": 0.0}
    )
    assert m["expert:a"]["regret_at"] == pytest.approx(
        {"0": 0.0, "0.5": 100 * 2 / 6, "1": 100 / 6, "1.5": 0.0}
    )
    assert m["oracle"]["regret"] == pytest.approx(0.0)
    # forward passes: n0 + n = 110 per model; the router routed 5 of 6 inputs to an expert
    assert m["dual"]["forwards_per_input"] == pytest.approx(110 * (1 + 5 / 6))
    assert m["expert:a"]["forwards_per_input"] == 110
    assert m["multiscale"]["forwards_per_input"] is None  # these records do not say
    # a finer step looks between the grid points: expert a trails b by 2/6 on (0.3, 0.6]
    fine = summarize(META, RECORDS, step=0.1)
    assert fine["envelope"]["grid"][-1] == pytest.approx(1.1)
    assert fine["methods"]["expert:a"]["regret"] == pytest.approx(100 * 2 / 6)
    md = to_markdown(s)
    lo, hi = m["dual"]["regret_interval"]
    every = m["dual"]["regret_every_radius"]
    e_lo, e_hi = m["dual"]["regret_every_radius_interval"]
    row = (f"| 0.317 | 0.0 [{lo:.1f}, {hi:.1f}] | {every:.1f} [{e_lo:.1f}, {e_hi:.1f}] "
           "| -16.7 / +0.0 / +0.0 / +0.0 | 202 |")  # fmt: skip
    assert row in md
    for key in m:  # every resample's every-r regret is at least its grid regret
        assert m[key]["regret_every_radius_interval"][0] >= m[key]["regret_interval"][0] - 1e-9
        assert m[key]["regret_every_radius_interval"][1] >= m[key]["regret_interval"][1] - 1e-9
    for key in m:  # no grid: never below the grid's figure, and a's dip on (0.3, 0.6] is there
        assert m[key]["regret_every_radius"] >= m[key]["regret"] - 1e-9
    assert m["expert:a"]["regret_every_radius"] == pytest.approx(100 * 2 / 6)
    assert m["expert:b"]["regret_every_radius"] == pytest.approx(0.0)


def test_regret_every_radius_finds_the_dip_a_grid_steps_over():
    # the expert certifies 3 of 4 inputs to 0.2 and one to 1.0; the method one to 0.1, 3 to 1.0
    expert = (np.ones(4, bool), np.array([0.2, 0.2, 0.2, 1.0]))
    correct, radius = np.ones(4, bool), np.array([0.1, 1.0, 1.0, 1.0])
    grid = radius_grid(1.0)  # 0, 0.25, ...: at 0 both 100 %, from 0.25 on the method leads
    env = certified_accuracy(*expert, grid)
    assert regret(correct, radius, grid, env) == pytest.approx(0.0)
    # on (0.1, 0.2] the expert certifies 4 and the method 3: 25 points, between two grid points
    assert regret_every_radius(correct, radius, [expert]) == pytest.approx(25.0)
    # only up to the largest radius an expert certifies: beyond it no shortfall is counted
    short = (np.ones(4, bool), np.array([0.05, 0.05, 0.05, 0.05]))
    assert regret_every_radius(np.zeros(4, bool), np.zeros(4), [short]) == pytest.approx(100.0)
    assert regret_every_radius(correct, radius, [short]) == pytest.approx(0.0)


def test_regret_every_radius_against_a_dense_grid():
    rng = np.random.default_rng(3)
    for _ in range(50):
        rows = int(rng.integers(1, 30))
        curves = [(rng.random(rows) < 0.7, rng.integers(0, 300, rows) / 100)
                  for _ in range(int(rng.integers(2, 5)))]  # fmt: skip
        (correct, radius), singles = curves[0], curves[1:]
        top = max(r.max() for _, r in singles)
        dense = np.arange(0, int(round(top * 1000)) + 1) / 1000  # every radius is on it
        env = np.max([certified_accuracy(c, r, dense) for c, r in singles], axis=0)
        truth = 100 * np.max(env - certified_accuracy(correct, radius, dense))
        assert regret_every_radius(correct, radius, singles) == pytest.approx(truth)


def test_resampled_accuracy_against_the_matrix_it_avoids():
    """The sorted cumulative sum gives, on every resample, the weighted share of inputs that are
    correct with radius >= r: the (inputs, grid) matrix product, abstentions (NaN radius, or
    wrong) certifying nothing."""
    rng = np.random.default_rng(5)
    for _ in range(30):
        rows = int(rng.integers(1, 40))
        correct = rng.random(rows) < 0.7
        radius = rng.integers(0, 20, rows) / 10  # ties, and radius 0 on the grid
        radius[rng.random(rows) < 0.1] = np.nan
        grid = np.unique(np.concatenate([[0.0, 0.05, 3.0], radius[~np.isnan(radius)]]))
        weights = bootstrap_weights(rows, 7, rng)
        hits = correct[:, None] & (np.nan_to_num(radius, nan=-1.0)[:, None] >= grid[None])
        assert resampled_accuracy(correct, radius, grid, weights) == pytest.approx(weights @ hits)


def test_every_radius_interval_against_a_dense_grid():
    """The every-r regret's interval, taken over the breakpoints alone, is the interval over a
    dense grid holding every radius (the same seeded resamples)."""
    rng = np.random.default_rng(8)
    rows = 60
    table = {k: {"correct": rng.random(rows) < 0.8, "radius": rng.integers(0, 250, rows) / 100}
             for k in ("expert:a", "expert:b", "dual")}  # fmt: skip
    table["expert:a"]["radius"] = np.minimum(table["expert:a"]["radius"], 0.9)  # a short expert
    top = max(table[k]["radius"].max() for k in ("expert:a", "expert:b"))
    points = breakpoints([m["radius"] for m in table.values()], top)
    assert points[0] == 0 and points[-1] == top and np.all(np.diff(points) > 0)
    dense = np.arange(0, int(round(top * 100)) + 1) / 100
    on_points = regret_intervals(table, points, resamples=300)
    on_dense = regret_intervals(table, dense, resamples=300)
    for key in table:
        assert on_points[key] == pytest.approx(on_dense[key])
    coarse = regret_intervals(table, radius_grid(top), resamples=300)  # the 0.25 grid
    assert any(on_points[k][1] > coarse[k][1] + 1 for k in table)  # it looks between its points


def test_regret_interval_against_the_binomial():
    """A method that is the best expert except on a fixed 10 % of inputs trails the envelope by
    exactly that share at every radius, so its regret on a resample is Binomial(N, 0.1) / N:
    the bootstrap interval must match the binomial's central 95 % (10 +- 1.96 * 1.5 points)."""
    rows = 400
    wrong = np.arange(rows) % 10 == 0
    table = {
        "expert:a": {"correct": np.ones(rows, bool), "radius": np.ones(rows)},
        "expert:b": {"correct": np.ones(rows, bool), "radius": np.full(rows, 0.5)},
        "dual": {"correct": ~wrong, "radius": np.ones(rows)},
    }
    grid = [0.0, 0.5, 1.0]
    out = regret_intervals(table, grid, resamples=2000)
    assert out["expert:a"] == [0.0, 0.0]  # the envelope itself on every resample
    assert out["expert:b"] == pytest.approx([100.0, 100.0])  # nothing at r = 1, where a has all
    lo, hi = out["dual"]
    assert 10 - 1.96 * 1.5 - 0.8 < lo < 10 - 1.96 * 1.5 + 0.8
    assert 10 + 1.96 * 1.5 - 0.8 < hi < 10 + 1.96 * 1.5 + 0.8
    assert regret_intervals(table, grid, resamples=2000) == out  # seeded
    assert regret_intervals(table, grid, resamples=50, level=0.5)["dual"][1] < hi
    for bad in ({"resamples": 0}, {"level": 1.0}, {"level": 0}):
        with pytest.raises(UsageError, match="resamples|level"):
            regret_intervals(table, grid, **bad)


def test_files_markdown_csv_json_png(tmp_path):
    paths = write_report(META, RECORDS, tmp_path / "report", grid=[0.0, 0.5])
    rows = list(csv.reader(paths["csv"].open()))
    assert rows[0] == [
        "method", "label", "r=0", "r=0.5", "acr", "regret", "regret_95_lo", "regret_95_hi",
        "regret_every_radius", "regret_every_radius_95_lo", "regret_every_radius_95_hi",
        "below_multiscale", "regret r=0", "regret r=0.5", "regret r=1", "regret r=1.5",
        "forwards_per_input",
    ]  # fmt: skip
    dual = next(r for r in rows if r[0] == "dual")
    assert float(dual[2]) == pytest.approx(0.5) and float(dual[3]) == pytest.approx(2 / 6)
    assert float(next(r for r in rows if r[0] == "expert:a")[5]) == pytest.approx(33.3333)
    assert float(next(r for r in rows if r[0] == "expert:a")[11]) == pytest.approx(33.3333)
    assert next(r for r in rows if r[0] == "gap_multiscale")[2:4] == ["0.166667", "0.000000"]
    md = paths["markdown"].read_text()
    assert "| 50.0 | 33.3 |" in md and "oracle — not a certificate" in md
    assert "| dual − Multiscale (points) | +16.7 | +0.0 | | |" in md
    assert "The headline is never below Multiscale on that grid." in md
    s = summarize(META, RECORDS)
    s["methods"]["dual"]["below_multiscale"] = 2.5
    assert "The headline is up to 2.5 points below Multiscale on that grid." in to_markdown(s)
    del s["methods"]["dual"]["below_multiscale"], s["gap_to_multiscale"]  # an older summary
    assert "below Multiscale" not in to_markdown(s) and "dual − Multiscale" not in to_markdown(s)
    assert json.loads(paths["summary"].read_text())["inputs"] == 6
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert to_markdown(summarize(META, RECORDS)).count("\n| ") >= 6


def test_grid_and_empty_runs():
    assert radius_grid(0.0) == [0]
    assert radius_grid(0.74) == [0, 0.25, 0.5]
    assert radius_grid(0.75) == [0, 0.25, 0.5, 0.75]
    assert len(radius_grid(9.99, 0.01)) == 1000
    with pytest.raises(UsageError, match="gives 100001 columns"):
        radius_grid(1.0, 1e-5)  # before anything is written
    with pytest.raises(UsageError, match="router certify"):
        summarize(META, [])
