"""The certification run: cached counts, resume after a kill, rank shards, equality with the API."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import fashion_workspace
from rsrouter import distributed
from rsrouter.composition import DualSmoothed
from rsrouter.composition.certify_run import certify_run, counts_key, latest_run, load_run
from rsrouter.errors import UsageError

N0, N, ALPHA, SEED = 20, 200, 0.01, 5


class Linear:
    def __init__(self, w, b, sigma=None, name="m", fail_after=None):
        self.w, self.b, self.fingerprint = torch.tensor(w), b, f"fp-{name}"
        if sigma is not None:
            self.sigma, self.num_classes = sigma, 2
        self.calls, self.fail_after = 0, fail_after

    def eval(self):
        return self

    def __call__(self, x):
        self.calls += len(x)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed mid-run")
        return (x @ self.w + self.b > 0).long()


def _dataset(size=24):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(size, 2, generator=gen)
    labels = (images[:, 1] > 0).long()
    return SimpleNamespace(
        name="toy", split="test", images=images, labels=labels,
        class_names=("neg", "pos"), fingerprint="ds-toy",
    )  # fmt: skip


def _dual(router_name="r", fail_after=None):
    experts = [
        Linear([0.0, 1.0], 0.0, sigma=0.25, name="a", fail_after=fail_after),
        Linear([0.2, 1.0], 0.05, sigma=0.5, name="b"),
    ]
    return DualSmoothed(Linear([1.0, 0.0], 0.0, name=router_name), 0.5, experts)


def _run(dual, tmp, **kw):
    args = {"n0": N0, "n": N, "alpha": ALPHA, "seed": SEED, "chunk": 5, "progress": False}
    return certify_run(dual, _dataset(), tmp, expert_names=["a", "b"], **{**args, **kw})


def _strip(records):
    out = []
    for r in records:
        r = json.loads(json.dumps(r))
        r.pop("seconds")
        r["baselines"]["multiscale"].pop("seconds")
        for e in [*r["baselines"]["experts"], *r["rules"].values()]:
            e.pop("seconds")
        out.append(r)
    return out


def test_records_match_the_api_and_hold_every_baseline(tmp_path):
    dual = _dual()
    result = _run(dual, tmp_path)
    ds = _dataset()
    direct = dual.certify_batch(ds.images, n0=N0, n=N, alpha=ALPHA, seed=SEED)
    assert [r["index"] for r in result.records] == list(range(len(ds.labels)))
    for r, c in zip(result.records, direct, strict=True):
        assert (r["prediction"], r["expert"]) == (c.prediction, c.expert)
        assert r["radius"] == pytest.approx(c.radius)
        assert r["R_sigma"] == pytest.approx(c.radius_router)
        assert r["correct"] == (c.prediction == r["label"])
        assert len(r["baselines"]["experts"]) == 2 and "multiscale" in r["baselines"]
        assert sum(r["router"]["counts"]) == N and sum(r["router"]["selection_counts"]) == N0
    meta, records = load_run(result.path)
    assert meta["experts"] == ["a", "b"] and meta["alpha_router"] == pytest.approx(ALPHA / 2)
    assert "not a certificate" in meta["labels"]["oracle"]
    assert _strip(records) == _strip(result.records)
    assert latest_run(tmp_path) == result.path
    assert counts_key("m", "d", 1, 2, 3) != counts_key("m", "d", 1, 2, 3, bf16=True)


def test_counts_are_keyed_by_the_precision_they_are_sampled_in():
    """bf16 autocast is the core's default on CUDA only; the val counts' cache key follows what
    sampling does (it once recorded float32 for CUDA's bf16 counts)."""
    from types import SimpleNamespace

    from rsrouter.composition.tuning import _tuning_path
    from rsrouter.smoothing import uses_bf16

    assert not uses_bf16("cpu") and not uses_bf16(None) and uses_bf16("cuda")
    assert uses_bf16("cpu", True) and not uses_bf16("cuda", False)
    val = SimpleNamespace(fingerprint="d")
    key = {
        d: _tuning_path("a", "expert", "m", val, 1, 2, 3, {"device": d}) for d in ("cpu", "cuda")
    }
    assert key["cpu"] != key["cuda"]
    assert key["cpu"] == _tuning_path("a", "expert", "m", val, 1, 2, 3, {"device": "cpu"})
    assert key["cuda"] == _tuning_path("a", "expert", "m", val, 1, 2, 3, {"bf16": True})


def test_every_rule_from_the_same_counts_and_the_headline(tmp_path):
    from rsrouter.composition.report import summarize
    from rsrouter.composition.rules import RULES

    dual = _dual()
    first = _run(dual, tmp_path)
    ds = _dataset()
    for rule in RULES:  # each rule's record equals the API's certificate under that rule
        api = DualSmoothed(dual.router, 0.5, dual.experts, rule=rule)
        direct = api.certify_batch(ds.images, n0=N0, n=N, alpha=ALPHA, seed=SEED)
        for r, c in zip(first.records, direct, strict=True):
            got = r["rules"][rule]
            assert (got["prediction"], got["expert"]) == (c.prediction, c.expert)
            assert got["radius"] == pytest.approx(c.radius)
            want = (N0 + N) * (1 + (2 if rule == "agreement" else int(c.expert >= 0)))
            assert got["forwards"] == want
    assert all(r["rules"]["min"]["radius"] == r["radius"] for r in first.records)
    calls = dual.router.calls + sum(e.calls for e in dual.experts)
    headline = _run(dual, tmp_path, rule="agreement")  # another headline: no model runs
    assert dual.router.calls + sum(e.calls for e in dual.experts) == calls
    meta, records = load_run(headline.path)
    assert meta["rule"] == "agreement" and meta["rules"] == list(RULES)
    s = summarize(meta, records)
    assert set(s["methods"]) >= {"dual", "dual:min", "dual:pairwise", "expert:a", "multiscale"}
    assert "agreement" in s["methods"]["dual"]["label"]
    assert s["methods"]["dual"]["forwards_per_input"] == 3 * (N0 + N)
    assert s["methods"]["expert:a"]["forwards_per_input"] == N0 + N
    assert s["rule"] == "agreement" and set(s["routing_by_method"]) == {
        "dual", "dual:min", "dual:pairwise"
    }  # fmt: skip
    old = summarize(*load_run(first.path))
    assert old["methods"]["dual:agreement"]["acr"] == pytest.approx(s["methods"]["dual"]["acr"])
    with pytest.raises(UsageError, match="unknown composition rule 'best'"):
        _run(dual, tmp_path, rule="best")
    biased = DualSmoothed(dual.router, 0.5, dual.experts, rule="pairwise", biases=[0.0, 2.0])
    tilted = _run(biased, tmp_path)  # a bias of 2 toward b: pairwise routes there more often
    routes = [r["rules"]["pairwise"]["expert"] for r in tilted.records]
    plain = [r["rules"]["pairwise"]["expert"] for r in first.records]
    assert routes.count(1) > plain.count(1)
    assert load_run(tilted.path)[0]["biases"] == [0.0, 2.0]


def test_cached_expert_counts_make_dual_cost_only_the_router(tmp_path):
    first = _run(_dual(), tmp_path)
    other = _dual(router_name="r2")  # a new router over the same experts
    result = _run(other, tmp_path)
    assert result.computed == 24
    assert other.experts[0].calls == other.experts[1].calls == 0
    assert other.router.calls == 24 * (N0 + N)
    looser = _dual()  # another alpha split: no model runs at all
    again = _run(looser, tmp_path, alpha_router=0.002)
    assert looser.router.calls == 0 and again.computed == 24
    pairs = list(zip(first.records, again.records, strict=True))
    assert all(a["router"]["counts"] == b["router"]["counts"] for a, b in pairs)
    assert any(b["R_sigma"] < a["R_sigma"] for a, b in pairs if a["R_sigma"] > 0)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, capsys):
    clean = _run(_dual(), tmp_path / "clean")
    crashing = _dual(fail_after=3 * 5 * (N0 + N))  # dies in the 4th chunk of inputs
    with pytest.raises(RuntimeError, match="killed"):
        _run(crashing, tmp_path / "resumed")
    (path,) = (tmp_path / "resumed" / "certify").glob("*.jsonl")
    partial = [json.loads(line) for line in path.read_text().splitlines()]
    assert 0 < len(partial) < 24
    with path.open("a") as fh:
        fh.write('{"index": 99, "torn')  # a torn last line from the kill
    healthy = _dual()
    capsys.readouterr()
    resumed = _run(healthy, tmp_path / "resumed", progress=True)
    assert f"resuming: {len(partial)} of 24 records are in {path}" in capsys.readouterr().out
    assert resumed.computed == 24 - len(partial)
    assert healthy.experts[1].calls < 24 * (N0 + N)  # cached counts were reused
    assert _strip(resumed.records) == _strip(clean.records)


