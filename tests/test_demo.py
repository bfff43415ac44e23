"""`router demo` and the pipeline under it, at a tiny size on the bundled real data."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from rsrouter import pipeline
from rsrouter.cli.main import run  # importing main registers every command
from rsrouter.errors import UsageError
from rsrouter.pipeline import PipelineConfig, run_pipeline

TINY = PipelineConfig(
    train_limit=240,
    expert_arch_args={"width": 4},
    expert_epochs=1,
    table_n=16,
    table_subset=0.1,
    router_arch_args={"width": 4},
    router_epochs=2,
    router_batch_size=32,
    certify_limit=6,
    n0=8,
    n=24,
    batch_size=256,
    device="cpu",
    progress=False,
)


def test_pipeline_end_to_end_then_resumes_without_recomputing(tmp_path, capsys):
    config = replace(TINY, workspace=tmp_path / "ws")
    first = run_pipeline(config)
    assert first.certified_now == 6
    md = first.table_markdown
    for name in ("gauss-sigma0.25", "gauss-sigma0.5", "gauss-sigma1", "Multiscale", "oracle"):
        assert name in md
    assert "not a certificate" in md
    assert first.plot.is_file() and first.plot.read_bytes()[:4] == b"\x89PNG"
    assert json.loads((first.report_dir / "pipeline.json").read_text())["n"] == 24
    toml = (tmp_path / "ws" / "router.toml").read_text()
    second = run_pipeline(config)
    assert second.certified_now == 0  # every record was there
    assert second.table_markdown == md
    assert (tmp_path / "ws" / "router.toml").read_text() == toml  # no expert re-registered
    # the workspace records the run's settings: the CLI continues from it, reusing everything
    records = list((tmp_path / "ws" / ".rsrouter" / "certify").glob("*.jsonl"))
    capsys.readouterr()
    assert run(["certify", "--workspace", str(tmp_path / "ws")]) == 0
    shown = capsys.readouterr().out  # each regret with its 95 % interval, as in the report
    assert "regret [95 %]" in shown and re.search(r"\d+\.\d \[-?\d+\.\d, \d+\.\d\]", shown)
    assert "every r" in shown  # the regret with no grid beside it
    assert list((tmp_path / "ws" / ".rsrouter" / "certify").glob("*.jsonl")) == records


def test_demo_command_prints_the_table_and_where_outputs_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "DEMO", TINY)
    code = run(["demo", "-w", str(tmp_path / "demo"), "--limit", "4", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "oracle" in out and "Multiscale" in out
    assert str(Path(tmp_path / "demo" / ".rsrouter" / "report")) in out.replace("\n", "")
    assert (tmp_path / "demo" / ".rsrouter" / "report" / "curve.png").is_file()


def test_bad_pipeline_settings_are_usage_errors():
    with pytest.raises(UsageError):
        PipelineConfig(sigmas=(0.5, 0.5))
    with pytest.raises(UsageError):
        PipelineConfig(expert_kind="magic")
    with pytest.raises(UsageError):
        PipelineConfig(router_denoiser=True)
    with pytest.raises(UsageError, match="learned router"):  # a gate router has no denoiser
        PipelineConfig(
            expert_kind="denoised", router_denoiser=True, router_kind="class-gate", validation=8
        )
    with pytest.raises(UsageError):
        PipelineConfig(certify_limit=0)
    with pytest.raises(UsageError, match="unknown cascade fit 'best'"):
        PipelineConfig(cascade_fit="best")


def _accuracies(result) -> dict:
    return {k: m["certified_accuracy"] for k, m in result.summary["methods"].items()}


def test_a_run_killed_mid_way_resumes_to_the_same_result(tmp_path, monkeypatch):
    whole = run_pipeline(replace(TINY, workspace=tmp_path / "whole"))
    config = replace(TINY, workspace=tmp_path / "killed")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while the router trains

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_the_router", killed)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(config)
    assert not (tmp_path / "killed" / ".rsrouter" / "report").exists()
    resumed = run_pipeline(config)
    assert _accuracies(resumed) == _accuracies(whole)
    assert resumed.summary["run"] == whole.summary["run"]  # same router, experts, data, settings


def test_the_demos_router_design_runs_at_a_tiny_size(tmp_path, capsys):
    """The demo's design: a class-gate router fitted on a val split, which carries the experts'
    cascade, the headline by default; the report carries every rule's regret and routing."""
    assert (pipeline.DEMO.router_kind, pipeline.DEMO.rule) == ("class-gate", None)
    config = replace(TINY, workspace=tmp_path / "ws", validation=40, router_kind="class-gate",
                     gate_bins=4)  # fmt: skip
    result = run_pipeline(config)
    md = result.table_markdown
    assert (
        "class-aware cascade of the experts (thresholds fitted on val, no router) (headline)" in md
    )
    assert "agreement-aware (router sigma_e=1)" in md and "| regret [95 % interval] |" in md
    assert "radius tables" not in result.seconds  # a gate router needs none
    tuning = json.loads((tmp_path / "ws" / ".rsrouter" / "router" / "tuning.json").read_text())
    shared = [t for t in tuning["tried"] if t["class"] is None]
    assert len(shared) == 15 and len(tuning["tried"]) > 15 and tuning["rule"] == "agreement"
    assert result.summary["rule"] == "cascade" and len(tuning["cascade"]) > 10
    info = json.loads((tmp_path / "ws" / ".rsrouter" / "router" / "config.json").read_text())
    assert info["tuning"]["inputs"] == 40  # no [tune] limit: the fit reads the whole val split
    routed = sum(result.summary["routing"].values()) + result.summary["abstention"]["router"]
    assert abs(routed - 1) < 1e-9  # the cascade's shares: the stage that certified, or none
    # the cascade alone, from the cached expert counts: no router pass, no other rule's row
    router_counts = list((tmp_path / "ws" / ".rsrouter" / "certify" / "router").glob("*"))
    capsys.readouterr()
    assert run(["certify", "-w", str(tmp_path / "ws"), "--no-router"]) == 0
    shown = capsys.readouterr().out
    assert "decide from cached counts (no sampling)" in shown
    assert "class-aware cascade" in shown and "agreement-aware" not in shown
    assert list((tmp_path / "ws" / ".rsrouter" / "certify" / "router").glob("*")) == router_counts


