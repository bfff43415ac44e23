"""rsrouter.distributed: the one-process context, sharding, and a real 2-process gloo run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from rsrouter import distributed
from rsrouter.distributed import DistContext, context, shard_indices
from rsrouter.errors import UsageError
from rsrouter.io import read_json
from rsrouter.smoothing import sample_counts

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


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
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
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
