"""Small builders shared by several test files (tiny models, a ready workspace)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_unet(sample_size: int = 8, seed: int = 0):
    """A tiny random one-channel diffusers UNet2DModel (eval mode), seeded."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=(4, 8),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=2,
    )
    return unet.eval()


def fashion_workspace(root: Path):
    """Two tiny Fashion-MNIST experts and an untrained router in a fresh workspace root/ws."""
    from rsrouter.data import FASHION_MNIST_CLASSES
    from rsrouter.experts import Expert, build_classifier
    from rsrouter.registry import Workspace
    from rsrouter.router.model import RouterModel

    ws = Workspace.init(root / "ws")
    torch.manual_seed(0)
    for sigma in (0.25, 0.5):
        net = build_classifier("small_cnn", 10, 1, width=2)
        expert = Expert.from_module(
            net, sigma=sigma, arch="small_cnn", num_classes=10, in_chans=1, input_size=[28, 28],
            arch_args={"width": 2}, class_names=list(FASHION_MNIST_CLASSES),
        )  # fmt: skip
        expert.save_pretrained(root / f"e{sigma}")
        ws.add_expert(root / f"e{sigma}", sigma, name=f"gauss-{sigma}")
    experts = ws.load_experts()
    router = RouterModel.create(
        arch="small_cnn", arch_args={"width": 2}, expert_names=list(experts),
        sigmas=[e.sigma for e in experts.values()],
        fingerprints=[e.fingerprint for e in experts.values()],
        in_chans=1, input_size=[28, 28], sigma_e=0.5,
    )  # fmt: skip
    router.save_pretrained(ws.artifacts / "router")
    return ws
