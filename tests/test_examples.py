"""The examples run end to end at a tiny size on CPU: Fashion-MNIST (--smoke) and the CIFAR-10
denoised-smoothing set-up with tiny stand-ins for the Hub denoiser and the timm classifier."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    path = ROOT / "examples" / name / "run.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fashion_mnist_example_smoke_runs_both_expert_families(tmp_path, capsys):
    example = load_example("fashion_mnist")
    out = tmp_path / "fm"
    assert example.main(["--smoke", "--out", str(out), "--quiet", "--router-denoiser"]) == 0
    printed = capsys.readouterr().out
    for mode, expert in (("gaussian", "gauss-sigma0.25"), ("denoised", "dds-sigma0.25")):
        report = out / mode / ".rsrouter" / "report"
        assert (report / "curve.png").is_file()
        assert expert in (report / "certified_accuracy.md").read_text()
        assert json.loads((report / "pipeline.json").read_text())["expert_kind"] in (
            "classifier",
            "denoised",
        )
    headline = json.loads((out / "gaussian" / ".rsrouter" / "report" / "summary.json").read_text())
    assert headline["rule"] == "cascade"  # the default design's headline
    toml = (out / "denoised" / "router.toml").read_text()
    assert toml.count('name = "dds-sigma') == 3 and "denoiser_source" in toml
    router = json.loads((out / "denoised" / ".rsrouter" / "router" / "config.json").read_text())
    assert router["denoiser"] is True
    assert "oracle" in printed


def test_fashion_mnist_example_full_sizes_follow_the_issue():
    example = load_example("fashion_mnist")
    full = example.FULL
    assert (full.table_n, full.n, full.dataset) == (100, 10_000, "fashion-mnist")
    assert full.certify_limit >= 1000 and full.sigmas == (0.25, 0.5, 1.0)
    # the project's default design (class gate + the experts' cascade) unless asked otherwise
    gate = example.config_for(example.parse(["--cpu"]), "gaussian")
    assert gate.router_kind == "class-gate" and gate.validation == 500  # no tables needed
    learned = example.config_for(example.parse(["--cpu", "--router-kind", "learned"]), "gaussian")
    assert learned.router_kind == "learned"
    assert gate.cascade_fit == "regret"
    keep = example.config_for(
        example.parse(["--cpu", "--cascade-fit", "keep-multiscale"]), "gaussian"
    )
    assert keep.cascade_fit == "keep-multiscale"
    # the DDPM in front of the router means the paper's learned router, for the denoised family
    args = example.parse(["--router-denoiser"])
    assert example.config_for(args, "denoised").router_kind == "learned"
    assert example.config_for(args, "gaussian").router_kind == "class-gate"


def _stand_in_denoiser(folder: Path) -> None:
    """A tiny random diffusers UNet2DModel + DDPMScheduler in google/ddpm-cifar10-32's layout."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        add_attention=False,
    )
    unet.save_pretrained(folder, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder)


def _stand_in_classifier(path: Path) -> None:
    """A tiny random timm ViT (64x64 input) whose head always prefers class 0."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=64)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[0] = 5.0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def _image_folder(root: Path) -> None:
    """train/ and test/ ImageFolders of random 32x32 RGB images: one per class, plus extra
    images of the first class (the one the stand-in classifier predicts)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, extra in (("train", 10), ("test", 3)):
        for k, label in enumerate([*range(10), *[0] * extra]):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{k}.png")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_cifar10_dds_example_with_tiny_stand_ins(tmp_path, capsys):
    example = load_example("cifar10_dds")
    _stand_in_denoiser(tmp_path / "ddpm")
    _stand_in_classifier(tmp_path / "vit.safetensors")
    _image_folder(tmp_path / "data")
    argv = [
        "--smoke", "--quiet", "--out", str(tmp_path / "ws"), "--dataset", str(tmp_path / "data"),
        "--denoiser", str(tmp_path / "ddpm"), "--timm-arch", "test_vit",
        "--weights", str(tmp_path / "vit.safetensors"), "--arch-args", "img_size=64",
        "--input-size", "64",
    ]  # fmt: skip
    assert example.main(argv) == 0, capsys.readouterr().err
    ws = tmp_path / "ws"
    toml = (ws / "router.toml").read_text()
    for sigma in ("0.25", "0.5", "1"):
        assert f"dds-sigma{sigma}" in toml
    classifier = json.loads((ws / "classifier" / "config.json").read_text())
    assert classifier["sigma"] is None and classifier["input_size"] == [64, 64]
    router = json.loads((ws / ".rsrouter" / "router" / "config.json").read_text())
    assert router["denoiser"] is True and router["sigma_e"] == 1.0
    assert (ws / ".rsrouter" / "report" / "curve.png").is_file()
    # a rerun registers nothing new and certifies nothing new
    assert example.main(argv) == 0
    assert (ws / "router.toml").read_text() == toml
    capsys.readouterr()
    bad_mean = [*argv[:3], str(tmp_path / "ws2"), *argv[4:], "--mean", "a,b,c"]
    assert example.main(bad_mean) == 1
    assert "'a,b,c' is not a comma-separated list of numbers" in capsys.readouterr().err


