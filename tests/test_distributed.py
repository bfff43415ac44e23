"""rsrouter.distributed: the one-process context, sharding, and a real 2-process gloo run."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import fashion_workspace, val_split_workspace
from rsrouter import distributed
from rsrouter.distributed import DistContext, context, shard_indices
from rsrouter.errors import UsageError
from rsrouter.io import read_json, read_jsonl
from rsrouter.smoothing import sample_counts

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun2(*args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` on CPU (gloo, one thread a process),
    outside any torchrun environment of our own; it must succeed."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture
def fresh(monkeypatch):
    """No cached context and no torchrun variables from the outside."""
    monkeypatch.setattr(distributed, "_CONTEXT", None)
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_torchrun_is_one_process(fresh):
    ctx = context()
    assert (ctx.rank, ctx.world, ctx.local_rank, ctx.is_main) == (0, 1, 0, True)
    ctx.barrier()  # no process group: must not block or raise
    assert not torch.distributed.is_initialized()
    assert context() is ctx


def test_torchrun_env_with_one_process(fresh):
    fresh.setenv("WORLD_SIZE", "1")
    fresh.setenv("RANK", "0")
    fresh.setenv("LOCAL_RANK", "0")
    assert context() == DistContext(rank=0, world=1, local_rank=0)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "two"}, "not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "inconsistent"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "launch with torchrun"),
    ],
)
def test_bad_environment_is_a_usage_error(fresh, env, message):
    for name, value in env.items():
        fresh.setenv(name, value)
    with pytest.raises(UsageError, match=message):
        context()


def test_shards_partition_the_indices():
    indices = [10, 11, 12, 13, 14, 15, 16]
    shards = [shard_indices(indices, DistContext(r, 3, r)) for r in range(3)]
    assert shards == [[10, 13, 16], [11, 14], [12, 15]]
    assert sorted(sum(shards, [])) == indices
    assert shard_indices(range(4), DistContext(0, 1, 0)) == [0, 1, 2, 3]
    assert shard_indices([], DistContext(1, 2, 1)) == []


def test_device_on_cpu_and_missing_gpu():
    ctx = DistContext(rank=1, world=2, local_rank=1)
    assert ctx.device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert ctx.device(None) == torch.device("cpu")
        with pytest.raises(UsageError, match="no CUDA GPU"):
            ctx.device("cuda")


WORKER = """
import sys
import torch
from rsrouter.distributed import context, shard_indices
from rsrouter.io import read_json, write_json
from rsrouter.smoothing import sample_counts

out = sys.argv[1]
ctx = context()
assert ctx.world == 2, ctx
torch.manual_seed(0)
weight = torch.randn(8, 3)
xs = torch.rand(7, 8)
mine = shard_indices(range(len(xs)), ctx)
counts = sample_counts(lambda b: b @ weight, xs[mine], 0.5, 300, seed=11, indices=mine,
                       batch_size=128, num_classes=3)
write_json(f"{out}/rank-{ctx.rank}.json", {"indices": mine, "counts": counts.tolist()})
ctx.barrier()
if ctx.is_main:
    merged = {}
    for r in range(ctx.world):
        part = read_json(f"{out}/rank-{r}.json")
        merged.update(zip(part["indices"], part["counts"]))
    write_json(f"{out}/merged.json", {"counts": [merged[i] for i in sorted(merged)]})
