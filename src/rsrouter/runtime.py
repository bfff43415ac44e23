"""Device choice, shared by every command."""

from __future__ import annotations

import torch

from rsrouter.errors import UsageError


def resolve_device(name: str | None = None) -> torch.device:
    """'auto'/None picks CUDA when present, else CPU; an unavailable device is a UsageError."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} was asked for, but no CUDA GPU is available.")
    return device
