"""Router model and training: each loss term by hand, a task with a known best expert, resume."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rsrouter.errors import UsageError
from rsrouter.router.model import RouterModel
from rsrouter.router.tables import RadiusTable, build_tables
from rsrouter.router.train import (
    RouterTrainConfig,
    balance_weights,
    consistency_weights,
    radius_utility,
    router_loss,
    soft_labels,
    train_router,
)
from rsrouter.smoothing import sample_counts

# ---------------------------------------------------------------- loss terms by hand

LOGITS = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # m = 2 copies, B = 1, E = 2
RADII = torch.tensor([[0.5, 1.0]])
SIGMAS = torch.tensor([0.25, 1.0])


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_soft_labels_and_balance_weights():
    y = soft_labels(torch.tensor([[0.0, math.log(3.0)]]), 1.0)
    assert y.tolist()[0] == pytest.approx([0.25, 0.75])
    y = soft_labels(torch.tensor([[0.0, 2 * math.log(3.0)]]), 2.0)  # T = 2 halves the radii
    assert y.tolist()[0] == pytest.approx([0.25, 0.75])
    # best experts 0, 1, 1, 1: q = (1/4, 3/4) -> w_e = 4, 4/3, 4/3, 4/3
    w = balance_weights(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.3], [0.0, 0.5]]))
    assert w.tolist() == pytest.approx([4.0, 4 / 3, 4 / 3, 4 / 3])


def test_utility_target_values_rare_radii_and_is_sharp_where_radii_are_small():
    # rows: only expert 0 certifies (0.4); only expert 2 (1.0); all three, 2 the furthest
    radii = torch.tensor([[0.4, 0.0, 0.0], [0.0, 0.0, 1.0], [0.3, 0.3, 1.2]])
    u = radius_utility(radii, step=0.25)
    # grid r = 0, .25, .5, .75, 1: the best expert certifies 2 of the 3 rows at every r (expert 2;
    # expert 0 too at r = 0 and .25), so env = 2/3 and each certified r is worth 1.5
    assert u[0].tolist() == pytest.approx([2 * 1.5, 0.0, 0.0])  # r = 0, 0.25
    assert u[1].tolist() == pytest.approx([0.0, 0.0, 5 * 1.5])  # r = 0 ... 1
    assert u[2].tolist() == pytest.approx([2 * 1.5, 2 * 1.5, 5 * 1.5])  # 1.2: r <= 1 counts
    y = soft_labels(u[:1], 1.0)[0]
    assert y[0] > 0.9 > 0.43 > soft_labels(radii[:1], 1.0)[0, 0]  # the paper's: (.43, .29, .29)
    sparse = radius_utility(torch.tensor([[0.0, 2.0], [0.6, 0.0], [0.6, 0.0], [0.6, 0.0]]))
    assert sparse[0, 1] == pytest.approx(3 * 4 / 3 + 6 * 4.0)  # r > 0.6: env 1/4, worth 4
    with pytest.raises(UsageError, match="target must be one of"):
        RouterTrainConfig(target="margin")
    assert "target" not in RouterTrainConfig().to_dict()  # old run keys unchanged
    assert RouterTrainConfig(target="utility").to_dict()["target"] == "utility"


def test_consistency_weights_pick_the_smallest_or_largest_routed_sigma():
    # copy 0 picks expert 0 (sigma 0.25, R 0.5), copy 1 picks expert 1 (sigma 1.0, R 1.0)
    assert consistency_weights(LOGITS, RADII, SIGMAS, "none", 2.0).tolist() == [1.0]
    assert consistency_weights(LOGITS, RADII, SIGMAS, "weak", 2.0).tolist() == [0.25]
    assert consistency_weights(LOGITS, RADII, SIGMAS, "strong", 2.0).tolist() == [0.5]


def test_router_loss_against_hand_computed_values():
    p0, p1 = _softmax([2.0, 0.0]), _softmax([0.0, 1.0])
    y = _softmax([0.5, 1.0])
    ce = [-sum(yi * math.log(pi) for yi, pi in zip(y, p, strict=True)) for p in (p0, p1)]
    soft_ce = sum(ce) / 2
    pbar = [(a + b) / 2 for a, b in zip(p0, p1, strict=True)]
    kl = sum(
        sum(q * math.log(q / pj) for q, pj in zip(pbar, p, strict=True)) for p in (p0, p1)
    ) / 2  # fmt: skip
    entropy = -sum(q * math.log(q) for q in pbar)
    lam, eta, w_e = 4.0, 0.5, 3.0
    for weighting, w_r in (("none", 1.0), ("weak", 0.25), ("strong", 0.5)):
        loss, parts = router_loss(
            LOGITS, RADII, sigmas=SIGMAS, w_e=torch.tensor([w_e]), lam=lam, eta=eta,
            weighting=weighting, radius_scale=2.0,
        )  # fmt: skip
        assert float(parts["soft_ce"]) == pytest.approx(soft_ce, rel=1e-6)
        assert float(parts["kl"]) == pytest.approx(kl, rel=1e-5)
        assert float(parts["entropy"]) == pytest.approx(entropy, rel=1e-6)
        assert float(parts["consistency"]) == pytest.approx(lam * kl + eta * entropy, rel=1e-5)
        expected = w_e * (soft_ce + w_r * (lam * kl + eta * entropy))
        assert float(loss) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UsageError):
        router_loss(LOGITS[0], RADII, sigmas=SIGMAS)


def test_loss_gradient_points_to_the_larger_radius():
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    loss, _ = router_loss(logits, RADII, sigmas=SIGMAS, lam=0.0, eta=0.0, weighting="none")
    loss.backward()
    assert logits.grad[0, 0, 1] < 0 < logits.grad[0, 0, 0]


# ---------------------------------------------------------------- a task with a known answer


class GroupExpert(nn.Module):
    """Right (label = right half bright) only on inputs whose left half matches its group."""

    def __init__(self, group: int, sigma: float = 0.25):
        super().__init__()
        self.group, self.sigma, self.num_classes = group, sigma, 2
        self.input_shape, self.fingerprint = (1, 8, 8), f"group-{group}-{sigma}"

    def forward(self, x):
        left, right = x[..., :4].flatten(1).mean(1), x[..., 4:].flatten(1).mean(1)
        truth = (right > 0.5).long()
        return torch.where((left > 0.5).long() == self.group, truth, 1 - truth)


def group_data(size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    group = torch.randint(0, 2, (size,), generator=gen)
    label = torch.randint(0, 2, (size,), generator=gen)
    images = torch.empty(size, 1, 8, 8)
    images[..., :4] = (0.15 + 0.7 * group.float()).view(-1, 1, 1, 1)
    images[..., 4:] = (0.15 + 0.7 * label.float()).view(-1, 1, 1, 1)
    return SimpleNamespace(images=images, labels=label, group=group, name="groups",
                           fingerprint=f"groups-{seed}")  # fmt: skip


def make_router(experts, seed=0, **kw):
    return RouterModel.create(
        seed=seed, arch="small_cnn", arch_args={"width": 4}, expert_names=list(experts),
        sigmas=[e.sigma for e in experts.values()],
        fingerprints=[e.fingerprint for e in experts.values()], in_chans=1, input_size=(8, 8),
        **kw,
    )  # fmt: skip


FAST = dict(epochs=6, batch_size=32, lr=0.01, consistency_lambda=1.0, soft_label_scale=0.05, seed=0)


@pytest.mark.parametrize("target", ["radius", "utility"])
def test_trained_router_sends_inputs_to_the_right_expert(tmp_path: Path, target: str):
    experts = {"dark": GroupExpert(0), "bright": GroupExpert(1, sigma=0.5)}
    data = group_data(192, seed=0)
    table = build_tables(experts, data, tmp_path / "art", n=20, progress=False)
    assert torch.equal(table.best, data.group)  # the best expert is known by construction
    router = make_router(experts)
    assert router.sigma_e == 0.5  # default: the largest expert sigma
    config = RouterTrainConfig(**{**FAST, "target": target})
    history = train_router(router, table, data.images, tmp_path / "router", config, progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    test = group_data(100, seed=1)
    counts = sample_counts(router, test.images, router.sigma_e, 20, seed=5, num_classes=2)
    assert (counts.argmax(1) == test.group).float().mean() >= 0.9
    loaded = RouterModel.from_pretrained(tmp_path / "router")
    assert loaded.fingerprint == router.fingerprint
    assert loaded.config()["training"]["epochs"] == 6 and loaded.config()["table"]["n"] == 20
    assert loaded.config()["training"].get("target", "radius") == target
    assert torch.equal(loaded(test.images), router(test.images))
    loaded.check_experts(list(experts), [e.fingerprint for e in experts.values()])
    with pytest.raises(UsageError, match="order"):
        loaded.check_experts(["bright", "dark"], ["x", "y"])


def test_training_resumes_to_identical_weights(tmp_path: Path, capsys):
    experts = {"dark": GroupExpert(0), "bright": GroupExpert(1)}
    data = group_data(64, seed=2)
    table = build_tables(experts, data, tmp_path / "art", n=10, progress=False)
    config = RouterTrainConfig(**{**FAST, "epochs": 3})
    whole = make_router(experts)
    train_router(whole, table, data.images, tmp_path / "whole", config, progress=False)

    killed = make_router(experts)
    calls = {"n": 0}

    def kill(module, args):
        calls["n"] += 1
        if calls["n"] > 3:  # 2 batches per epoch: dies during epoch 2, after 1 checkpoint
            raise KeyboardInterrupt("simulated kill")

    hook = killed.classifier.register_forward_pre_hook(kill)
    with pytest.raises(KeyboardInterrupt):
        train_router(killed, table, data.images, tmp_path / "run", config, progress=False)
    hook.remove()
    assert (tmp_path / "run" / "checkpoints" / "epoch-0001.safetensors").is_file()
    fresh = make_router(experts, seed=99)  # other init: the checkpoint must overwrite it
    capsys.readouterr()
    history = train_router(fresh, table, data.images, tmp_path / "run", config, progress=True)
    assert "resuming from epoch 1 of 3: " in capsys.readouterr().out
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for (name, a), (_, b) in zip(
        whole.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_router_refuses_a_table_for_other_experts(tmp_path: Path):
    experts = {"dark": GroupExpert(0), "bright": GroupExpert(1)}
    table = RadiusTable(
        radii=torch.zeros(2, 2), names=("a", "b"), sigmas=(0.25, 0.25), fingerprints=("x", "y"),
        labels=torch.zeros(2, dtype=torch.long), indices=torch.arange(2), n=10, alpha=0.001,
        seed=0, subset=1.0, dataset_fingerprint="d",
    )  # fmt: skip
    with pytest.raises(UsageError, match="table has experts"):
        train_router(make_router(experts), table, torch.zeros(2, 1, 8, 8), tmp_path)
    with pytest.raises(UsageError, match="consistency_weight"):
        RouterTrainConfig(consistency_weight="medium")
    with pytest.raises(UsageError, match="unknown"):
        RouterTrainConfig.from_settings({"epoch": 3})


# ---------------------------------------------------------------- finetuning under routed sigma


class GroupRule(nn.Module):
    """A router classifier that routes by the (normalised) left half: dark -> 0, bright -> 1."""

    def forward(self, x):
        left = x[..., :4].flatten(1).mean(1)
        return torch.stack([-left, left], dim=1)


class Member(nn.Module):
    """One sigma of a family sharing ``classifier``; records the noise level of what it sees."""

    def __init__(self, classifier, sigma):
        super().__init__()
        self.classifier, self.sigma, self.denoiser = classifier, sigma, None
        self.fingerprint = f"member-{sigma}"
        self.seen = []

    def forward(self, x):
        self.seen.append(x[..., 4:].flatten(1).std(1).detach())  # the clean right half is flat
        return self.classifier(x.flatten(1))


def test_finetune_uses_the_sigma_the_router_picks():
    from rsrouter.router.finetune import FinetuneConfig, finetune_family

    shared = nn.Linear(64, 2)
    family = {"dark": Member(shared, 0.25), "bright": Member(shared, 1.0)}
    router = make_router(family, seed=0)
    router.classifier = GroupRule()
    data = group_data(96, seed=3)
    before = shared.weight.detach().clone()
    config = FinetuneConfig(epochs=2, batch_size=32, lr=1e-2, route_n=8)
    result = finetune_family(family, router, data.images, data.labels, config, progress=False)
    groups = {"dark": int((data.group == 0).sum()), "bright": int((data.group == 1).sum())}
    assert result["routed"] == groups
    for name, member in family.items():
        seen = torch.cat(member.seen)
        assert len(seen) == 2 * groups[name]  # each routed input once per epoch
        assert ((seen > 0.6 * member.sigma) & (seen < 1.5 * member.sigma)).all()
    assert not torch.equal(shared.weight, before) and result["history"][1] < result["history"][0]
    assert result["groups"] == [["dark", "bright"]]


def test_finetune_trains_experts_of_their_own_each_on_its_inputs():
    from rsrouter.router.finetune import FinetuneConfig, finetune_family

    torch.manual_seed(0)
    split = {"dark": Member(nn.Linear(64, 2), 0.25), "bright": Member(nn.Linear(64, 2), 1.0)}
    router = make_router(split, seed=0)
    router.classifier = GroupRule()
    data = group_data(96, seed=3)
    before = {n: m.classifier.weight.detach().clone() for n, m in split.items()}
    config = FinetuneConfig(epochs=2, batch_size=32, lr=1e-2, route_n=8)
    result = finetune_family(split, router, data.images, data.labels, config, progress=False)
    assert result["groups"] == [["dark"], ["bright"]]
    assert split["dark"].classifier is not split["bright"].classifier
    for name, member in split.items():
        assert not torch.equal(member.classifier.weight, before[name])
        seen = torch.cat(member.seen)  # only its own inputs, at its own sigma
        assert len(seen) == 2 * result["routed"][name]
        assert ((seen > 0.6 * member.sigma) & (seen < 1.5 * member.sigma)).all()
    keep = data.group == 0  # dark inputs only: the router sends bright nothing
    with pytest.raises(UsageError, match="sends no training input to bright"):
        finetune_family(split, router, data.images[keep], data.labels[keep], config, progress=False)


# ---------------------------------------------------------------- the CLI on a real workspace


def _constant_classifier(cls: int):
    """A small CNN that always answers ``cls`` (zero head weights, one-hot bias)."""
    from rsrouter.experts import Expert, build_classifier

    net = build_classifier("small_cnn", 10, 1, width=2)
    with torch.no_grad():
        net.fc.weight.zero_()
        net.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(cls), 10).float())
    return Expert.from_module(net, sigma=0.25, arch="small_cnn", num_classes=10, in_chans=1,
                              input_size=(28, 28), arch_args={"width": 2})  # fmt: skip


def test_cli_tables_train_finetune_retrain(tmp_path: Path, capsys):
    from rsrouter.cli.main import run
    from rsrouter.experts import Expert
    from rsrouter.experts.train import DenoiserConfig, build_denoiser
    from rsrouter.registry import Workspace

    ws = Workspace.init(tmp_path / "ws")
    unet, scheduler = build_denoiser(DenoiserConfig(block_out_channels=(8, 8)), 1, 28)
    base = _constant_classifier(3)
    dds = Expert.from_parts(base.config, base.classifier, unet, scheduler, sigma=0.25)
    dds.save_pretrained(tmp_path / "dds")
    ws.add_expert(str(tmp_path / "dds"), [0.25, 0.5], name="dds")
    ws.update_settings("router", arch_args={"width": 2})
    w = ["-w", str(tmp_path / "ws")]
    table = ["tables", "--subset", "0.01", "--n", "12", "--alpha", "0.05", "--device", "cpu"]
    assert run([*table, *w]) == 0
    assert "computing 2 column(s)" in capsys.readouterr().out
    assert run([*table, *w]) == 0
    assert "nothing to compute" in capsys.readouterr().out
    train = ["train", "--epochs", "2", "--batch-size", "16", "--device", "cpu", *w]
    assert run(train) == 0
    assert "no val split in router.toml" in capsys.readouterr().out  # so: the learned router
    router = RouterModel.from_pretrained(tmp_path / "ws" / ".rsrouter" / "router")
    assert router.expert_names == ("dds-sigma0.25", "dds-sigma0.5") and router.sigma_e == 0.5
    tune = ["finetune-expert", "dds-sigma0.25", "dds-sigma0.5", "--epochs", "1", "--lr", "0.01",
            "--route-n", "4", "--batch-size", "16", "--retrain", "--device", "cpu", *w]  # fmt: skip
    assert run(tune) == 0
    ws = Workspace.open(tmp_path / "ws")
    assert ws.names == ["dds-ft-sigma0.25", "dds-ft-sigma0.5"]
    tuned = ws.load_experts()
    assert not torch.equal(tuned["dds-ft-sigma0.5"].classifier.fc.weight, dds.classifier.fc.weight)
    assert tuned["dds-ft-sigma0.5"].classifier is tuned["dds-ft-sigma0.25"].classifier
    router = RouterModel.from_pretrained(tmp_path / "ws" / ".rsrouter" / "router")
    router.check_experts(ws.names, [e.fingerprint for e in tuned.values()])
    capsys.readouterr()
    assert run([*table, *w]) == 0  # the retrain built the new columns already
    assert "nothing to compute" in capsys.readouterr().out
    assert run(["finetune-expert", "nope", *w]) == 1
    toml = (tmp_path / "ws" / "router.toml").read_text()
    taken = ["finetune-expert", "dds-ft-sigma0.25", "--name", "dds-ft", "--keep", *w]
    assert run(taken) == 1 and "already registered" in capsys.readouterr().err
    assert run(["finetune-expert", "dds-ft-sigma0.25", "--name", "../x", *w]) == 1
    assert "expert name '../x'" in capsys.readouterr().err
    assert (tmp_path / "ws" / "router.toml").read_text() == toml  # nothing lost or added
    assert not (tmp_path / "ws" / ".rsrouter" / "x").exists()


def test_cli_finetune_gaussian_experts_registers_one_expert_each(tmp_path: Path, capsys):
    from helpers import val_split_workspace
    from rsrouter.cli.main import run
    from rsrouter.registry import Workspace

    ws = val_split_workspace(tmp_path, (0.25, 1.0), name=lambda sigma: f"g{sigma:g}")
    ws.update_settings("tables", n=12, alpha=0.05, subset=0.05)
    ws.update_settings("router", arch_args={"width": 2})
    w = ["-w", str(ws.root), "--device", "cpu"]
    half = "0=g0.25"  # the copy of g1 predicts class 0 or 1 on the draws (random weights)
    assert run(["train", "--class-map", half, *w]) == 0
    old = Workspace.open(ws.root).load_experts()
    tune = ["finetune-expert", "g0.25", "g1", "--name", "gft", "--epochs", "1", "--lr", "0.01",
            "--route-n", "4", "--batch-size", "16", "--retrain", *w]  # fmt: skip
    assert run(tune) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "registered gft-sigma0.25, gft-sigma1" in out, out
    ws = Workspace.open(ws.root)
    assert ws.names == ["gft-sigma0.25", "gft-sigma1"]
    tuned = ws.load_experts()
    assert tuned["gft-sigma0.25"].classifier is not tuned["gft-sigma1"].classifier
    routed = tuned["gft-sigma1"].config.training["finetune"]["routed"]
    for new, before in (("gft-sigma0.25", "g0.25"), ("gft-sigma1", "g1")):
        assert tuned[new].sigma == old[before].sigma
        a, b = tuned[new].classifier.state_dict(), old[before].classifier.state_dict()
        assert any(not torch.equal(a[k], b[k]) for k in a) == (routed[before] > 0)
    assert min(routed.values()) > 0  # both trained
    router = RouterModel.from_pretrained(ws.artifacts / "router")
    router.check_experts(ws.names, [e.fingerprint for e in tuned.values()])


def test_router_with_a_denoiser_round_trips(tmp_path: Path):
    from rsrouter.experts.train import DenoiserConfig, build_denoiser

    unet, scheduler = build_denoiser(DenoiserConfig(block_out_channels=(8, 8)), 1, 8)
    experts = {"dark": GroupExpert(0), "bright": GroupExpert(1, sigma=0.5)}
    router = make_router(experts, unet=unet, scheduler=scheduler, sigma_e=0.75)
    assert router.denoiser.sigma == 0.75 and router.config()["denoiser"] is True
    router.save_pretrained(tmp_path / "r")
    assert (tmp_path / "r" / "denoiser" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = RouterModel.from_pretrained(tmp_path / "r")
    x = group_data(4, seed=0).images
    assert torch.allclose(loaded(x), router.eval()(x), atol=1e-6)
    assert loaded.fingerprint == router.fingerprint


# ---------------------------------------------------------------- warm start from an expert


def _small_expert(sigma: float, width: int, seed: int):
    from rsrouter.experts import Expert
    from rsrouter.experts.nets import build_classifier

    torch.manual_seed(seed)
    net = build_classifier("small_cnn", 10, 1, width=width)
    return Expert.from_module(
        net, sigma=sigma, arch="small_cnn", arch_args={"width": width}, num_classes=10,
        in_chans=1, input_size=(8, 8), mean=(0.25,), std=(0.5,),
    )  # fmt: skip


def test_router_init_copies_an_experts_weights_but_its_head():
    from rsrouter.router.train import ROUTER_DEFAULTS, build_router

    experts = {"small": _small_expert(0.25, 4, 0), "large": _small_expert(1.0, 4, 1)}
    settings = {**ROUTER_DEFAULTS, "arch_args": {"width": 4}, "init": "large"}
    router = build_router(experts, settings, seed=0)
    source = experts["large"].classifier.state_dict()
    mine = router.classifier.state_dict()
    assert list(mine)[-2:] == ["fc.weight", "fc.bias"]
    for key in list(mine)[:-2]:
        assert torch.equal(mine[key], source[key]), key
    assert mine["fc.weight"].shape == (2, source["fc.weight"].shape[1])
    assert router.mean == (0.25,) and router.info["init"] == "large"
    plain = build_router(experts, {**settings, "init": None}, seed=0)
    assert not torch.equal(
        plain.classifier.state_dict()["features.0.weight"], source["features.0.weight"]
    )
    with pytest.raises(UsageError, match="not a registered expert"):
        build_router(experts, {**settings, "init": "nobody"})
    with pytest.raises(UsageError, match="architecture"):
        build_router(experts, {**settings, "arch_args": {"width": 8}})


# ---------------------------------------------------------------- class-map router


def test_class_map_router_routes_by_the_copied_experts_class(tmp_path: Path):
    from rsrouter.composition import DualSmoothed
    from rsrouter.router.train import ROUTER_DEFAULTS, build_router, train_router

    experts = {"small": _small_expert(0.25, 4, 0), "large": _small_expert(1.0, 4, 1)}
    settings = {**ROUTER_DEFAULTS, "class_map": {"3": "small", "7": "small"}}
    router = build_router(experts, settings, seed=0).eval()
    assert router.info["init"] == "large" and router.class_map == (1, 1, 1, 0, 1, 1, 1, 0, 1, 1)
    x = torch.rand(64, 1, 8, 8) * torch.linspace(0, 5, 64).view(-1, 1, 1, 1)
    classes = experts["large"].eval()(x).argmax(1)  # classes 0, 3, 4 and 6 occur
    want = torch.tensor([0 if c in (3, 7) else 1 for c in classes.tolist()])
    votes = router(x)
    assert torch.equal(votes.argmax(1), want) and torch.equal(votes.sum(1), torch.ones(64))
    assert 0 < int(want.eq(0).sum()) < 64  # both routes occur: the test can fail
    # nothing is trained; the folder round-trips with the same routes and fingerprint
    assert train_router(router, _table_for(experts), x, tmp_path / "r") == []
    loaded = RouterModel.from_pretrained(tmp_path / "r")
    assert loaded.class_map == router.class_map and loaded.fingerprint == router.fingerprint
    assert torch.equal(loaded(x), votes)
    dual = DualSmoothed(loaded, loaded.sigma_e, list(experts.values()))
    for cert in dual.certify_batch(x[-8:].clamp(0, 1), n0=8, n=64, alpha=0.01, seed=0):
        counts = cert.router.counts  # one vote per noisy copy, for the mapped expert
        assert sum(counts) == 64 and cert.expert in (-1, max(range(2), key=counts.__getitem__))
    # by class name, from the dataset's names when the expert has none
    named = build_router(
        experts, {**settings, "class_map": {"Shirt": "small"}},
        info={"class_names": [f"c{i}" for i in range(9)] + ["Shirt"]},
    )  # fmt: skip
    assert named.class_map == (1,) * 9 + (0,)


def _table_for(experts, rows: int = 4):
    """A table over ``experts`` whose rows alternate which expert certifies the larger radius."""
    from rsrouter.router.tables import RadiusTable

    radii = torch.ones(rows, len(experts))
    radii[::2, 0] = 2.0
    return RadiusTable(
        names=tuple(experts), sigmas=tuple(e.sigma for e in experts.values()),
        fingerprints=tuple(e.fingerprint for e in experts.values()),
        indices=torch.arange(rows), labels=torch.zeros(rows, dtype=torch.long),
        radii=radii, n=8, alpha=0.01, seed=0, subset=1.0, dataset_fingerprint="d",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"class_map": {"42": "small"}}, "not a class"),
        ({"class_map": {"3": "nobody"}}, "not a registered expert"),
        ({"class_map": {"3": "small"}, "init": "nobody"}, "not a registered expert"),
        ({"class_map": {"3": "small"}, "sigma_e": 0.75}, "no single expert"),
        ({"class_map": ["small"]}, "table of class = expert"),
    ],
)
def test_class_map_router_refuses_bad_settings(change, message):
    from rsrouter.router.train import ROUTER_DEFAULTS, build_router

    experts = {"small": _small_expert(0.25, 4, 0), "large": _small_expert(1.0, 4, 1)}
    with pytest.raises(UsageError, match=message):
        build_router(experts, {**ROUTER_DEFAULTS, **change})
    with pytest.raises(UsageError, match="expert index"):
        RouterModel(
            arch="small_cnn", expert_names=["a", "b"], sigmas=[0.25, 1.0], fingerprints=["x", "y"],
            in_chans=1, input_size=(8, 8), class_map=[0, 2],
        )  # fmt: skip


def test_cli_train_class_map_builds_no_tables_and_certifies(tmp_path: Path, capsys):
    from helpers import fashion_workspace
    from rsrouter.cli.main import run

    ws = fashion_workspace(tmp_path)
    w = ["-w", str(tmp_path / "ws"), "--device", "cpu"]
    assert run(["train", "--class-map", "Shirt=gauss-0.25, Coat=gauss-0.25", *w]) == 0
    assert "class-map router: a copy of gauss-0.5" in capsys.readouterr().out
    assert not (ws.artifacts / "tables").exists()  # routes are fixed: no radius tables
    router = RouterModel.from_pretrained(ws.artifacts / "router")
    assert router.class_map == (1, 1, 1, 1, 0, 1, 0, 1, 1, 1)
    certify = ["certify", "--limit", "3", "--n0", "8", "--n", "16", *w]
    assert run(certify) == 0
    assert run(["train", "--class-map", "Scarf=gauss-0.25", *w]) == 1
    assert "'Scarf' is not a class" in capsys.readouterr().err
    assert run(["train", "--class-map", "Shirt", *w]) == 2
    assert RouterModel.from_pretrained(ws.artifacts / "router").class_map == router.class_map


def test_card_of_a_class_map_router_names_its_routes():
    from rsrouter.composition.card import render_card

    config = {
        "arch": "small_cnn", "sigma_e": 1.0, "in_chans": 1, "input_size": [8, 8],
        "class_map": [1, 0, 1], "class_names": ["Coat", "Shirt", "Bag"], "init": "large",
        "bundle": {"experts": [{"name": "small", "sigma": 0.25}, {"name": "large", "sigma": 1.0}]},
    }  # fmt: skip
    text = str(render_card(config))
    assert "a copy of expert large whose predicted class picks the expert" in text
    assert "classes Shirt → small; classes Coat, Bag → large" in text


def test_head_only_training_moves_the_output_layer_alone(tmp_path: Path):
    from rsrouter.router.train import ROUTER_DEFAULTS, RouterTrainConfig, build_router, train_router

    experts = {"small": _small_expert(0.25, 4, 0), "large": _small_expert(1.0, 4, 1)}
    settings = {**ROUTER_DEFAULTS, "arch_args": {"width": 4}, "init": "large"}
    router = build_router(experts, settings, seed=0)
    before = {k: v.clone() for k, v in router.classifier.state_dict().items()}
    torch.manual_seed(0)
    images = torch.rand(16, 1, 8, 8)
    table = _table_for(experts, rows=16)
    config = RouterTrainConfig(epochs=2, batch_size=8, lr=0.1, head_only=True)
    history = train_router(router, table, images, tmp_path / "r", config)
    assert len(history) == 2
    after = router.classifier.state_dict()
    for key in list(after)[:-2]:
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert "head_only" in config.to_dict() and "head_only" not in RouterTrainConfig().to_dict()
    plain = build_router(experts, {**settings, "init": None}, seed=0)
    with pytest.raises(UsageError, match="init"):
        train_router(plain, table, images, tmp_path / "p", config)


def test_cli_train_head_only_from_an_expert(tmp_path: Path, capsys):
    from helpers import fashion_workspace
    from rsrouter.cli.main import run

    ws = fashion_workspace(tmp_path)
    ws.update_settings("router", arch_args={"width": 2})
    ws.update_settings("tables", subset=0.05, n=8, alpha=0.05)
    w = ["-w", str(tmp_path / "ws"), "--device", "cpu"]
    assert run(["train", "--epochs", "1", "--batch-size", "8", "--head-only", *w]) == 1
    assert "init" in capsys.readouterr().err  # a probe needs an expert's features...
    assert not (ws.artifacts / "tables").exists()  # ...and is refused before any table work
    train = ["train", "--epochs", "1", "--batch-size", "8", "--init", "gauss-0.5", "--head-only"]
    assert run([*train, *w]) == 0
    router = RouterModel.from_pretrained(ws.artifacts / "router")
    expert = ws.load_expert("gauss-0.5")
    assert router.info["init"] == "gauss-0.5" and router.info["training"]["head_only"] is True
    mine, theirs = router.classifier.state_dict(), expert.classifier.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in list(mine)[:-2])
