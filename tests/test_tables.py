"""Radius tables: values, caching per column, kill-and-resume, and rank-sharded building."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from rsrouter.errors import UsageError
from rsrouter.router.tables import (
    TABLE_STAGE,
    build_tables,
    load_tables,
    missing_columns,
    read_column,
    subset_indices,
)
from rsrouter.smoothing import certified_radius, sample_counts


class HalfExpert(nn.Module):
    """Right (label = bright or dark image) only on inputs whose first pixel is on `side`."""

    def __init__(self, sigma: float, side: int, tag: str = ""):
        super().__init__()
        self.sigma, self.num_classes, self.input_shape = sigma, 2, (1, 2, 2)
        self.side = side
        self.fingerprint = f"half-{side}-{sigma}-{tag}"
        self.calls = 0
        self.fail_after: int | None = None

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        truth = (x.flatten(1)[:, 1:].mean(1) > 0.5).long()
        mine = (x.flatten(1)[:, 0] > 0.5).long() == self.side
        pred = torch.where(mine, truth, 1 - truth)
        return nn.functional.one_hot(pred, 2).float()


def make_dataset(size: int = 40, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(size, 1, 2, 2)
    images[:, 0, 0, 0] = torch.where(torch.arange(size) % 2 == 0, 0.05, 0.95)
    images.view(size, -1)[:, 1:] = torch.where(
        torch.rand(size, 1, generator=gen) > 0.5, 0.95, 0.05
    ).expand(size, 3)
    labels = (images.flatten(1)[:, 1:].mean(1) > 0.5).long()
    return SimpleNamespace(images=images, labels=labels, name="toy", fingerprint=f"toy-{seed}")


def test_column_values_match_the_core(tmp_path: Path):
    data = make_dataset()
    expert = HalfExpert(0.1, side=1)
    table = build_tables(
        {"a": expert}, data, tmp_path, n=30, alpha=0.01, seed=3, shard_size=7, progress=False
    )
    counts = sample_counts(expert, data.images, 0.1, 30, seed=3, stage=TABLE_STAGE, num_classes=2)
    hits = counts.gather(1, data.labels.unsqueeze(1)).squeeze(1).numpy()
    expected = certified_radius(hits, 30, 0.1, 0.01)
    assert np.allclose(table.radii[:, 0].numpy(), expected)
    # the expert is right only on the odd inputs (first pixel high) -> radius 0 on the even ones
    assert (table.radii[0::2, 0] == 0).all() and (table.radii[1::2, 0] > 0).all()
    col = read_column(next((tmp_path / "tables").glob("*.safetensors")))
    assert torch.equal(col.counts, counts) and col.metadata["expert"] == "a"
    assert col.metadata["n"] == 30 and col.metadata["dataset_fingerprint"] == "toy-0"


def test_a_new_expert_computes_only_its_column(tmp_path: Path):
    data = make_dataset()
    a, b = HalfExpert(0.1, 0), HalfExpert(0.1, 1)
    build_tables({"a": a, "b": b}, data, tmp_path, n=20, progress=False)
    assert a.calls > 0 and b.calls > 0
    a.calls = b.calls = 0
    c = HalfExpert(0.2, 1, tag="third")
    table = build_tables({"a": a, "b": b, "c": c}, data, tmp_path, n=20, progress=False)
    assert a.calls == 0 and b.calls == 0 and c.calls > 0
    assert table.names == ("a", "b", "c") and table.radii.shape == (40, 3)
    calls = c.calls
    build_tables({"a": a, "b": b, "c": c}, data, tmp_path, n=20, progress=False)
    assert c.calls == calls  # a second run computes nothing
    assert missing_columns({"a": a, "d": HalfExpert(0.3, 0, "d")}, data, tmp_path, n=20) == ["d"]


def test_kill_and_resume_gives_identical_tables(tmp_path: Path, capsys):
    data = make_dataset(50)
    clean = build_tables(
        {"a": HalfExpert(0.3, 1)}, data, tmp_path / "clean", n=25, shard_size=8, progress=False
    )
    killed = HalfExpert(0.3, 1)
    killed.fail_after = 3  # batch 200 / n 25 = 8 inputs per call = one shard: dies in shard 4
    with pytest.raises(KeyboardInterrupt):
        build_tables(
            {"a": killed}, data, tmp_path / "run", n=25, shard_size=8, batch_size=200,
            progress=False,
        )  # fmt: skip
    shards = sorted((tmp_path / "run" / "tables").glob("*.partial/shard-*.safetensors"))
    assert len(shards) == 3
    killed.fail_after, killed.calls = None, 0
    capsys.readouterr()
    resumed = build_tables(
        {"a": killed}, data, tmp_path / "run", n=25, shard_size=8, batch_size=200, progress=True
    )
    assert f"resuming a: 24 of 50 records are in {shards[0].parent}" in capsys.readouterr().out
    assert killed.calls == 4  # only the 4 missing shards ran again
    assert torch.equal(clean.radii, resumed.radii)
    assert not list((tmp_path / "run" / "tables").glob("*.partial"))
    # same inputs, same file bytes, however the column was built (sorted safetensors header)
    (a,) = (tmp_path / "clean" / "tables").glob("*.safetensors")
    assert (tmp_path / "run" / "tables" / a.name).read_bytes() == a.read_bytes()


def test_ranks_share_the_work_and_match_one_process(tmp_path: Path):
    data = make_dataset(30)
    one = build_tables({"a": HalfExpert(0.2, 0)}, data, tmp_path / "one", n=16, shard_size=4,
                       progress=False)  # fmt: skip
    r1, r0 = HalfExpert(0.2, 0), HalfExpert(0.2, 0)
    kw = dict(n=16, shard_size=4, batch_size=16, progress=False, world=2)
    assert build_tables({"a": r1}, data, tmp_path / "two", rank=1, **kw) is None
    table = build_tables({"a": r0}, data, tmp_path / "two", rank=0, **kw)
    assert r1.calls == 14 and r0.calls == 16  # one input per call; shard 7 has 2 inputs
    assert torch.equal(one.radii, table.radii)


def test_subset_is_deterministic_and_keyed(tmp_path: Path):
    data = make_dataset(40)
    idx = subset_indices(40, 0.25, seed=1)
    assert len(idx) == 10 and np.array_equal(idx, subset_indices(40, 0.25, seed=1))
    assert not np.array_equal(idx, subset_indices(40, 0.25, seed=2))
    t = build_tables({"a": HalfExpert(0.1, 1)}, data, tmp_path, n=10, subset=0.25, seed=1,
                     progress=False)  # fmt: skip
    assert torch.equal(t.indices, torch.as_tensor(idx)) and t.radii.shape == (10, 1)
    assert torch.equal(t.labels, data.labels[idx])
    with pytest.raises(UsageError, match="router tables"):
        load_tables({"a": HalfExpert(0.1, 1)}, data, tmp_path, n=10, subset=0.5, seed=1)
    with pytest.raises(UsageError, match="subset"):
        build_tables({"a": HalfExpert(0.1, 1)}, data, tmp_path, subset=1.5)


def test_shards_of_another_shard_size_are_not_reused(tmp_path: Path):
    data = make_dataset(20)
    clean = build_tables({"a": HalfExpert(0.3, 1)}, data, tmp_path / "clean", n=10,
                         progress=False)  # fmt: skip
    first = HalfExpert(0.3, 1)
    first.fail_after = 1  # batch 100 / n 10 = 10 inputs per call: shard 0 (of 6) is written
    kw = dict(n=10, batch_size=100, progress=False)
    with pytest.raises(KeyboardInterrupt):
        build_tables({"a": first}, data, tmp_path / "run", shard_size=6, **kw)
    again = HalfExpert(0.3, 1)
    table = build_tables({"a": again}, data, tmp_path / "run", shard_size=8, **kw)
    assert again.calls == 3 and torch.equal(table.radii, clean.radii)  # 8 + 8 + 4: all new


def test_cli_refuses_a_bad_option_before_saving_it(tmp_path: Path, capsys):
    from rsrouter.cli.main import run
    from rsrouter.registry import Workspace

    ws = Workspace.init(tmp_path / "ws")
    before = ws.path.read_text()
    w = ["-w", str(tmp_path / "ws")]
    bad_options = [
        (["--n", "0"], "n must"),
        (["--alpha", "2"], "alpha"),
        (["--subset", "0"], "subset"),
        (["--seed", "-1"], "seed"),
        (["--batch-size", "0"], "--batch-size must"),
        (["--split", "nope"], "split"),
    ]
    for bad, word in bad_options:
        assert run(["tables", *bad, *w]) == 1
        assert word in capsys.readouterr().err
        assert ws.path.read_text() == before  # nothing saved: `router train` still works


def test_tables_draw_noise_no_certification_stage_draws():
    """The router learns from the tables: their draws must be independent of every draw that
    certifies or routes an input of the same index (expert, router and finetuning stages)."""
    from rsrouter.composition.dual import ROUTER_ESTIMATION, ROUTER_SELECTION
    from rsrouter.router.finetune import ROUTE_STAGE
    from rsrouter.smoothing import ESTIMATION, SELECTION

    others = (SELECTION, ESTIMATION, ROUTER_SELECTION, ROUTER_ESTIMATION, ROUTE_STAGE)
    assert TABLE_STAGE not in others and len(set(others)) == len(others)