def test_the_pipeline_writes_its_tune_settings_into_the_workspace(tmp_path):
    """[tune] limit (None: the whole val split) and cascade come from the config, so a rerun
    of the pipeline fits on the same val images, the same way, as the run before it."""
    from rsrouter.composition.tuning import _val_setup

    config = replace(TINY, workspace=tmp_path / "ws", validation=40, router_kind="class-gate",
                     gate_bins=4, tune_limit=24)  # fmt: skip
    ws = pipeline.open_workspace(config)
    pipeline.configure_workspace(ws, config, ["a"])
    assert ws.settings("tune") == {"bins": 4, "limit": 24, "cascade": "regret"}
    tune, *_ = _val_setup(type(ws).open(tmp_path / "ws"), "cpu")  # as `router train` reads it
    assert tune["limit"] == 24 and tune["cascade"] == "regret"
    pipeline.configure_workspace(ws, replace(config, cascade_fit="keep-multiscale"), ["a"])
    tune, *_ = _val_setup(type(ws).open(tmp_path / "ws"), "cpu")
    assert tune["cascade"] == "keep-multiscale"
    tune, *_ = _val_setup(type(ws).open(tmp_path / "ws"), "cpu", "plain")  # a CLI flag wins
    assert tune["cascade"] == "plain"
    pipeline.configure_workspace(ws, replace(config, tune_limit=None), ["a"])
    tune, *_ = _val_setup(type(ws).open(tmp_path / "ws"), "cpu")
    assert tune["limit"] is None and "limit" not in ws.settings("tune")
    with pytest.raises(UsageError):
        replace(config, tune_limit=0)
