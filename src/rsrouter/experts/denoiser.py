"""One-step diffusion denoising (Carlini et al., 2023) with a diffusers UNet2DModel + DDPMScheduler.

x in [0, 1] with noise sigma becomes 2(x + delta) - 1 in [-1, 1] with noise 2 sigma. The timestep
t* is the first whose noise level sqrt((1 - abar_t) / abar_t) reaches 2 sigma; then
x_t = sqrt(abar_t) (2(x + delta) - 1), eps = unet(x_t, t*), x0 = (x_t - sqrt(1 - abar_t) eps) /
sqrt(abar_t), clipped to [-1, 1] and mapped back to [0, 1].
"""

from __future__ import annotations

import torch
from torch import nn

from rsrouter.errors import UsageError
from rsrouter.smoothing import check_sigma


def noise_levels(scheduler) -> torch.Tensor:
    """sqrt((1 - abar_t) / abar_t) for every timestep of a DDPM schedule (increasing in t)."""
    abar = scheduler.alphas_cumprod.double()
    return ((1 - abar) / abar).sqrt()


def timestep_for_sigma(scheduler, sigma: float) -> int:
    """The first timestep whose noise level reaches 2 sigma (sigma in [0, 1] pixel units)."""
    levels = noise_levels(scheduler)
    target = 2 * check_sigma(sigma)
    if target > float(levels[-1]):
        raise UsageError(
            f"sigma={sigma} needs noise level {target:.3f}, beyond this schedule's maximum "
            f"{float(levels[-1]):.3f}."
        )
    return int(torch.searchsorted(levels, torch.tensor(target, dtype=levels.dtype)))


class OneStepDenoiser(nn.Module):
    """Maps a noisy [0, 1] batch at a fixed sigma to a denoised [0, 1] batch."""

    def __init__(self, unet: nn.Module, scheduler, sigma: float):
        super().__init__()
        self.unet = unet
        self.sigma = check_sigma(sigma)
        self.timestep = timestep_for_sigma(scheduler, sigma)
        abar = float(scheduler.alphas_cumprod[self.timestep])
        self.register_buffer("sqrt_abar", torch.tensor(abar**0.5), persistent=False)
        self.register_buffer(
            "sqrt_one_minus_abar", torch.tensor((1 - abar) ** 0.5), persistent=False
        )

    def forward(self, x_noisy: torch.Tensor) -> torch.Tensor:
        x_t = self.sqrt_abar * (2 * x_noisy - 1)
        t = torch.full((len(x_t),), self.timestep, device=x_t.device, dtype=torch.long)
        eps = self.unet(x_t, t).sample
        x0 = (x_t - self.sqrt_one_minus_abar * eps) / self.sqrt_abar
        return (x0.clamp(-1, 1) + 1) / 2