ctx.barrier()
"""


def test_two_gloo_processes_equal_one(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    torchrun2(str(script), str(tmp_path), timeout=120)
    merged = torch.tensor(read_json(tmp_path / "merged.json")["counts"])
    torch.manual_seed(0)
    weight = torch.randn(8, 3)
    xs = torch.rand(7, 8)
    # one process, other batch size: the noise of input i depends on (seed, stage, i) only
    alone = sample_counts(
        lambda b: b @ weight, xs, 0.5, 300, seed=11, batch_size=1000, num_classes=3
    )
    assert merged.tolist() == alone.tolist()
    assert (alone.sum(1) == 300).all()


# ---------------------------------------------------------------- the CLI under torchrun


TABLES = ["tables", "--split", "train", "--subset", "0.02", "--n", "20", "--shard-size", "8"]
CERTIFY = ["certify", "--limit", "7", "--n", "40", "--n0", "8", "--alpha", "0.01"]


def _tables(artifacts) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = {}
    for path in sorted((artifacts / "tables").glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata()
        out[path.name] = (meta, {k: v.tolist() for k, v in load_file(path).items()})
    return out


def _records(artifacts) -> dict:
    """Every JSONL file under certify/ by relative path, without the wall-clock fields."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k != "seconds"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    folder = artifacts / "certify"
    return {
        str(p.relative_to(folder)): strip(read_jsonl(p)) for p in sorted(folder.rglob("*.jsonl"))
    }


def test_torchrun_tables_and_certify_equal_one_process(tmp_path, fresh):
    from rsrouter.cli.main import run
    from rsrouter.registry import Workspace

    ws = fashion_workspace(tmp_path)
    shutil.copytree(ws.root, tmp_path / "ws2")
    one, two = ws.root, tmp_path / "ws2"
    device = ["--device", "cpu"]
    for args in (TABLES, CERTIFY):
        assert run([*args, *device, "-w", str(one)]) == 0
    for args in (TABLES, CERTIFY):
        # "--": torchrun's argparse would otherwise read the command's --n as its own --nnodes
        done = torchrun2("-m", "--", "rsrouter.cli", *args, *device, "-w", str(two))
    # only rank 0 reports, and it certified its own shard (inputs 0, 2, 4, 6) of the 7
    assert done.stdout.count("in the run") == 1
    assert "4 input(s) certified now, 7 in the run" in done.stdout
    art_one, art_two = ws.artifacts, Workspace.open(two).artifacts
    assert art_two != art_one
    tables = _tables(art_one)
    assert tables and _tables(art_two) == tables
    records = _records(art_one)
    assert any(len(v) == 7 for v in records.values())
    assert _records(art_two) == records
    assert not list(art_two.rglob("*.rank-*")) and not list(art_two.rglob("*.partial"))


TUNING_WORKER = """
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from rsrouter.composition.tuning import tuning_counts
from rsrouter.distributed import context

out = Path(sys.argv[1])
ctx = context()
assert ctx.world == 2, ctx
torch.manual_seed(0)
weight = torch.randn(8, 3)
data = SimpleNamespace(images=torch.rand(9, 8))
rows = []

def model(batch):
    rows.append(len(batch))
    return batch @ weight

sel, est = tuning_counts(model, data, out / "val.jsonl", sigma=0.5, width=3, size=9, n0=5, n=40,
                         seed=3, stages=(10, 11), batch_size=64)
(out / f"rank-{ctx.rank}.json").write_text(
    json.dumps({"rows": sum(rows), "sel": sel.tolist(), "est": est.tolist()}))
"""


