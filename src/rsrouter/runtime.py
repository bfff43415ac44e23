"""Device choice and timing, shared by every command and the benchmarks."""

from __future__ import annotations

import platform
import time

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


def timed(fn, device: torch.device, cpu_clock=time.perf_counter) -> float:
    """Seconds one call of fn takes; on CUDA wall time between two synchronizations, on CPU
    `cpu_clock` (wall by default; `time.process_time` to count only this process's CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start
    start = cpu_clock()
    fn()
    return cpu_clock() - start


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's as the platform reports it: for benchmark reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"
