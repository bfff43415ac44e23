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


def bare_forward(model, x: torch.Tensor, sigma: float, total: int, batch_size: int, *,
                 bf16: bool, channels_last: bool) -> None:  # fmt: skip
    """A benchmark's plain baseline: ``total`` noisy copies of one input (C, H, W) through
    ``model``, ``batch_size`` at a time (noise, model, argmax; no seeded streams, no counting)."""
    done = 0
    while done < total:
        m = min(batch_size, total - done)
        batch = x.unsqueeze(0) + sigma * torch.randn((m, *x.shape), device=x.device)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
            model(batch).argmax(1)
        done += m


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's as the platform reports it: for benchmark reports."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


CALIBRATION_SAMPLES = 256  # noisy copies timed per model before a long job (one batch, at most)
CALIBRATION_STAGE = 99  # a noise stream of its own: the calibration never touches a result


def seconds_per_sample(
    base, x: torch.Tensor, sigma: float, *, batch_size: int, device, **sampling
) -> float:
    """A short calibration: the seconds one noisy forward pass of ``base`` takes on ``device``,
    timed on one batch of noisy copies of the input ``x`` (C, H, W) after a warm-up batch.

    Seeded in a stage of its own, so it neither draws from nor moves the global random state.
    """
    from rsrouter.smoothing import sample_counts

    device = torch.device(device) if device is not None else torch.device("cpu")
    m = max(1, min(int(batch_size), CALIBRATION_SAMPLES))
    xs = torch.as_tensor(x, dtype=torch.float32)[None]

    def batch():
        sample_counts(
            base, xs, sigma, m, seed=0, indices=[0], stage=CALIBRATION_STAGE,
            batch_size=m, device=device, **sampling,
        )  # fmt: skip

    was = getattr(base, "training", False)
    if was:  # a module in training mode would update its batch-norm statistics
        base.eval()
    try:
        batch()  # warm-up: lazy initialisation, caches, kernels
        return timed(batch, device) / m
    finally:
        if was:
            base.train()


def format_seconds(seconds: float) -> str:
    """A duration as people say it: 40 s, 12 min, 2.5 h."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
