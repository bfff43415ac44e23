"""Conformance: the published classifier formats of ../shared/compat import exactly.

Each fixture goes through the public commands (`router convert-checkpoint` / `router
add-expert`, as the README's "Published checkpoints" table gives them), then the registered
expert's logits are compared with the reference outputs of the original code, within the
manifest's tolerance. The files' sha256 are checked first.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import rsrouter.cli.experts  # noqa: F401  (registers the commands)
from rsrouter.cli.app import run
from rsrouter.errors import UsageError
from rsrouter.experts.convert import fit_state_dict
from rsrouter.experts.expert import check_state_dict
from rsrouter.experts.nets import build_classifier
from rsrouter.registry import Workspace

COMPAT = Path(__file__).resolve().parents[1].parent / "shared" / "compat"
MANIFEST = COMPAT / "manifest.json"
pytestmark = pytest.mark.skipif(
    not MANIFEST.is_file(), reason=f"the compat corpus is absent ({MANIFEST} not found)"
)
CLASSIFIERS = ["cohen-cifar10-resnet20", "carlini-cifar10-vit-hf", "carlini-imagenet-beit-timm"]


def fixture(fid: str) -> dict:
    fixtures = json.loads(MANIFEST.read_text())["fixtures"]
    return next(f for f in fixtures if f["id"] == fid)


def reference(fid: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(COMPAT / fixture(fid)["reference"]["file"])


def assert_close(got: torch.Tensor, want: torch.Tensor, fid: str, what: str = "logits") -> None:
    tol = fixture(fid)["tolerance"][what]
    diff = (got - want).abs().max().item()
    assert torch.allclose(got, want, atol=tol.get("atol", 0), rtol=tol.get("rtol", 0)), (
        f"{fid}: max |diff| {diff:.2e} beyond {tol}"
    )


def router(*args) -> int:
    return run([str(a) for a in args])


def pasted(line: str) -> list[str]:
    """The `router …` command a printed hint holds, as argv (what a user pastes)."""
    command = line[line.index("router ") :].rstrip(").`\n")
    argv = shlex.split(command)
    assert argv[0] == "router"
    return argv[1:]


def registered(tmp_path, monkeypatch, capsys, add_argv: list[str]):
    """Run an add-expert command in a fresh workspace; the registered expert, loaded back."""
    ws_dir = tmp_path / "ws"
    assert router("init", ws_dir) == 0
    monkeypatch.chdir(ws_dir)
    assert run(add_argv) == 0, capsys.readouterr().err
    assert router("experts", "--verify") == 0
    capsys.readouterr()
    ws = Workspace.open(ws_dir)
    return ws.load_expert(ws.experts[-1].name)


@pytest.mark.parametrize("fid", CLASSIFIERS)
def test_fixture_files_match_their_sha256(fid):
    for f in fixture(fid)["files"]:
        digest = hashlib.sha256((COMPAT / f["path"]).read_bytes()).hexdigest()
        assert digest == f["sha256"], f["path"]


@pytest.mark.parametrize("name", ["checkpoint.pth.tar", "checkpoint_legacy.pth.tar"])
def test_cohen_cifar_resnet_imports_exactly(name, tmp_path, capsys, monkeypatch):
    fid = "cohen-cifar10-resnet20"
    ckpt, out = COMPAT / fid / name, tmp_path / "cohen-expert"
    argv = ["convert-checkpoint", ckpt, out, "--format", "cohen", "--dataset", "cifar10"]
    assert router(*argv, "--sigma", "0.25") == 0
    hint = capsys.readouterr().out
    assert "router add-expert" in hint
    expert = registered(tmp_path, monkeypatch, capsys, pasted(hint))
    config = expert.config
    assert (config.arch, config.sigma, config.num_classes) == ("cifar_resnet20", 0.25, 10)
    assert config.mean == fixture(fid)["preprocessing"]["mean"]
    assert config.std == fixture(fid)["preprocessing"]["std"]
    ref = reference(fid)
    with torch.no_grad():
        assert_close(expert(ref["x"]), ref["logits"], fid)
        assert_close(expert(ref["x_noisy"]), ref["logits_noisy"], fid)


def test_cohen_normalisation_is_never_defaulted(tmp_path, capsys):
    ckpt = COMPAT / "cohen-cifar10-resnet20" / "checkpoint.pth.tar"
    plain = ["convert-checkpoint", ckpt, tmp_path / "e", "--sigma", "0.25", "--arch",
             "cifar_resnet20", "--num-classes", "10", "--in-chans", "3",
             "--input-size", "32"]  # fmt: skip
    assert router(*plain) == 1
    err = capsys.readouterr().err
    assert "does not record its input normalisation: give --mean and --std" in err
    assert "--format cohen --dataset cifar10" in err
    assert router(*plain[:5], "--format", "cohen") == 1  # no dataset: no normalisation known
    assert "--dataset cifar10 or --dataset imagenet" in capsys.readouterr().err
    assert router(*plain[:2], tmp_path / "e", "--format", "cohen", "--dataset", "cifar10") == 1
    assert "give --sigma" in capsys.readouterr().err  # a Cohen model is trained at one sigma
    assert not (tmp_path / "e").exists()
    # the published names map onto cifar_resnet20 without --format once mean/std are given
    stats = fixture("cohen-cifar10-resnet20")["preprocessing"]
    mean, std = (",".join(map(str, stats[k])) for k in ("mean", "std"))
    assert router(*plain, "--mean", mean, "--std", std) == 0
    capsys.readouterr()


def test_key_mismatch_shows_both_sides_and_the_option_that_fixes_it(tmp_path, capsys):
    ckpt = COMPAT / "cohen-cifar10-resnet20" / "checkpoint.pth.tar"
    wrong = ["convert-checkpoint", ckpt, tmp_path / "e", "--sigma", "0.25", "--arch",
             "cifar_resnet56", "--num-classes", "10", "--in-chans", "3", "--input-size", "32",
             "--mean", "0", "--std", "1"]  # fmt: skip
    assert router(*wrong) == 1
    err = capsys.readouterr().err
    assert "expected names stem.0.weight" in err and "but found 1.conv1.weight" in err
    assert "use `--format cohen --dataset cifar10`" in err
    # the option it names, added to the same command, works (the file's arch wins over none)
    fixed = [a for a in wrong if a not in ("--arch", "cifar_resnet56")]
    assert router(*fixed, "--format", "cohen", "--dataset", "cifar10") == 0
    assert "cifar_resnet20" in (tmp_path / "e" / "config.json").read_text()
    # a wrapper prefix is named with the --strip-prefix that removes it
    net = build_classifier("small_cnn", 3, 1, width=2)
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(UsageError, match=r"but found model\..*`--strip-prefix model\.`"):
        check_state_dict(net, fit_state_dict(state, net.state_dict()), "small_cnn")
    with pytest.raises(
        UsageError, match=r"expected shapes differ \(fc.weight \[3, 64\] but \[4, 64\]"
    ):
        check_state_dict(net, build_classifier("small_cnn", 4, 1, width=2).state_dict(), "x")


def test_cohen_imagenet_resnet50_layout_maps_onto_timm_resnet50():
    """The full-size key list of the published ImageNet ResNet-50 fits timm's resnet50 (the
    architecture --format cohen picks for arch 'resnet50') after the wrapper prefix, and timm's
    resnet50 computes what torchvision's (their model) does with the same weights."""
    import torchvision

    keys = fixture("cohen-imagenet-resnet50-keys")["checkpoint"]["state_dict_keys"]
    dtypes = {"int64": torch.int64}
    published = {
        k[0]: torch.empty(k[1], dtype=dtypes.get(k[2] if len(k) > 2 else "", torch.float32),
                          device="meta")
        for k in keys
    }  # fmt: skip
    net = build_classifier("resnet50", 1000, 3)
    fitted = fit_state_dict(published, net.state_dict(), arch="resnet50")
    check_state_dict(net, fitted, "resnet50")
    assert all(fitted[k].dtype == v.dtype for k, v in net.state_dict().items())
    # same weights, same outputs: a torchvision resnet50 wrapped as Cohen et al. save it
    theirs = torchvision.models.resnet50().eval()
    with torch.no_grad():
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    saved = {f"1.module.{k}": v for k, v in theirs.state_dict().items()}
    assert [[k, list(v.shape)] for k, v in saved.items()] == [k[:2] for k in keys]
    net.load_state_dict(fit_state_dict(saved, net.state_dict(), arch="resnet50"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), theirs(x), atol=1e-5)


