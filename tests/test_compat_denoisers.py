"""Conformance: the published diffusion denoisers of ../shared/compat, through the public commands.

Each fixture is converted with `router convert-denoiser` (or used as is), registered with
`router add-expert --denoiser ... --classifier ... --sigma ...`, loaded back (the workspace and
Expert.from_pretrained), and compared with the original code's outputs in reference.safetensors
within the manifest's tolerance: t* exactly, the UNet input rebuilt from x + delta, the raw UNet
output and the one-step denoised image. The full-size published key layouts are mapped too, on
the meta device (no memory), so the importer is checked against the real files' shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

import helpers
from rsrouter.cli.main import run  # importing main registers every command
from rsrouter.experts import Expert
from rsrouter.experts import convert_denoiser as cd
from rsrouter.registry import Workspace

COMPAT = Path(__file__).resolve().parents[1].parent / "shared" / "compat"
pytestmark = pytest.mark.skipif(
    not (COMPAT / "manifest.json").is_file(),
    reason=f"the compat corpus is absent ({COMPAT}; CI checks out shared/ beside the clone)",
)
DENOISERS = (
    "carlini-cifar10-improved-diffusion",
    "carlini-imagenet-guided-diffusion",
    "ddpm-cifar10-32-rev2022",
    "ddpm-cifar10-32-main",
)


def fixture(fid: str) -> dict:
    manifest = json.loads((COMPAT / "manifest.json").read_text())
    return next(f for f in manifest["fixtures"] if f["id"] == fid)


def reference(fix: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(COMPAT / fix["reference"]["file"])


@pytest.fixture(autouse=True)
def one_thread():
    """The manifest's tolerances are for float32 on CPU; one thread is also fastest here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("fid", DENOISERS)
