"""Training experts: Gaussian-augmented classifiers (Cohen et al. 2019), optionally with the
consistency regulariser of Jeong & Shin (2020), and small DDPM denoisers for the "denoised" kind.

Every trainer is seeded (shuffling and noise come from generators seeded by (seed, epoch)), shows
a progress bar, and takes [0, 1] images: noise is added to the [0, 1] image and normalisation
stays inside the model, so the sigma a classifier is trained at is the sigma it is smoothed at.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from rsrouter.errors import UsageError
from rsrouter.experts.denoiser import timestep_for_sigma
from rsrouter.experts.expert import Expert
from rsrouter.experts.nets import build_classifier, normalize
from rsrouter.progress import progress_bar
from rsrouter.smoothing import check_count, check_sigma


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a Gaussian-augmented classifier; recorded in the expert's config."""

    sigma: float  # training noise level; 0 = clean training (an off-the-shelf classifier)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    consistency_lambda: float = 0.0  # λ of Jeong & Shin 2020; 0 = plain Gaussian augmentation
    consistency_eta: float = 0.5  # η: weight of the entropy of the mean prediction
    noise_copies: int = 2  # m: noisy copies per image when the consistency term is on
    seed: int = 0

    def __post_init__(self):
        if self.sigma != 0:
            check_sigma(self.sigma)
        check_count("epochs", self.epochs)
        check_count("batch_size", self.batch_size)
        check_count("noise_copies", self.noise_copies)
        if self.lr <= 0 or self.weight_decay < 0:
            raise UsageError("lr must be positive and weight_decay non-negative.")
        if self.consistency_lambda < 0 or self.consistency_eta < 0:
            raise UsageError("the consistency weights lambda and eta must be non-negative.")

    def to_dict(self) -> dict:
        return asdict(self)


class Normalized(nn.Module):
    """A classifier with its per-channel normalisation in front (applied after the noise)."""

    def __init__(self, classifier: nn.Module, mean, std):
        super().__init__()
        self.classifier = classifier
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(normalize(x, self.mean, self.std))


