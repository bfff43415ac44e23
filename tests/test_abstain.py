"""Design (e) of the routing issue: the sigma_max expert taught to abstain where a smaller sigma
is right, and a gate router that copies it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import val_split_workspace
from rsrouter.errors import UsageError
from rsrouter.router.finetune import FinetuneConfig, abstain_rows, teach_abstain
from rsrouter.router.gate import normalized_entropy


def test_abstain_rows_are_where_the_expert_fails_and_a_smaller_sigma_certifies():
    radii = torch.tensor([[0.0, 0.3, 0.0], [0.2, 0.0, 0.5], [0.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    sigmas = (0.25, 0.5, 1.0)
    assert abstain_rows(radii, sigmas, 2).tolist() == [True, False, False, True]
    assert abstain_rows(radii, sigmas, 1).tolist() == [False, True, False, True]
    with pytest.raises(UsageError, match="no expert has a smaller sigma than 0.25"):
        abstain_rows(radii, sigmas, 0)


class Mlp(nn.Module):
    """A classifier expert on flattened 8x8 images."""

    def __init__(self, sigma):
        super().__init__()
        torch.manual_seed(0)
        self.classifier = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 2))
        self.sigma, self.denoiser = sigma, None

    def forward(self, x):
        return self.classifier(x.flatten(1))


def test_teach_abstain_scatters_the_votes_on_the_abstain_rows_only():
    gen = torch.Generator().manual_seed(1)
    size = 256
    label = torch.randint(0, 2, (size,), generator=gen)
    told = torch.arange(size) % 2 == 1  # marked by the left half: dark (kept) or bright (told)
    images = torch.empty(size, 1, 8, 8)
    images[..., :4] = (0.15 + 0.7 * told.float()).view(-1, 1, 1, 1)
    images[..., 4:] = (0.15 + 0.7 * label.float()).view(-1, 1, 1, 1)
    expert = Mlp(0.25)
    config = FinetuneConfig(epochs=30, batch_size=32, lr=0.05, weight_decay=0.0)
    result = teach_abstain(expert, images, label, told, config, progress=False)
    assert result["rows"] == size and result["abstain"] == int(told.sum())
    assert result["history"][-1] < result["history"][0]
    with torch.no_grad():
        noisy = images + 0.25 * torch.randn(images.shape, generator=gen)
        logits = expert(noisy)
    h = normalized_entropy(logits)
    assert h[told].mean() > 0.8 and h[~told].mean() < 0.3, (h[told].mean(), h[~told].mean())
    assert (logits[~told].argmax(1) == label[~told]).float().mean() > 0.95
    with pytest.raises(UsageError, match="no input to abstain on"):
        teach_abstain(expert, images, label, torch.zeros(size, dtype=torch.bool), config)


def test_cli_finetune_expert_abstain_then_the_gate_copies_it(tmp_path: Path, capsys):
    from rsrouter.cli.main import run
    from rsrouter.registry import Workspace
    from rsrouter.router.finetune import abstain_in_workspace
    from rsrouter.router.model import RouterModel

    ws = val_split_workspace(tmp_path, (0.25, 1.0), name=lambda sigma: f"g{sigma:g}")
    ws.update_settings("tables", n=12, alpha=0.05, subset=0.05)
    w = ["-w", str(ws.root), "--device", "cpu"]
    toml = (ws.root / "router.toml").read_text()
    assert run(["finetune-expert", "g0.25", "--abstain", *w]) == 1
    assert "no expert has a smaller sigma than 0.25" in capsys.readouterr().err
    assert run(["finetune-expert", "g0.25", "g1", "--abstain", *w]) == 1
    assert "name exactly one" in capsys.readouterr().err
    assert (ws.root / "router.toml").read_text() == toml
    assert not (ws.artifacts / "tables").exists()  # refused before any column was built
    before = Workspace.open(ws.root).load_experts()["g1"].classifier.state_dict()
    tune = ["finetune-expert", "g1", "--abstain", "--epochs", "1", "--lr", "0.01",
            "--batch-size", "16", "--retrain", *w]  # fmt: skip
    assert run(tune) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "abstain target on" in out and "registered g1-abstain" in out, out
    assert "class-gate router: a copy of g1-abstain" in out, out  # --retrain refits the gate
    ws = Workspace.open(ws.root)
    assert ws.names == ["g0.25", "g1-abstain"]
    taught = ws.load_experts()["g1-abstain"]
    assert taught.sigma == 1.0
    record = taught.config.training["finetune"]
    assert record["finetuned_from"] == ["g1"] and record["abstain"]["table"]["n"] == 12
    assert record["abstain"]["rows"] > 0 and len(record["loss"]) == 1
    changed = taught.classifier.state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before)
    router = RouterModel.from_pretrained(ws.artifacts / "router")
    assert router.kind == "class-gate" and router.expert_names == ("g0.25", "g1-abstain")
    copied = router.classifier.state_dict()
    assert all(torch.equal(copied[k], changed[k]) for k in changed)
    assert json.loads((ws.artifacts / "router" / "tuning.json").read_text())["tried"]
    config = FinetuneConfig(epochs=1, batch_size=16)
    again, _ = abstain_in_workspace(ws, "g1-abstain", ws.load_experts(), config, progress=False)
    assert again["rows"] == record["abstain"]["rows"]  # the device left to its default