def test_transformers_vit_imports_exactly(tmp_path, capsys, monkeypatch):
    fid = "carlini-cifar10-vit-hf"
    folder = COMPAT / fid
    # used directly it is refused, with the command that converts it; that command works
    ws_dir = tmp_path / "ws0"
    assert router("init", ws_dir) == 0
    assert router("add-expert", folder, "--sigma", "0.25", "-w", ws_dir) == 1
    err = capsys.readouterr().err
    assert "is a transformers ViT folder" in err and "router convert-checkpoint" in err
    convert = pasted(err)
    convert[-1] = str(tmp_path / "vit-expert")  # the suggested output sits next to the source
    assert run(convert) == 0
    hint = capsys.readouterr().out
    assert "trained on clean images" in hint
    expert = registered(tmp_path, monkeypatch, capsys, pasted(hint))
    assert expert.config.arch == "hf_vit" and expert.config.class_names[:2] == [
        "airplane",
        "automobile",
    ]
    assert expert.config.mean == [0.5] * 3 and expert.config.std == [0.5] * 3
    ref = reference(fid)
    with torch.no_grad():
        assert_close(expert(ref["x_u8_224"].float() / 255), ref["logits_224"], fid)
        # Carlini et al.: the 32x32 image resized bicubic with antialias, then the same model
        x224 = F.interpolate(ref["x"], size=(224, 224), mode="bicubic", antialias=True)
        assert_close(expert(x224), ref["logits_resized_224"], fid)
    # the pickle-only revision (pytorch_model.bin, read with weights_only=True) gives the same
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    for name in ("config.json", "preprocessor_config.json", "pytorch_model.bin"):
        shutil.copy(folder / name, bin_only / name)
    assert router("convert-checkpoint", bin_only, tmp_path / "from-bin") == 0
    from_bin = (tmp_path / "from-bin" / "model.safetensors").read_bytes()
    assert from_bin == (tmp_path / "vit-expert" / "model.safetensors").read_bytes()


def test_timm_hub_folder_is_used_directly(tmp_path, capsys, monkeypatch):
    fid = "carlini-imagenet-beit-timm"
    expert = registered(
        tmp_path, monkeypatch, capsys, ["add-expert", str(COMPAT / fid), "--sigma", "0.25"]
    )
    config = expert.config
    assert (config.arch, config.input_size, config.num_classes) == (
        "beit_large_patch16_512",
        [512, 512],
        1000,
    )
    assert config.mean == [0.5] * 3 and config.arch_args["embed_dim"] == 64
    ref = reference(fid)
    x = ref["x_u8_128"].float() / 255
    x512 = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    with torch.no_grad():
        assert_close(expert(x512), ref["logits_512"], fid)
    # the same folder as a Hub repo (only the files an expert needs are fetched), offline
    import huggingface_hub

    from helpers import fill_hub_cache
    from rsrouter.experts import Expert

    fill_hub_cache(tmp_path / "cache", "timm/beit-stand-in", COMPAT / fid)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from_hub = Expert.from_pretrained("timm/beit-stand-in", cache_dir=tmp_path / "cache")
    assert from_hub.fingerprint == Expert.from_pretrained(COMPAT / fid).fingerprint
