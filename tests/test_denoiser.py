"""The denoised expert: the timestep matches 2σ, and a briefly trained UNet really denoises."""

from __future__ import annotations

import pytest
import torch

from helpers import small_cnn_expert
from rsrouter.data import load_dataset
from rsrouter.errors import UsageError
from rsrouter.experts import Expert
from rsrouter.experts.denoiser import noise_levels, timestep_for_sigma
from rsrouter.experts.train import DenoiserConfig, build_denoiser, train_denoiser


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