def test_files_match_the_manifest_sha256(fid):
    for entry in fixture(fid)["files"]:
        digest = hashlib.sha256((COMPAT / entry["path"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"], entry["path"]


def register(tmp_path: Path, denoiser: Path, sigmas: list[float], size: int) -> dict[float, Expert]:
    """`router init` + `router add-expert --denoiser` with a tiny 3-channel classifier; the
    experts as the workspace loads them, by sigma."""
    classifier = helpers.small_cnn_expert(0, num_classes=10, in_chans=3, input_size=size, seed=0)
    classifier.save_pretrained(tmp_path / "classifier")
    ws_dir = tmp_path / "ws"
    assert run(["init", str(ws_dir)]) == 0
    sigma = ",".join(f"{s:g}" for s in sigmas)
    argv = ["add-expert", "--denoiser", str(denoiser), "--classifier", str(tmp_path / "classifier")]
    assert run([*argv, "--sigma", sigma, "--name", "dds", "-w", str(ws_dir)]) == 0
    experts = Workspace.open(ws_dir).load_experts()
    return {e.sigma: e for e in experts.values()}


def check_denoiser(expert: Expert, x, ref: dict, prefix: str, t_star, tol: dict, errors: dict):
    """t* exactly; x_t from x + delta; raw UNet output; denoised image (per the tolerances)."""
    den = expert.denoiser
    assert den.timestep == t_star, (prefix, den.timestep, t_star)
    out_key = "model_out" if f"{prefix}/model_out" in ref else "unet_out"
    x_t = den.sqrt_abar * (2 * (x + ref[f"{prefix}/delta"]) - 1)
    errors["x_t"] = max(errors.get("x_t", 0.0), max_err(x_t, ref[f"{prefix}/x_t"]))
    assert torch.allclose(x_t, ref[f"{prefix}/x_t"], atol=1e-5)
    with torch.no_grad():
        t = torch.full((len(x),), t_star, dtype=torch.long)
        raw = den.unet(ref[f"{prefix}/x_t"], t).sample
        denoised = den(x + ref[f"{prefix}/delta"])
    for name, got, want in ((out_key, raw, ref[f"{prefix}/{out_key}"]),
                            ("denoised", denoised, ref[f"{prefix}/denoised"])):  # fmt: skip
        errors[name] = max(errors.get(name, 0.0), max_err(got, want))
        assert torch.allclose(got, want, **tol[name]), (prefix, name, errors[name])


def check_openai(tmp_path, fid: str, convert_args: list[str], size: int) -> dict:
    fix = fixture(fid)
    ref = reference(fix)
    checkpoint = next(f["path"] for f in fix["files"] if f["role"] != "reference")
    out = tmp_path / "denoiser"
    assert run(["convert-denoiser", str(COMPAT / checkpoint), str(out), *convert_args]) == 0
    per_sigma = fix["reference"]["per_sigma"]
    sigmas = [float(k.removeprefix("sigma")) for k in per_sigma]
    experts = register(tmp_path, out, sigmas, size)
    x = ref["x"] if "x" in ref else ref["x_u8"].float() / 255
    errors: dict[str, float] = {}
    for key, info in per_sigma.items():
        expert = experts[float(key.removeprefix("sigma"))]
        assert float(expert.denoiser.unet.config.out_channels) == 2 * x.shape[1]  # learned var.
        check_denoiser(expert, x, ref, key, info["t_star"], fix["tolerance"], errors)
    # the denoised expert round-trips as a folder: same outputs, resize mode kept
    expert = experts[sigmas[0]]
    saved = expert.save_pretrained(tmp_path / "expert")
    again = Expert.from_pretrained(saved)
    assert again.config.resize_mode == "bicubic-antialias"
    assert again.fingerprint == expert.fingerprint
    with torch.no_grad():
        assert torch.equal(again.denoiser(x), expert.denoiser(x))
    return errors


def test_carlini_cifar10_improved_diffusion(tmp_path):
    # the published defaults: cosine schedule, 4000 steps, rescaled timesteps, 4 heads
    errors = check_openai(
        tmp_path, "carlini-cifar10-improved-diffusion", ["--format", "improved-diffusion"], 32
    )
    assert set(errors) == {"x_t", "model_out", "denoised"}
    print(f"improved-diffusion: max |error| {errors}")


def test_carlini_imagenet_guided_diffusion(tmp_path):
    # the stand-in has 16 channels per head (published: 64, the default) and 64x64 inputs
    args = ["--format", "guided-diffusion", "--head-channels", "16", "--sample-size", "64"]
    errors = check_openai(tmp_path, "carlini-imagenet-guided-diffusion", args, 64)
    assert set(errors) == {"x_t", "model_out", "denoised"}
    print(f"guided-diffusion: max |error| {errors}")


def check_ddpm(fid: str, denoiser: Path, tmp_path: Path) -> None:
    fix = fixture(fid)
    ref = reference(fix)
    sigmas = sorted({round(float(s), 6) for s in ref["mixed/sigma"]} | {0.25})
    experts = register(tmp_path, denoiser, sigmas, 32)
    tol = {"unet_out": fix["tolerance"]["unet_out"], "denoised": fix["tolerance"]["denoised"]}
    errors: dict[str, float] = {}
    for prefix in ("mixed", "sigma0.25"):  # per-image sigma: the expert at each image's sigma
        pairs = zip(ref[f"{prefix}/sigma"], ref[f"{prefix}/t"], strict=True)
        for i, (sigma, t) in enumerate(pairs):
            one = {f"p/{k.split('/', 1)[1]}": v[i : i + 1] for k, v in ref.items()
                   if k.startswith(f"{prefix}/")}  # fmt: skip
            expert = experts[round(float(sigma), 6)]
            check_denoiser(expert, ref["x"][i : i + 1], one, "p", int(t), tol, errors)
    assert ref["mixed/t"].tolist() == fix["reference"]["t_star"]["mixed"]
    print(f"{fid}: max |error| {errors}")


def test_ddpm_cifar10_main_safetensors_is_used_as_is(tmp_path):
    main = COMPAT / "ddpm-cifar10-32" / "rev-main-safetensors"
    check_ddpm("ddpm-cifar10-32-main", main, tmp_path)


def test_ddpm_cifar10_2022_bin_converts_with_the_printed_hint(tmp_path, capsys, monkeypatch):
    rev2022 = COMPAT / "ddpm-cifar10-32" / "rev-2022-bin"
    ws = tmp_path / "ws"
    assert run(["init", str(ws)]) == 0
    classifier = helpers.small_cnn_expert(0, num_classes=10, in_chans=3, input_size=32)
    classifier.save_pretrained(tmp_path / "classifier")
    capsys.readouterr()
    argv = ["add-expert", "--denoiser", str(rev2022), "--classifier", str(tmp_path / "classifier")]
    assert run([*argv, "--sigma", "0.25", "-w", str(ws)]) == 1
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.bin" in err and "convert-denoiser" in err
    hint = re.search(r"`(router convert-denoiser [^`]+)`", err).group(1)
    monkeypatch.chdir(tmp_path)  # the hint writes its folder where the user is
    assert run(shlex.split(hint)[1:]) == 0
    out = tmp_path / "rev-2022-bin-safetensors"
    assert "add-expert --denoiser" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "scheduler_config.json",
    ]
    check_ddpm("ddpm-cifar10-32-rev2022", out, tmp_path / "check")


# ---- the full-size published layouts, on the meta device


def meta_state(keys: list) -> dict[str, torch.Tensor]:
    return {k[0]: torch.empty(k[1], device="meta") for k in keys}


@pytest.mark.parametrize(
    ("fid", "fmt"),
    [
        ("carlini-cifar10-improved-diffusion", "improved-diffusion"),
        ("carlini-imagenet-guided-diffusion", "guided-diffusion"),
    ],
)
def test_published_openai_layouts_map_onto_unet2dmodel(fid, fmt):
    from diffusers import UNet2DModel

    model = fixture(fid)["model"]
    state = meta_state(model["published_state_dict_keys"])
    d = cd.DEFAULTS[fmt]
    layout = cd.read_layout(state, fid)
    head = cd.head_dim(layout, d.num_heads, d.head_channels)
    assert head == 64  # improved: 256 channels / 4 heads; guided: 64 channels per head
    config = cd.unet_config(
        layout, attention_head_dim=head, steps=d.steps, rescale=d.rescale_timesteps,
        sample_size=d.sample_size,
    )  # fmt: skip
    mapped = cd.map_state_dict(state, layout, head)
    with torch.device("meta"):
        unet = UNet2DModel(**config)
        if d.rescale_timesteps:
            mapped["time_proj.weight"] = torch.empty(d.steps, layout.model_channels)
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == want
    table = d.steps * layout.model_channels if d.rescale_timesteps else 0
    assert sum(v.numel() for v in unet.state_dict().values()) - table == model["published_n_params"]


def test_published_ddpm_cifar10_layout_renames_onto_unet2dmodel():
    from diffusers import UNet2DModel

    fix = fixture("ddpm-cifar10-32-rev2022")
    config = json.loads((COMPAT / "ddpm-cifar10-32/rev-2022-bin/config.json").read_text())
    config["block_out_channels"] = [128, 256, 256, 256]  # as published
    with torch.device("meta"):
        unet = UNet2DModel.from_config(config)
    state = cd.rename_old_attention(meta_state(fix["model"]["published_state_dict_keys"]))
    want = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == want


def test_guided_diffusion_expert_reproduces_carlinis_logits(tmp_path):
    """End to end: the denoised expert with Carlini et al.'s ImageNet classifier (the timm BEiT
    stand-in, wrapped as an rsrouter classifier) gives DiffusionRobustModel.forward's logits:
    the t* rule, the denoiser, the bicubic-antialias resize (the default) and mean/std 0.5."""
    from safetensors.torch import load_file

    from rsrouter.experts.nets import build_classifier

    beit = json.loads((COMPAT / "carlini-imagenet-beit-timm" / "config.json").read_text())
    args = {k: v for k, v in beit["model_args"].items() if k not in ("num_classes", "in_chans")}
    net = build_classifier(beit["architecture"], 1000, 3, **args)
    net.load_state_dict(load_file(COMPAT / "carlini-imagenet-beit-timm" / "model.safetensors"))
    clean = Expert.from_module(
        net, sigma=0, arch=beit["architecture"], arch_args=args, num_classes=1000, in_chans=3,
        input_size=512, mean=[0.5] * 3, std=[0.5] * 3,
    )  # fmt: skip
    clean.save_pretrained(tmp_path / "beit")
    fix = fixture("carlini-imagenet-guided-diffusion")
    ref = reference(fix)
    checkpoint = COMPAT / fix["files"][0]["path"]
    out = tmp_path / "denoiser"
    args = ["--format", "guided-diffusion", "--head-channels", "16", "--sample-size", "64"]
    assert run(["convert-denoiser", str(checkpoint), str(out), *args]) == 0
    ws = tmp_path / "ws"
    assert run(["init", str(ws)]) == 0
    argv = ["add-expert", "--denoiser", str(out), "--classifier", str(tmp_path / "beit")]
    assert run([*argv, "--sigma", "0.5", "--name", "dds", "-w", str(ws)]) == 0
    expert = Workspace.open(ws).load_expert("dds-sigma0.5")
    assert expert.config.resize_mode == "bicubic-antialias"
    x_noisy = ref["x_u8"].float() / 255 + ref["sigma0.5/delta"]
    with torch.no_grad():
        logits = expert(x_noisy)
        bilinear = expert.classifier(
            (torch.nn.functional.interpolate(expert.denoiser(x_noisy), size=(512, 512),
                                             mode="bilinear") - 0.5) / 0.5
        )  # fmt: skip
    want = ref["sigma0.5/logits"]
    err = max_err(logits, want)
    print(f"guided-diffusion + BEiT logits: max |error| {err:.2e}")
    assert torch.allclose(logits, want, **fix["tolerance"]["logits"]), err
    assert max_err(bilinear, want) > 10 * fix["tolerance"]["logits"]["atol"]  # the old resize


def test_new_attention_order_is_the_same_model_with_qkv_regrouped(tmp_path):
    """guided-diffusion's use_new_attention_order keeps [q of all heads | k | v]: the legacy
    fixture with its qkv rows regrouped that way converts to the same diffusers weights."""
    from safetensors.torch import load_file

    path = COMPAT / fixture("carlini-cifar10-improved-diffusion")["files"][0]["path"]
    state = torch.load(path, map_location="cpu", weights_only=True)
    heads = 4  # every attention layer of the fixture is 64 wide: 16 channels per head
    regrouped = {
        k: v.reshape(heads, 3, 16, *v.shape[1:]).transpose(0, 1).reshape(v.shape)
        if ".qkv." in k
        else v
        for k, v in state.items()
    }
    torch.save(regrouped, tmp_path / "new.pt")
    base = ["--format", "improved-diffusion"]
    assert run(["convert-denoiser", str(path), str(tmp_path / "legacy"), *base]) == 0
    new = ["convert-denoiser", str(tmp_path / "new.pt"), str(tmp_path / "n"), *base]
    assert run([*new, "--attention-order", "new"]) == 0
    assert run([*new[:2], str(tmp_path / "wrong"), *base]) == 0  # read as legacy: other weights
    weights = "diffusion_pytorch_model.safetensors"
    a, b, c = (load_file(tmp_path / d / weights) for d in ("legacy", "n", "wrong"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_improved_diffusion_with_the_vit_reproduces_carlinis_cifar10_logits(tmp_path):
    """The paper's CIFAR-10 set-up end to end, one public command per model: the
    improved-diffusion denoiser and the transformers ViT, registered at the three sigmas, give
    DiffusionRobustModel.forward's logits (t*, rescaled timesteps, learned variance, the
    bicubic-antialias 32 -> 224 resize, mean/std 0.5)."""
    fix = fixture("carlini-cifar10-improved-diffusion")
    ref = reference(fix)
    checkpoint = COMPAT / next(f["path"] for f in fix["files"] if f["role"] != "reference")
    vit = tmp_path / "vit"
    assert run(["convert-checkpoint", str(COMPAT / "carlini-cifar10-vit-hf"), str(vit)]) == 0
    den = tmp_path / "denoiser"
    assert (
        run(["convert-denoiser", str(checkpoint), str(den), "--format", "improved-diffusion"]) == 0
    )
    ws = tmp_path / "ws"
    assert run(["init", str(ws)]) == 0
    argv = ["add-expert", "--denoiser", str(den), "--classifier", str(vit), "--name", "dds"]
    assert run([*argv, "--sigma", "0.25,0.5,1.0", "-w", str(ws)]) == 0
    loaded = Workspace.open(ws)
    for key in fix["reference"]["per_sigma"]:
        expert = loaded.load_expert(f"dds-sigma{float(key.removeprefix('sigma')):g}")
        with torch.no_grad():
            logits = expert(ref["x"] + ref[f"{key}/delta"])
        want = ref[f"{key}/logits"]
        assert torch.allclose(logits, want, **fix["tolerance"]["logits"]), (
            key,
            max_err(logits, want),
        )
