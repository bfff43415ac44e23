"""Overhead of `rsrouter.smoothing.certify` over a bare loop of forward passes.

Both sides evaluate the same model on the same number of noisy samples (n0 + n per input) in
batches of the same size; the bare loop only draws noise and runs the model. Prints both times
and their ratio per model, measured in this one run on this machine. Small nets show per-batch
host work most, so on CUDA the default is CIFAR ResNet-20 and ResNet-110 (3x32x32, bf16,
channels_last).

    python benchmarks/certify_overhead.py                  # CPU, small CNN on 1x28x28
    python benchmarks/certify_overhead.py --device cuda    # ResNet-20 and ResNet-110 in bf16
    python benchmarks/certify_overhead.py --device cuda --arch cifar_resnet110 --out o.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rsrouter.errors import UsageError
from rsrouter.experts import build_classifier
from rsrouter.io import write_json
from rsrouter.runtime import bare_forward, device_name, resolve_device, timed
from rsrouter.smoothing import certify

SHAPES = {"small_cnn": (1, 28, 28)}  # every other architecture: CIFAR's 3x32x32


def measure(arch: str, args, device) -> dict:
    """Bare and certify seconds (the least of 3 timed runs after a warm-up) for one model."""
    gpu = device.type == "cuda"
    shape = SHAPES.get(arch, (3, 32, 32))
    model = build_classifier(arch, 10, shape[0]).to(device).eval()
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    inputs = args.inputs or (20 if gpu else 4)
    xs = torch.rand((inputs, *shape), device=device)
    total = args.n0 + args.n

    def ours():
        for i, x in enumerate(xs):
            certify(
                model, x, args.sigma, n0=args.n0, n=args.n, alpha=0.001,
                batch_size=args.batch_size, seed=0, indices=[i], device=device, bf16=gpu,
                channels_last=gpu,
            )  # fmt: skip

    def bare():
        for x in xs:
            bare_forward(model, x, args.sigma, total, args.batch_size, bf16=gpu, channels_last=gpu)

    ours(), bare()  # warm-up (allocator, cudnn autotune)
    t_bare = min(timed(bare, device) for _ in range(3))
    t_ours = min(timed(ours, device) for _ in range(3))
    return {
        "arch": arch,
        "input": list(shape),
        "inputs": inputs,
        "samples_per_input": total,
        "batch_size": args.batch_size,
        "bf16": gpu,
        "bare_s": t_bare,
        "certify_s": t_ours,
        "bare_samples_per_s": inputs * total / t_bare,
        "certify_samples_per_s": inputs * total / t_ours,
        "ratio": t_ours / t_bare,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--arch",
        action="append",
        help="model(s) to time (default: cifar_resnet20 and cifar_resnet110 on CUDA, small_cnn "
        "on the CPU)",
    )
    parser.add_argument("--inputs", type=int, default=None, help="default 20 (CPU: 4)")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--out", type=Path, help="also write every figure here as JSON")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except UsageError as exc:
        parser.error(str(exc))
    gpu = device.type == "cuda"
    archs = args.arch or (["cifar_resnet20", "cifar_resnet110"] if gpu else ["small_cnn"])
    report = {"machine": device_name(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "models": []}  # fmt: skip
    print(f"machine: {report['machine']}, torch {torch.__version__}, threads {report['threads']}")
    for arch in archs:
        try:
            r = measure(arch, args, device)
        except UsageError as exc:  # an unknown architecture, say: one sentence, exit 2
            parser.error(str(exc))
        report["models"].append(r)
        if args.out is not None:
            write_json(args.out, report)
        shape = "x".join(map(str, r["input"]))
        print(f"model: {arch} on {shape}, inputs: {r['inputs']}, n0 + n = "
              f"{r['samples_per_input']}, batch {r['batch_size']}, bf16 {r['bf16']}")  # fmt: skip
        for label, key in (("bare forward loop", "bare"), ("certify", "certify")):
            rate = r[f"{key}_samples_per_s"]
            print(f"  {label + ':':19s}{r[f'{key}_s']:.3f} s ({rate:,.0f} samples/s)")
        print(f"  ratio certify / bare: {r['ratio']:.3f}", flush=True)


if __name__ == "__main__":
    main()