def test_torchrun_ranks_share_the_val_counts(tmp_path, fresh):
    """Each rank samples the missing inputs of its round-robin share of the val inputs (5 and 4
    of 9), every rank returns all nine, equal to one process's, and the shards are merged into
    one file, also when a killed run of another size left a shard behind."""
    from types import SimpleNamespace

    from rsrouter.composition.tuning import tuning_counts

    torch.manual_seed(0)
    weight = torch.randn(8, 3)
    data = SimpleNamespace(images=torch.rand(9, 8))
    (tmp_path / "one").mkdir()
    sel, est = tuning_counts(lambda b: b @ weight, data, tmp_path / "one" / "val.jsonl",
                             sigma=0.5, width=3, size=9, n0=5, n=40, seed=3, stages=(10, 11),
                             batch_size=1000)  # fmt: skip
    # input 0 (rank 0's share) left in rank 1's shard by an earlier run: rank 1 does not sample
    # it again, rank 0 does (it reads only its own shard), and no input is left to nobody
    first = read_jsonl(tmp_path / "one" / "val.jsonl")[0]
    (tmp_path / "val.rank-1.jsonl").write_text(json.dumps(first) + "\n")
    script = tmp_path / "worker.py"
    script.write_text(TUNING_WORKER)
    torchrun2(str(script), str(tmp_path), timeout=120)
    ranks = [read_json(tmp_path / f"rank-{r}.json") for r in range(2)]
    assert [r["rows"] for r in ranks] == [5 * 45, 4 * 45]  # n0 + n = 45 draws per input
    for r in ranks:
        assert r["sel"] == sel.tolist() and r["est"] == est.tolist()
    assert sorted(x["index"] for x in read_jsonl(tmp_path / "val.jsonl")) == list(range(9))
    assert not list(tmp_path.glob("val.rank-*"))


def test_torchrun_gate_router_equals_one_process(tmp_path, fresh):
    """`router train --kind class-gate` under torchrun: the ranks share the val counts, rank 0
    saves and reports, and the router is the one a single process fits."""
    from rsrouter.cli.main import run
    from rsrouter.registry import Workspace

    one = val_split_workspace(tmp_path, (0.25, 0.5)).root
    two = tmp_path / "ws2"
    shutil.copytree(one, two)
    args = ["train", "--kind", "class-gate", "--device", "cpu"]
    assert run([*args, "-w", str(one)]) == 0
    done = torchrun2("-m", "--", "rsrouter.cli", *args, "-w", str(two))
    assert done.stdout.count("class-gate router") == 1  # rank 0 alone reports
    art_one, art_two = Workspace.open(one).artifacts, Workspace.open(two).artifacts
    for name in ("config.json", "tuning.json"):
        assert read_json(art_two / "router" / name) == read_json(art_one / "router" / name)

    def counts(art):
        return {str(p.relative_to(art)): [{k: v for k, v in r.items() if k != "seconds"}
                                          for r in read_jsonl(p)]
                for p in sorted((art / "tune").rglob("*.jsonl"))}  # fmt: skip

    assert counts(art_one) and counts(art_two) == counts(art_one)
    assert not list(art_two.rglob("*.rank-*"))


# ---------------------------------------------------------------- the GPU benchmark, smoke run


def test_carlini_benchmark_tiny_smoke_run(tmp_path, monkeypatch, capsys):
    """The benchmark runs end to end on CPU and writes self-describing results (no timing check)."""
    script = Path(__file__).parents[1] / "benchmarks" / "carlini_pipeline.py"
    argv = ["--tiny", "--device", "cpu", "--inputs", "1", "--n", "12", "--n0", "2"]
    monkeypatch.setattr(
        sys, "argv", [str(script), *argv, "--batch-size", "8", "--out", str(tmp_path)]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin on a shared 2-core runner
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    report = read_json(tmp_path / "carlini_pipeline.json")
    assert (report["inputs"], report["n"], report["n0"], report["config"]) == (1, 12, 2, "tiny")
    assert set(report["seconds_per_input"]) == {"standard fp32", "dual fp32"}  # CPU: fp32 only
    for t in report["seconds_per_input"].values():
        assert t["certify"] > 0 and t["bare"] > 0
        assert t["ratio"] == pytest.approx(t["certify"] / t["bare"])
    assert report["peer"]["seconds_per_input"] > 0  # Cohen et al.'s loop, on by default
    table = (tmp_path / "carlini_pipeline.md").read_text()
    assert "| standard (denoise + ViT) | fp32 |" in table
    assert "| dual (denoised router + expert) | fp32 |" in table
    assert "speed-up of ours (fp32) over the peer loop" in table
    assert "warning" not in capsys.readouterr().out  # every input was routed: the dual pass ran
