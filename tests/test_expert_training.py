"""The expert-training utility: Gaussian augmentation, consistency term, DDPM denoiser."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rsrouter.errors import UsageError
from rsrouter.experts.denoiser import OneStepDenoiser
from rsrouter.experts.nets import build_classifier
from rsrouter.experts.train import (
    DenoiserConfig,
    Normalized,
    TrainConfig,
    build_denoiser,
    consistency_loss,
    noisy_accuracy,
    train_classifier,
    train_denoiser,
)


def bars(n: int, seed: int = 0):
    """8x8 images: class 0 = bright left half, class 1 = bright right half (plus pixel noise)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.2 * torch.rand((n, 1, 8, 8), generator=g)
    images[labels == 0, :, :, :4] += 0.6
    images[labels == 1, :, :, 4:] += 0.6
    return images.clamp(0, 1), labels


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Normalized(build_classifier("small_cnn", 2, 1, width=4), (0.5,), (0.5,))


def test_consistency_loss_matches_hand_computation():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # m = 2 copies, B = 1, K = 2
    p1 = torch.softmax(logits[0, 0], 0)
    p2 = torch.softmax(logits[1, 0], 0)
    pbar = (p1 + p2) / 2
    kl = sum(float((pbar * (pbar.log() - p.log())).sum()) for p in (p1, p2)) / 2
    ent = -float((pbar * pbar.log()).sum())
    got = float(consistency_loss(logits, lam=3.0, eta=0.5))
    assert math.isclose(got, 3.0 * kl + 0.5 * ent, rel_tol=1e-5)
    same = logits[:1].repeat(2, 1, 1)  # identical copies: KL vanishes, only the entropy is left
    p = torch.softmax(same[0, 0], 0)
    assert math.isclose(
        float(consistency_loss(same, 10.0, 1.0)), -float((p * p.log()).sum()), rel_tol=1e-5
    )


@pytest.mark.parametrize("lam", [0.0, 5.0])
def test_gaussian_training_learns_under_noise_and_is_deterministic(lam):
    images, labels = bars(256)
    test_x, test_y = bars(200, seed=1)
    config = TrainConfig(sigma=0.5, epochs=4, batch_size=32, lr=1e-2, consistency_lambda=lam)
    before = noisy_accuracy(tiny_model(), test_x, test_y, 0.5)
    a, b = tiny_model(), tiny_model()
    losses = train_classifier(a, images, labels, config, progress=False)
    train_classifier(b, images, labels, config, progress=False)
    assert losses[-1] < losses[0]
    after = noisy_accuracy(a, test_x, test_y, 0.5)
    assert after > 0.85 and after > before
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    other = tiny_model()
    train_classifier(other, images, labels, TrainConfig(**{**config.to_dict(), "seed": 1}),
                     progress=False)  # fmt: skip
    assert not torch.equal(other.classifier.fc.weight, a.classifier.fc.weight)


def test_bad_configs_and_data_are_usage_errors():
    with pytest.raises(UsageError):
        TrainConfig(sigma=-0.5)
    with pytest.raises(UsageError):
        TrainConfig(sigma=0.5, epochs=0)
    with pytest.raises(UsageError):
        TrainConfig(sigma=0.5, consistency_lambda=-1)
    images, labels = bars(8)
    with pytest.raises(UsageError):
        train_classifier(tiny_model(), images, labels[:4], TrainConfig(sigma=0.5), progress=False)
    with pytest.raises(UsageError):
        build_denoiser(DenoiserConfig(block_out_channels=(8, 8, 8)), 1, 6)


def test_trained_denoiser_reduces_the_error_to_the_clean_image():
    images, _ = bars(128)
    config = DenoiserConfig(block_out_channels=(8, 16), epochs=8, batch_size=32, lr=2e-3)
    unet, scheduler = build_denoiser(config, in_chans=1, size=8)
    history = train_denoiser(unet, scheduler, images, config, progress=False)
    assert history[-1] < history[0]
    clean, _ = bars(64, seed=2)
    noisy = clean + 0.5 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        denoised = OneStepDenoiser(unet, scheduler, 0.5)(noisy)
    assert float((denoised - clean).pow(2).mean()) < 0.5 * float((noisy - clean).pow(2).mean())
