"""Classifier architectures by name: built-in small-image nets, or any timm model."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from rsrouter.errors import UsageError
from rsrouter.experts.formats import hf_vit


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (depth 6k+2: 20, 56, 110), any channel count and size."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise UsageError(f"CIFAR ResNet depth must be 6k+2 (20, 56, 110), got {depth}.")
        k = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(k):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SmallCNN(nn.Module):
    """Two conv layers and a linear head: the tiny model for CPU demos and tests."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, 1, 1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, 1, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


BUILTIN = {
    "cifar_resnet20": lambda **kw: CifarResNet(depth=20, **kw),
    "cifar_resnet56": lambda **kw: CifarResNet(depth=56, **kw),
    "cifar_resnet110": lambda **kw: CifarResNet(depth=110, **kw),
    "small_cnn": SmallCNN,
    "hf_vit": hf_vit,  # a transformers ViTForImageClassification, built as timm's ViT
}


def build_classifier(arch: str, num_classes: int, in_chans: int, **arch_args) -> nn.Module:
    """A randomly initialised classifier: a built-in name or any `timm.create_model` name.

    Arguments the architecture refuses (an unknown key, a value of the wrong type or range)
    are a UsageError, since they come from a config file or the command line."""
    if arch in BUILTIN:
        build = BUILTIN[arch]
    else:
        import timm

        if not timm.is_model(arch):
            raise UsageError(
                f"unknown architecture {arch!r}: use one of {sorted(BUILTIN)} or a timm model name."
            )
        build = functools.partial(timm.create_model, arch, pretrained=False)
    try:
        return build(num_classes=num_classes, in_chans=in_chans, **arch_args)
    except UsageError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(
            f"architecture {arch!r} cannot be built with num_classes={num_classes}, "
            f"in_chans={in_chans} and arguments {arch_args} ({str(exc).splitlines()[0][:160]})."
        ) from exc


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Per-channel normalisation, applied after the noise (inside the base model)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
