"""benchmarks/routing_study.py end to end on a tiny workspace: every design, every rule; and
benchmarks/cascade_ceiling.py on the counts it cached."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from helpers import val_split_workspace

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "routing_study.py"
CEILING = Path(__file__).parents[1] / "benchmarks" / "cascade_ceiling.py"


def test_routing_study_runs_every_design_and_writes_every_rule(tmp_path, monkeypatch, capsys):
    from rsrouter.cli.main import run

    ws = val_split_workspace(tmp_path, (0.25, 1.0))
    ws.update_settings("tables", n=12, alpha=0.05, subset=0.05)
    w = ["-w", str(ws.root), "--device", "cpu"]
    train = ["train", "--kind", "learned", "--epochs", "1", "--batch-size", "16", *w]
    assert run(train) == 0, capsys.readouterr().err
    out = tmp_path / "study.json"
    study(monkeypatch, str(ws.root), "--out", str(out), "--quiet")
    report = json.loads(out.read_text())
    designs = ("learned", "learned-bias", "gate", "class-gate", "abstain-gate")
    rows = {(r["design"], r["rule"]): r for r in report["designs"]}
    assert set(rows) == {(d, r) for d in designs for r in ("min", "pairwise", "agreement")} | {
        ("cascade", "cascade"),
        ("cascade-keep", "cascade"),
        ("cascade-plain", "cascade"),
    }
    cascade = rows[("cascade", "cascade")]
    assert (
        sorted(cascade["fit"]["cascade"]["order"]) == [0, 1] and cascade["fit"]["tried_count"] > 2
    )
    assert cascade["forwards_per_input"] == 2 * (report["n"] + ws.settings("certify")["n0"])
    keep = rows[("cascade-keep", "cascade")]["fit"]["cascade"]  # sigma = 1 first at 1/2
    assert keep["order"][0] == 1 and keep["thresholds"][0] == [0.5] * 10
    metas = (ws.artifacts / "certify").glob("*.json")
    alone = [m for m in metas if json.loads(m.read_text())["rules"] == ["cascade"]]
    # the runs of cascade and cascade-plain, no router sampled (with two experts cascade-keep's
    # spec is plain's: the same run)
    assert len(alone) == 2
    for meta in alone:
        records = meta.with_suffix(".jsonl").read_text().splitlines()
        assert len(records) == 6 and all(json.loads(r)["router"] is None for r in records)
    assert report["inputs"] == 6 and report["n"] == 32
    for row in rows.values():
        assert row["regret"] >= 0 and row["acr"] >= 0 and row["below_multiscale"] >= 0
        assert abs(sum(row["routing"].values()) + row["abstention"]["router"] - 1) < 1e-9
    taught = rows[("abstain-gate", "agreement")]["fit"]["abstain"]
    assert taught["finetuned_from"] == ["g1.0"] and taught["abstain"]["table"]["n"] == 12
    assert rows[("learned-bias", "min")]["fit"]["biases"] is not None
    table = capsys.readouterr().out
    assert "| abstain-gate | agreement |" in table and "alone" in table
    assert "| below Multiscale, at most |" in table
    # scored against a study's envelope too: its own, so both regrets agree (counts are cached)
    again = tmp_path / "again.json"
    study(monkeypatch, str(ws.root), "--only", "gate", "--envelope", str(out), "--out", str(again))
    second = json.loads(again.read_text())
    assert second["reference_envelope"]["grid"] == report["envelope"]["grid"]
    for row in [*second["designs"], *second["reference"].values()]:
        assert abs(row["regret_reference"] - row["regret"]) < 1e-9
    assert "regret to the reference envelope" in capsys.readouterr().out
    # a router fitted for other experts: its designs are refused, the cascade rows still run
    config = ws.artifacts / "router" / "config.json"
    info = json.loads(config.read_text())
    config.write_text(json.dumps({**info, "fingerprints": ["0" * 64] * 2}))
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(ws.root), "--only", "learned", "--quiet"])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert refused.value.code == 2 and "changed since the router" in capsys.readouterr().err
    study(monkeypatch, str(ws.root), "--only", "cascade-plain", "--quiet")
    # a gate router (the example's default design) is not the paper's: refused by name
    assert run(["train", "--kind", "gate", *w]) == 0, capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(ws.root), "--only", "learned", "--quiet"])
    with pytest.raises(SystemExit) as refused:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert refused.value.code == 2 and "gate router" in capsys.readouterr().err
    # the Multiscale-keeping family's ceiling, from the counts the study cached
    ceiling = tmp_path / "ceiling.json"
    run_script(monkeypatch, CEILING, str(ws.root), "--plug-in", "--quiet", "--out", str(ceiling))
    bounds = json.loads(ceiling.read_text())
    assert set(bounds["splits"]) == {"val", "val, plug-in", "test", "test, plug-in"}
    test = bounds["splits"]["test"]
    assert test["inputs"] == 6 and test["grid"] == report["envelope"]["grid"]
    acc = test["certified_accuracy"]
    for member in ("cascade-plain", "cascade-keep"):  # both are in the family
        assert all(m <= c + 1e-9 for m, c in zip(acc[member], acc["ceiling"], strict=True))
        assert test["regret"][member] >= test["regret"]["ceiling"] - 1e-9
    plain = rows[("cascade-plain", "cascade")]
    assert abs(test["regret"]["cascade-plain"] - plain["regret"]) < 1e-3  # JSON: to 0.001
    lo, hi = test["regret_interval"]["cascade-plain"]  # the study's, from the same resamples
    assert [lo, hi] == pytest.approx(plain["regret_interval"], abs=1e-3)
    assert "| ceiling |" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [str(CEILING), str(ws.root), "--limit", "7", "--quiet"])
    with pytest.raises(SystemExit) as refused:  # test input 6 was never certified
        runpy.run_path(str(CEILING), run_name="__main__")
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "no cached test counts for 1 of the first 7" in err
    for bad, says in ((["--limit", "0"], "limit must be"), (["--step", "0"], "--step must be")):
        monkeypatch.setattr(sys, "argv", [str(CEILING), str(ws.root), *bad, "--quiet"])
        with pytest.raises(SystemExit) as refused:
            runpy.run_path(str(CEILING), run_name="__main__")
        assert refused.value.code == 2 and says in capsys.readouterr().err


def study(monkeypatch, *argv):
    run_script(monkeypatch, SCRIPT, *argv)


def run_script(monkeypatch, script: Path, *argv):
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin on a shared 2-core runner
    try:
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code == 0
    finally:
        torch.set_num_threads(threads)
