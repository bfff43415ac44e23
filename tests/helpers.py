"""Small builders shared by several test files (tiny models, a ready workspace)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def small_cnn_expert(
    sigma: float,
    *,
    num_classes: int = 3,
    in_chans: int = 1,
    input_size=(8, 8),
    width: int = 2,
    seed: int | None = None,
    **fields,
):
    """A random small-CNN classifier expert at ``sigma`` (torch seeded first if ``seed``)."""
    from rsrouter.experts import Expert, build_classifier

    if seed is not None:
        torch.manual_seed(seed)
    net = build_classifier("small_cnn", num_classes, in_chans, width=width)
    return Expert.from_module(
        net, sigma=sigma, arch="small_cnn", arch_args={"width": width}, num_classes=num_classes,
        in_chans=in_chans, input_size=input_size, **fields,
    )  # fmt: skip


def val_split_workspace(root: Path, sigmas, name=lambda sigma: f"g{sigma}"):
    """A workspace of random Fashion-MNIST-shaped small-CNN experts at ``sigmas`` with a val
    split of 30 and tiny certify / tune sizes."""
    from rsrouter.data import FASHION_MNIST_CLASSES
    from rsrouter.registry import Workspace

    ws = Workspace.init(root / "ws")
    for sigma in sigmas:
        e = small_cnn_expert(sigma, num_classes=10, input_size=[28, 28], seed=int(sigma * 8),
                             class_names=list(FASHION_MNIST_CLASSES))  # fmt: skip
        e.save_pretrained(root / f"e{sigma}")
        ws.add_expert(root / f"e{sigma}", sigma, name=name(sigma))
    ws.update_settings("data", validation=30)
    ws.update_settings("certify", n0=8, n=32, batch_size=256, limit=6)
    ws.update_settings("tune", limit=12, bins=4)
    return ws


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> None:
    """The cache layout snapshot_download reads: refs/main → snapshots/<commit>/<files>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def tiny_unet(sample_size: int = 8, seed: int = 0, out_channels: int = 1):
    """A tiny random one-channel diffusers UNet2DModel (eval mode), seeded; ``out_channels`` 2
    for a learned-variance UNet."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=out_channels,
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
    from rsrouter.registry import Workspace
    from rsrouter.router.model import RouterModel

    ws = Workspace.init(root / "ws")
    torch.manual_seed(0)
    for sigma in (0.25, 0.5):
        expert = small_cnn_expert(
            sigma, num_classes=10, input_size=[28, 28], class_names=list(FASHION_MNIST_CLASSES)
        )
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