def test_a_smaller_limit_reads_only_its_own_first_inputs(tmp_path):
    """A run grows with its limit; certified again with a smaller one, it returns that many
    records (the first ones, unchanged), not the larger run's (a study mixing 1,000- and
    1,500-image rows in one table, before session 15)."""
    whole = _run(_dual(), tmp_path)
    first = _run(_dual(), tmp_path, limit=10)
    assert (first.computed, len(first.records), first.stored) == (0, 10, 24)
    assert first.path == whole.path and first.records == whole.records[:10]
    assert (whole.computed, whole.stored) == (24, 24)


def test_rank_shards_merge_to_the_single_process_result(tmp_path, monkeypatch):
    single = _run(_dual(), tmp_path / "one")
    for rank in (1, 0):  # rank 1 first: rank 0 then finds its shard and merges
        ctx = distributed.DistContext(rank=rank, world=2, local_rank=rank)
        monkeypatch.setattr(distributed, "context", lambda ctx=ctx: ctx)
        part = _run(_dual(), tmp_path / "two")
    assert part.computed == 12
    assert not list((tmp_path / "two").rglob("*.rank-*.jsonl"))
    assert _strip(part.records) == _strip(single.records)
    lines = [json.loads(line)["index"] for line in part.path.read_text().splitlines()]
    assert lines == list(range(24))