def consistency_terms(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-input parts of Jeong & Shin's (2020) term on (m, B, K) logits of m noisy copies:
    (mean_j KL(p̄ ‖ p_j), H(p̄)), each of shape (B,)."""
    log_p = F.log_softmax(logits, dim=-1)
    p_bar = log_p.exp().mean(dim=0)
    log_p_bar = p_bar.clamp_min(1e-12).log()
    kl = (p_bar.unsqueeze(0) * (log_p_bar.unsqueeze(0) - log_p)).sum(-1).mean(0)
    entropy = -(p_bar * log_p_bar).sum(-1)
    return kl, entropy


def consistency_loss(logits: torch.Tensor, lam: float, eta: float) -> torch.Tensor:
    """λ · mean_j KL(p̄ ‖ p_j) + η · H(p̄), averaged over the batch."""
    kl, entropy = consistency_terms(logits)
    return (lam * kl + eta * entropy).mean()


def _check_data(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise UsageError(f"training images must be float (N, C, H, W), got {tuple(images.shape)}.")
    if len(images) != len(labels) or len(images) == 0:
        raise UsageError(f"{len(images)} images but {len(labels)} labels.")


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen)
    yield from order.split(batch_size)


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[float]:
    """Train ``model`` (noisy [0, 1] images → logits) in place; returns the mean loss per epoch.

    Cross-entropy on x + δ, δ ~ N(0, σ²I), averaged over m copies when the consistency term is
    on (λ > 0), plus that term. Deterministic on CPU for a given seed.
    """
    _check_data(images, labels)
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * -(-len(images) // config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    copies = config.noise_copies if config.consistency_lambda > 0 else 1
    torch.manual_seed(config.seed)  # dropout / stochastic layers, if the architecture has any
    history = []
    with progress_bar(f"train σ={config.sigma}", steps, enabled=progress) as advance:
        for epoch in range(config.epochs):
            noise_gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch + 7919)
            total, count = 0.0, 0
            for idx in _batches(len(images), config.batch_size, config.seed, epoch):
                x, y = images[idx], labels[idx]
                noise = torch.randn((copies, *x.shape), generator=noise_gen)
                noisy = (x.unsqueeze(0) + config.sigma * noise).flatten(0, 1).to(device)
                logits = model(noisy).view(copies, len(x), -1)
                y = y.to(device)
                loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(copies))
                if config.consistency_lambda > 0:
                    loss = loss + consistency_loss(
                        logits, config.consistency_lambda, config.consistency_eta
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total, count = total + loss.item() * len(x), count + len(x)
                advance(1)
            history.append(total / count)
    model.eval()
    return history


@torch.no_grad()
def noisy_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sigma: float,
    *,
    seed: int = 0,
    batch_size: int = 500,
    device: str | torch.device = "cpu",
) -> float:
    """Accuracy of the base model on one Gaussian copy of each image (a quick sanity figure)."""
    _check_data(images, labels)
    sigma = check_sigma(sigma) if sigma else 0.0
    gen = torch.Generator().manual_seed(seed)
    model.to(device).eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        noisy = x + sigma * torch.randn(x.shape, generator=gen)
        pred = model(noisy.to(device)).argmax(1).cpu()
        correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / len(images)


def train_expert(
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    arch: str = "small_cnn",
    arch_args: dict | None = None,
    mean=None,
    std=None,
    class_names: list[str] | None = None,
    dataset: str = "",
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Expert:
    """Build a classifier, train it at ``config.sigma`` and return it as an ``Expert``."""
    _check_data(images, labels)
    in_chans = images.shape[1]
    num_classes = int(labels.max()) + 1 if not class_names else len(class_names)
    mean = tuple(mean) if mean is not None else (0.5,) * in_chans
    std = tuple(std) if std is not None else (0.5,) * in_chans
    arch_args = dict(arch_args or {})
    torch.manual_seed(config.seed)  # the initial weights
    classifier = build_classifier(arch, num_classes, in_chans, **arch_args)
    train_classifier(
        Normalized(classifier, mean, std), images, labels, config, device=device, progress=progress
    )
    return Expert.from_module(
        classifier.cpu(),
        sigma=config.sigma,
        arch=arch,
        arch_args=arch_args,
        num_classes=num_classes,
        in_chans=in_chans,
        input_size=tuple(images.shape[2:]),
        mean=mean,
        std=std,
        class_names=list(class_names or []),
        dataset=dataset,
        training={"method": "gaussian-augmentation", **config.to_dict()},
    )


# ---------------------------------------------------------------- denoisers


@dataclass(frozen=True)
class DenoiserConfig:
    """A small diffusers UNet2DModel + DDPMScheduler trained on [0, 1] images."""

    block_out_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    num_train_timesteps: int = 1000
    max_sigma: float | None = 1.0  # train only the timesteps one-step denoising at ≤ this uses
    epochs: int = 10
    batch_size: int = 128
    lr: float = 2e-4
    seed: int = 0
    extra: dict = field(default_factory=dict)  # more UNet2DModel keyword arguments

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


def build_denoiser(config: DenoiserConfig, in_chans: int, size: int):
    """A randomly initialised (UNet2DModel, DDPMScheduler) pair with the diffusers defaults."""
    from diffusers import DDPMScheduler, UNet2DModel

    if size % 2 ** (len(config.block_out_channels) - 1):
        raise UsageError(
            f"image size {size} must be divisible by 2^{len(config.block_out_channels) - 1} "
            "for this UNet; pad or resize the images."
        )
    n = len(config.block_out_channels)
    torch.manual_seed(config.seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=in_chans,
        out_channels=in_chans,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        norm_num_groups=min(8, min(config.block_out_channels)),
        **config.extra,
    )
    scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps)
    return unet, scheduler


def train_denoiser(
    unet: nn.Module,
    scheduler,
    images: torch.Tensor,
    config: DenoiserConfig,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[float]:
    """DDPM ε-prediction training (Ho et al. 2020) on images mapped to [-1, 1], in place.

    With ``max_sigma``, timesteps are drawn only up to the one one-step denoising at that sigma
    uses (a small model spends its capacity where the smoothing needs it).
    """
    if images.ndim != 4 or len(images) == 0:
        raise UsageError(f"denoiser training images must be (N, C, H, W), got {images.shape}.")
    device = torch.device(device)
    unet.to(device).train()
    t_max = config.num_train_timesteps - 1
    if config.max_sigma is not None:
        t_max = min(t_max, timestep_for_sigma(scheduler, config.max_sigma) + 1)
    abar = scheduler.alphas_cumprod.to(torch.float32)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr)
    steps = config.epochs * -(-len(images) // config.batch_size)
    history = []
    with progress_bar("train denoiser", steps, enabled=progress) as advance:
        for epoch in range(config.epochs):
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch + 104729)
            total, count = 0.0, 0
            for idx in _batches(len(images), config.batch_size, config.seed, epoch):
                x0 = 2 * images[idx] - 1
                t = torch.randint(0, t_max + 1, (len(x0),), generator=gen)
                eps = torch.randn(x0.shape, generator=gen)
                a = abar[t].view(-1, 1, 1, 1)
                x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
                pred = unet(x_t.to(device), t.to(device)).sample
                loss = F.mse_loss(pred, eps.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count = total + loss.item() * len(x0), count + len(x0)
                advance(1)
            history.append(total / count)
    unet.eval()
    return history
