"""Overhead of `rsrouter.smoothing.certify` over a bare loop of forward passes.

Both sides evaluate the same model on the same number of noisy samples (n0 + n per input) in
batches of the same size; the bare loop only draws noise and runs the model. Prints both times
and their ratio, measured in this one run on this machine.

    python benchmarks/certify_overhead.py                  # CPU, small CNN on 1x28x28
    python benchmarks/certify_overhead.py --device cuda    # CIFAR ResNet-110 in bf16
"""

from __future__ import annotations

import argparse

import torch

from rsrouter.experts import build_classifier
from rsrouter.runtime import device_name, timed
from rsrouter.smoothing import certify


def bare_loop(model, xs, sigma, total, batch_size, device, bf16):
    for x in xs:
        done = 0
        while done < total:
            m = min(batch_size, total - done)
            batch = x.unsqueeze(0) + sigma * torch.randn((m, *x.shape), device=device)
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                model(batch).argmax(1)
            done += m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", type=int, default=None)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--sigma", type=float, default=0.5)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        model, shape, name = build_classifier("cifar_resnet110", 10, 3), (3, 32, 32), "ResNet-110"
        model = model.to(device, memory_format=torch.channels_last)
    else:
        model, shape, name = build_classifier("small_cnn", 10, 1), (1, 28, 28), "small CNN"
    model = model.to(device).eval()
    inputs = args.inputs or (20 if gpu else 4)
    xs = torch.rand((inputs, *shape), device=device)
    total = args.n0 + args.n
    bf16 = gpu

    def ours():
        for i, x in enumerate(xs):
            certify(
                model,
                x,
                args.sigma,
                n0=args.n0,
                n=args.n,
                alpha=0.001,
                batch_size=args.batch_size,
                seed=0,
                indices=[i],
                device=device,
                bf16=bf16,
                channels_last=gpu,
            )

    def bare():
        bare_loop(model, xs, args.sigma, total, args.batch_size, device, bf16)

    ours(), bare()  # warm-up (allocator, cudnn autotune)
    t_bare = min(timed(bare, device) for _ in range(3))
    t_ours = min(timed(ours, device) for _ in range(3))
    where = device_name(device)
    print(f"machine: {where}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {name}, inputs: {inputs}, n0 + n = {total}, batch {args.batch_size}")
    print(f"bare forward loop: {t_bare:.3f} s ({inputs * total / t_bare:,.0f} samples/s)")
    print(f"certify:           {t_ours:.3f} s ({inputs * total / t_ours:,.0f} samples/s)")
    print(f"ratio certify / bare: {t_ours / t_bare:.3f}")


if __name__ == "__main__":
    main()
