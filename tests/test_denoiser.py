"""The denoised expert: the timestep matches 2σ, and a briefly trained UNet really denoises."""

from __future__ import annotations

import pytest
import torch

import helpers
from helpers import small_cnn_expert
from rsrouter.data import load_dataset
from rsrouter.errors import UsageError
from rsrouter.experts import Expert
from rsrouter.experts.denoiser import noise_levels, timestep_for_sigma
from rsrouter.experts.expert import load_denoiser
from rsrouter.experts.train import DenoiserConfig, build_denoiser, train_denoiser


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def denoised_expert(unet, scheduler, sigma: float) -> Expert:
    clean = small_cnn_expert(0, num_classes=10, input_size=28)
    return Expert.from_parts(clean.config, clean.classifier, unet, scheduler, sigma=sigma)


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_timestep_noise_level_matches_two_sigma(sigma):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    levels = noise_levels(scheduler)
    t = timestep_for_sigma(scheduler, sigma)
    # the first timestep whose level reaches 2σ: within one step of the schedule
    assert levels[t] >= 2 * sigma > levels[t - 1]
    assert float(levels[t] - 2 * sigma) <= float(levels[t] - levels[t - 1])
    unet, _ = build_denoiser(DenoiserConfig(block_out_channels=(4, 8)), 1, 28)
    assert denoised_expert(unet, scheduler, sigma).denoiser.timestep == t


def test_sigma_beyond_the_schedule_is_refused():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=10)  # a short schedule tops out early
    with pytest.raises(UsageError, match="beyond this schedule's maximum"):
        timestep_for_sigma(scheduler, 50.0)