def test_cifar10_dds_example_refuses_a_pickle_as_weights(tmp_path, capsys):
    example = load_example("cifar10_dds")
    _stand_in_denoiser(tmp_path / "ddpm")
    _image_folder(tmp_path / "data")
    (tmp_path / "vit.pt").write_bytes(b"not safetensors")
    argv = [
        "--smoke", "--quiet", "--out", str(tmp_path / "ws"), "--dataset", str(tmp_path / "data"),
        "--denoiser", str(tmp_path / "ddpm"), "--timm-arch", "test_vit",
        "--weights", str(tmp_path / "vit.pt"),
    ]  # fmt: skip
    assert example.main(argv) == 1
    assert "safetensors" in capsys.readouterr().err


def test_gpu_session_script_smoke_runs_its_steps(tmp_path):
    """scripts/gpu_session.sh (issue 15's runbook) at its tiny CPU sizes: the bench step writes
    the pipeline's figures (both halves, the peer row) and the overhead's; the example's step
    writes the report of the default design and copies the workspace to $OUT; the routing step
    reads the example's cached counts (the routing designs, the Multiscale-keeping ceiling)."""
    env = {
        **os.environ,
        "SMOKE": "1",
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "WORKSPACE": str(tmp_path / "ws"),
    }

    def step(name):
        return subprocess.run(
            ["bash", "scripts/gpu_session.sh", name], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip

    done = step("bench")
    assert done.returncode == 0, done.stderr[-2000:]
    pipeline = json.loads(
        (tmp_path / "out" / "carlini-eager" / "carlini_pipeline.json").read_text()
    )
    assert set(pipeline["seconds_per_input"]) == {"standard fp32", "dual fp32"}
    assert pipeline["peer"]["seconds_per_input"] > 0
    assert "Host syncs" in (tmp_path / "out" / "carlini-eager" / "profile.txt").read_text()
    overhead = json.loads((tmp_path / "out" / "certify-overhead.json").read_text())
    assert [m["arch"] for m in overhead["models"]] == ["cifar_resnet20"]
    done = step("example")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "report:" in (tmp_path / "out" / "example.txt").read_text()
    report = tmp_path / "out" / "report"
    assert (report / "curve.png").is_file() and (report / "certified_accuracy.md").is_file()
    assert json.loads((report / "summary.json").read_text())["rule"] == "cascade"
    with tarfile.open(tmp_path / "out" / "ws.tar.gz") as archive:  # what a fresh machine resumes
        toml = archive.extractfile("ws/gaussian/router.toml").read().decode()
    assert toml == (tmp_path / "ws" / "gaussian" / "router.toml").read_text()
    shipped = [f for f in (tmp_path / "out").rglob("*") if f.is_file()]
    depth = max(len(f.relative_to(tmp_path / "out").parts) for f in shipped)
    assert depth <= 3  # the device tool brings back files at most two folders down
    done = step("routing")
    assert done.returncode == 0, done.stderr[-2000:]
    designs = json.loads((tmp_path / "out" / "routing.json").read_text())["designs"]
    assert {(d["design"], d["rule"]) for d in designs} == {
        ("gate", "min"),
        ("gate", "pairwise"),
        ("gate", "agreement"),
        ("cascade-keep", "cascade"),
        ("cascade-plain", "cascade"),
    }
    ceiling = json.loads((tmp_path / "out" / "ceiling.json").read_text())
    assert {"val", "test", "test, plug-in"} <= set(ceiling["splits"])
    bad = step("study")
    assert bad.returncode == 2 and "unknown step" in bad.stderr


COMPAT = ROOT.parent / "shared" / "compat"
IMPROVED = COMPAT / "carlini-cifar10-improved-diffusion" / "cifar10_uncond_tiny.pt"


@pytest.mark.skipif(not IMPROVED.is_file(), reason=f"the compat corpus is absent ({COMPAT})")
def test_cifar10_dds_example_converts_the_papers_improved_diffusion_denoiser(tmp_path):
    """--denoiser-format improved-diffusion: the .pt becomes <out>/denoiser once, which
    add-expert takes (the compat stand-in has the published file's layout, smaller widths)."""
    from rsrouter.experts.expert import load_denoiser

    example = load_example("cifar10_dds")
    argv = ["--denoiser", str(IMPROVED), "--denoiser-format", "improved-diffusion",
            "--classifier", "unused"]  # fmt: skip
    args = example.parse(argv)
    folder = Path(example.denoiser_source(args, tmp_path))
    assert folder == tmp_path / "denoiser"
    unet, scheduler = load_denoiser(folder)
    assert unet.config.out_channels == 6 and scheduler.config.num_train_timesteps == 4000
    stamp = (folder / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert example.denoiser_source(args, tmp_path) == str(folder)  # converted once
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    plain = example.parse(["--classifier", "unused"])
    assert example.denoiser_source(plain, tmp_path) == "google/ddpm-cifar10-32"