def test_bad_settings_are_one_sentence(tmp_path):
    with pytest.raises(UsageError, match="alpha_router"):
        _run(_dual(), tmp_path, alpha_router=0.5)
    with pytest.raises(UsageError, match="expert names"):
        certify_run(_dual(), _dataset(), tmp_path, expert_names=["a"], progress=False)
    dual = _dual()
    del dual.experts[0].fingerprint
    with pytest.raises(UsageError, match="fingerprint"):
        _run(dual, tmp_path)
    with pytest.raises(UsageError, match="router certify"):
        latest_run(tmp_path / "nothing")
    other = tmp_path / "other.jsonl"  # a JSONL beside a JSON that is not a run's settings
    other.write_text('{"index": 0}\n')
    other.with_suffix(".json").write_text("{}")
    with pytest.raises(UsageError, match="not the records of a `router certify` run"):
        load_run(other)
    for bad in ({"seed": -1}, {"seed": None}, {"batch_size": 0}):
        with pytest.raises(UsageError, match="seed|batch_size"):
            _run(_dual(), tmp_path / "bad", **bad)
        assert not (tmp_path / "bad").exists()  # refused before any file is written


# ---------------------------------------------------------------- the CLI on a real workspace


def test_cli_certify_report_predict(tmp_path, capsys):
    from PIL import Image

    from rsrouter.cli.main import run
    from rsrouter.data import load_dataset

    ws = fashion_workspace(tmp_path)
    w = ["-w", str(ws.root)]
    args = ["--limit", "6", "--n", "40", "--n0", "8", "--alpha", "0.01", "--device", "cpu"]
    assert run(["certify", *args, *w]) == 0
    assert "records:" in capsys.readouterr().out
    assert run(["report", *w]) == 0
    report = ws.artifacts / "report"
    for name in ("certified_accuracy.md", "certified_accuracy.csv", "summary.json", "curve.png"):
        assert (report / name).stat().st_size > 0
    summary = json.loads((report / "summary.json").read_text())
    assert summary["inputs"] == 6 and summary["alpha_router"] == pytest.approx(0.005)
    capsys.readouterr()
    assert run(["certify", *args[:1], "3", *args[2:], *w]) == 0  # the first 3 of the 6
    out = " ".join(capsys.readouterr().out.split())
    assert "0 input(s) certified now, 3 in the run (and 3 more from a larger --limit" in out
    assert "certified accuracy (%) on 3 inputs" in out
    assert run(["report", "--limit", "4", *w]) == 0
    assert json.loads((report / "summary.json").read_text())["inputs"] == 4
    assert run(["report", "--limit", "0", *w]) == 1
    assert "limit must be a whole number of at least 1, got 0" in capsys.readouterr().err

    image = (load_dataset("fashion-mnist-subset", "test").images[0, 0] * 255).byte().numpy()
    Image.fromarray(image).save(tmp_path / "ok.png")
    Image.fromarray(image[:20]).save(tmp_path / "small.png")
    capsys.readouterr()
    assert run(["predict", str(tmp_path / "ok.png"), "--n", "50", "--device", "cpu", *w]) == 0
    out = capsys.readouterr().out
    assert "dual PREDICT" in out and ("gauss-" in out or "abstain" in out)
    assert run(["predict", str(tmp_path / "small.png"), "--device", "cpu", *w]) == 1
    assert "28x20 pixels" in capsys.readouterr().err
    assert run(["certify", "--alpha-router", "0.5", *w]) == 1
    assert "--alpha-router" in capsys.readouterr().err

    # the router's biases come from its config.json; --rule picks the headline row
    config = json.loads((ws.artifacts / "router" / "config.json").read_text())
    (ws.artifacts / "router" / "config.json").write_text(json.dumps({**config, "biases": [1]}))
    assert run(["certify", *args, *w]) == 1
    assert 'config.json: "biases" must hold one finite number per expert (2)' in (
        capsys.readouterr().err
    )
    config["biases"] = [0.0, 0.5]
    (ws.artifacts / "router" / "config.json").write_text(json.dumps(config))
    assert run(["certify", *args, "--rule", "agreement", *w]) == 0
    assert "regret" in capsys.readouterr().out
    assert run(["report", *w]) == 0
    out = capsys.readouterr().out
    assert "agreement-aware" in out and "pairwise router radius" in out and "regret" in out
    summary = json.loads((report / "summary.json").read_text())
    assert summary["rule"] == "agreement" and summary["biases"] == [0.0, 0.5]
    assert "regret" in summary["methods"]["dual:min"]
    assert run(["certify", "--rule", "best", *w]) == 1
    assert "unknown composition rule 'best'" in capsys.readouterr().err
    assert run(["predict", str(tmp_path / "ok.png"), "--n", "50", "--rule", "agreement",
                "--device", "cpu", *w]) == 0  # fmt: skip
    assert "rule agreement" in capsys.readouterr().out


