"""One-step diffusion denoising (Carlini et al., 2023) with a diffusers UNet2DModel + DDPMScheduler.

x in [0, 1] with noise sigma becomes 2(x + delta) - 1 in [-1, 1] with noise 2 sigma. The timestep
t* is the first t >= 1 whose noise level sqrt(1 - abar_t) / sqrt(abar_t) reaches 2 sigma (Carlini
et al.'s certify.py: ``while real_sigma < 2 sigma: t += 1``), with abar in float64 as the original
schedules compute it; then x_t = sqrt(abar_t) (2(x + delta) - 1), eps = the first C channels of
unet(x_t, t*) (a learned-variance UNet adds C variance channels), x0 = sqrt(1 / abar_t) x_t -
sqrt(1 / abar_t - 1) eps, clipped to [-1, 1] and mapped back to [0, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from rsrouter.errors import UsageError
from rsrouter.smoothing import check_sigma


def alphas_cumprod(scheduler) -> np.ndarray:
    """abar_t in float64, from the schedule's definition (diffusers keeps only float32).

    Linear betas use numpy's linspace and the cosine schedule openai's betas_for_alpha_bar,
    exactly as improved/guided-diffusion compute them; any other schedule falls back to the
    scheduler's own (float32) values.
    """
    c = scheduler.config
    n = int(c.num_train_timesteps)
    if getattr(c, "rescale_betas_zero_snr", False):
        betas = None
    elif c.trained_betas is not None:
        betas = np.asarray(c.trained_betas, dtype=np.float64)
    elif c.beta_schedule == "linear":
        betas = np.linspace(c.beta_start, c.beta_end, n, dtype=np.float64)
    elif c.beta_schedule == "scaled_linear":
        betas = np.linspace(c.beta_start**0.5, c.beta_end**0.5, n, dtype=np.float64) ** 2
    elif c.beta_schedule == "squaredcos_cap_v2" and getattr(
        c, "alpha_transform_type", "cosine"
    ) in ("cosine", None):

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
    else:
        betas = None
    if betas is None:
        return scheduler.alphas_cumprod.double().numpy()
    return np.cumprod(1.0 - betas, axis=0)


def noise_levels(scheduler) -> torch.Tensor:
    """sqrt(1 - abar_t) / sqrt(abar_t) for every timestep (float64, increasing in t)."""
    abar = alphas_cumprod(scheduler)
    return torch.from_numpy(np.sqrt(1.0 - abar) / np.sqrt(abar))


def timestep_for_sigma(scheduler, sigma: float) -> int:
    """The first timestep t >= 1 whose noise level reaches 2 sigma (sigma in [0, 1] pixel units)."""
    levels = noise_levels(scheduler)
    target = 2 * check_sigma(sigma)
    if target > float(levels[-1]):
        raise UsageError(
            f"sigma={sigma} needs noise level {target:.3f}, beyond this schedule's maximum "
            f"{float(levels[-1]):.3f}."
        )
    return max(1, int(torch.searchsorted(levels, torch.tensor(target, dtype=levels.dtype))))


class OneStepDenoiser(nn.Module):
    """Maps a noisy [0, 1] batch at a fixed sigma to a denoised [0, 1] batch."""

    def __init__(self, unet: nn.Module, scheduler, sigma: float):
        super().__init__()
        self.unet = unet
        self.sigma = check_sigma(sigma)
        self.timestep = timestep_for_sigma(scheduler, sigma)
        abar = float(alphas_cumprod(scheduler)[self.timestep])
        for name, value in (
            ("sqrt_abar", math.sqrt(abar)),
            ("sqrt_recip_abar", math.sqrt(1 / abar)),
            ("sqrt_recipm1_abar", math.sqrt(1 / abar - 1)),
        ):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    def forward(self, x_noisy: torch.Tensor) -> torch.Tensor:
        x_t = self.sqrt_abar * (2 * x_noisy - 1)
        t = torch.full((len(x_t),), self.timestep, device=x_t.device, dtype=torch.long)
        eps = self.unet(x_t, t).sample[:, : x_t.shape[1]]  # learned variance: C more channels
        x0 = self.sqrt_recip_abar * x_t - self.sqrt_recipm1_abar * eps
        return (x0.clamp(-1, 1) + 1) / 2