@pytest.fixture
def one_thread():
    """Small convolutions run faster on one thread than contended on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_few_training_steps_on_real_images_make_it_denoise(one_thread):
    torch.manual_seed(0)
    train = load_dataset("fashion-mnist-subset", "train").images[:256]
    clean = load_dataset("fashion-mnist-subset", "test").images[:64]
    sigma = 0.5
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    config = DenoiserConfig(block_out_channels=(8, 16), epochs=2, batch_size=32, lr=2e-3)
    unet, scheduler = build_denoiser(config, 1, 28)

    def error() -> float:
        expert = denoised_expert(unet, scheduler, sigma).eval()
        with torch.no_grad():
            return float(((expert.denoiser(noisy) - clean) ** 2).mean())

    untrained = error()
    train_denoiser(unet, scheduler, train, config, progress=False)
    trained = error()
    baseline = float(((noisy.clamp(0, 1) - clean) ** 2).mean())  # clipping alone helps too
    assert trained < 0.7 * baseline and trained < 0.7 * untrained


def test_the_timestep_is_at_least_one():
    from diffusers import DDPMScheduler

    # certify.py starts at t = 1 even where abar_0 already reaches 2 sigma
    assert timestep_for_sigma(DDPMScheduler(num_train_timesteps=1000), 1e-4) == 1


def test_a_learned_variance_unet_denoises_with_its_first_channels():

    classifier = helpers.small_cnn_expert(0, input_size=8)
    scheduler = ddpm_scheduler()
    unet = helpers.tiny_unet(out_channels=2)  # epsilon + learned variance
    expert = Expert.from_parts(classifier.config, classifier.classifier, unet, scheduler, sigma=0.5)
    x = torch.rand(2, 1, 8, 8)
    den = expert.denoiser
    with torch.no_grad():
        x_t = den.sqrt_abar * (2 * x - 1)
        eps = unet(x_t, torch.full((2,), den.timestep)).sample[:, :1]
        want = ((x_t - (1 - den.sqrt_abar**2).sqrt() * eps) / den.sqrt_abar).clamp(-1, 1) / 2 + 0.5
        assert torch.allclose(den(x), want, atol=1e-5)
    with pytest.raises(UsageError, match="returns 3; a denoiser returns epsilon \\(1\\)"):
        Expert.from_parts(
            classifier.config,
            classifier.classifier,
            helpers.tiny_unet(out_channels=3),
            scheduler,
            sigma=0.5,
        )


def test_resize_mode_is_in_the_config_and_old_configs_keep_bilinear(tmp_path):
    import json

    from torch.nn import functional as F

    classifier = helpers.small_cnn_expert(0, input_size=16)  # the denoised 8x8 image is resized
    unet, scheduler = helpers.tiny_unet(), ddpm_scheduler()
    expert = Expert.from_parts(classifier.config, classifier.classifier, unet, scheduler, sigma=0.5)
    assert expert.config.resize_mode == "bicubic-antialias"  # Carlini et al.'s
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        up = F.interpolate(expert.denoiser(x), size=(16, 16), mode="bicubic", antialias=True)
        assert torch.allclose(expert(x), expert.classifier(up), atol=1e-6)
    folder = expert.save_pretrained(tmp_path / "new")
    assert json.loads((folder / "config.json").read_text())["resize_mode"] == "bicubic-antialias"
    # an expert folder written before the field existed was computed with bilinear: it keeps
    # that, and the fingerprint it had (routers and bundles pin fingerprints)
    old = Expert.from_parts(
        classifier.config, classifier.classifier, unet, scheduler, sigma=0.5, resize_mode="bilinear"
    )
    assert "resize_mode" not in old.config.functional()
    assert old.fingerprint != expert.fingerprint
    old_folder = old.save_pretrained(tmp_path / "old")
    config = json.loads((old_folder / "config.json").read_text())
    del config["resize_mode"]
    (old_folder / "config.json").write_text(json.dumps(config))
    loaded = Expert.from_pretrained(old_folder)
    assert loaded.config.resize_mode == "bilinear" and loaded.fingerprint == old.fingerprint
    with torch.no_grad():
        up = F.interpolate(loaded.denoiser(x), size=(16, 16), mode="bilinear", align_corners=False)
        assert torch.allclose(loaded(x), loaded.classifier(up), atol=1e-6)
    config["resize_mode"] = "lanczos"
    (old_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="resize_mode must be one of bicubic-antialias"):
        Expert.from_pretrained(old_folder)


def test_add_expert_records_the_resize_mode(tmp_path, capsys):
    from rsrouter.cli.main import run
    from rsrouter.registry import Workspace

    classifier = helpers.small_cnn_expert(0, input_size=16)
    classifier.save_pretrained(tmp_path / "c")
    helpers.tiny_unet().save_pretrained(tmp_path / "d", safe_serialization=True)
    ddpm_scheduler().save_pretrained(tmp_path / "d")
    ws = Workspace.init(tmp_path / "ws")
    ws.add_expert(tmp_path / "c", [0.5], denoiser=tmp_path / "d", name="a")
    ws.add_expert(tmp_path / "c", [0.5], denoiser=tmp_path / "d", name="b", resize_mode="bilinear")
    toml = (tmp_path / "ws" / "router.toml").read_text()
    assert 'resize_mode = "bicubic-antialias"' in toml and 'resize_mode = "bilinear"' in toml
    experts = ws.load_experts()
    assert experts["a-sigma0.5"].config.resize_mode == "bicubic-antialias"
    assert experts["b-sigma0.5"].config.resize_mode == "bilinear"
    # an entry written before the option existed: computed with bilinear, and keeps it
    (tmp_path / "ws" / "router.toml").write_text(
        toml.replace('resize_mode = "bicubic-antialias"\n', "", 1)
    )
    ws = Workspace.open(tmp_path / "ws")
    assert ws.load_expert("a-sigma0.5").config.resize_mode == "bilinear"
    argv = ["add-expert", str(tmp_path / "c"), "--sigma", "0.25", "-w", str(tmp_path / "ws")]
    assert run([*argv, "--resize-mode", "bicubic"]) == 1
    assert "--resize-mode goes with --denoiser" in capsys.readouterr().err
    argv += ["--denoiser", str(tmp_path / "d"), "--resize-mode", "cubic"]
    assert run(argv) == 1
    assert "--resize-mode must be one of" in capsys.readouterr().err


def test_convert_denoiser_refusals_are_one_sentence(tmp_path, capsys):
    from rsrouter.cli.main import run

    unet = helpers.tiny_unet()
    src = tmp_path / "bin"
    unet.save_pretrained(src, safe_serialization=False)  # diffusion_pytorch_model.bin
    ddpm_scheduler().save_pretrained(src)
    assert not (src / "diffusion_pytorch_model.safetensors").exists()
    assert run(["convert-denoiser", str(src), str(tmp_path / "out"), "--format", "diffusers"]) == 0
    loaded, _ = load_denoiser(tmp_path / "out")
    x = torch.rand(1, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x, 3).sample, unet(x, 3).sample, atol=1e-6)
    capsys.readouterr()
    (tmp_path / "junk.pt").write_bytes(b"junk")
    torch.save({"w": torch.zeros(2)}, tmp_path / "other.pt")
    cases = {
        (str(src), str(tmp_path / "out"), "--format", "diffusers"): "already exists",
        ("x.pt", "o", "--format", "nope"): "--format must be one of diffusers",
        (str(src), "o", "--format", "diffusers", "--steps", "10"): "--steps is for the openai",
        (str(tmp_path / "junk.pt"), "o", "--format", "improved-diffusion"): "not a PyTorch",
        (str(tmp_path / "other.pt"), "o", "--format", "guided-diffusion"): "not an openai",
        (str(tmp_path / "nothing"), "o", "--format", "diffusers"): "neither a folder nor a Hub",
    }
    for argv, message in cases.items():
        assert run(["convert-denoiser", *argv]) == 1, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