def test_every_certify_setting_but_the_split_reaches_certify_run():
    import inspect

    from rsrouter.composition.certify_run import CERTIFY_DEFAULTS, RUN_OPTIONS, run_options

    assert set(RUN_OPTIONS) == set(CERTIFY_DEFAULTS) - {"split"}
    named = set(inspect.signature(certify_run).parameters)
    # batch_size reaches certify_run through **sampling
    assert set(RUN_OPTIONS) - {"batch_size"} <= named and "sampling" in named
    assert run_options({**CERTIFY_DEFAULTS, "n": 7}) == {
        k: v for k, v in {**CERTIFY_DEFAULTS, "n": 7}.items() if k != "split"
    }


def test_val_counts_resume_after_a_kill_and_equal_an_uninterrupted_fit(
    tmp_path, monkeypatch, capsys
):
    """The tuning step's val counts are flushed a chunk at a time: a killed fit keeps what it
    sampled, and the rerun samples only the rest, with the counts of an uninterrupted run."""
    from rsrouter.composition import tuning

    monkeypatch.setattr(tuning, "VAL_CHUNK", 5)
    val = type("Val", (SimpleNamespace,), {"__len__": lambda self: len(self.labels)})(
        **{**vars(_dataset()), "split": "val"}
    )
    args = {"n0": N0, "n": N, "seed": SEED, "limit": 24, "progress": False}

    def experts(fail_after=None):
        return [Linear([0.0, 1.0], 0.0, sigma=0.25, name="a", fail_after=fail_after),
                Linear([0.2, 1.0], 0.05, sigma=0.5, name="b")]  # fmt: skip

    clean = tuning.validation_counts(experts(), val, tmp_path / "clean", **args)
    with pytest.raises(RuntimeError, match="killed"):  # dies in the 3rd chunk of expert a
        tuning.validation_counts(experts(fail_after=2 * 5 * (N0 + N)), val, tmp_path / "re",
                                 **args)  # fmt: skip
    (path,) = (tmp_path / "re" / "tune" / "experts").glob("*.jsonl")
    assert len(path.read_text().splitlines()) == 10  # two chunks were flushed
    again = experts()
    capsys.readouterr()
    resumed = tuning.validation_counts(again, val, tmp_path / "re", **{**args, "progress": True})
    assert f"resuming: 10 of 24 val counts are in {path}" in capsys.readouterr().out
    assert again[0].calls == 14 * (N0 + N)  # only the 14 inputs the kill left
    for a, b in zip((*clean.selection, *clean.estimation),
                    (*resumed.selection, *resumed.estimation), strict=True):  # fmt: skip
        assert (a == b).all()
    assert (resumed.estimation[0].sum(axis=1) == N).all()
