"""Radius-table throughput (noisy samples/s) against a bare loop of forward passes.

Both sides evaluate the same expert on the same number of noisy samples (inputs x n) in batches
of the same size; the bare loop only draws noise and runs the model. ``build_tables`` also seeds
the noise per input, counts, writes atomic shards, merges them and computes the radii. Prints
both throughputs and their ratio, measured in this one run on this machine (goal: within 10%).

    python benchmarks/tables_throughput.py                  # CPU, small CNN on 1x28x28
    python benchmarks/tables_throughput.py --device cuda    # CIFAR ResNet-110 in bf16
"""

from __future__ import annotations

import argparse
import tempfile
from types import SimpleNamespace

import torch

from rsrouter.experts import Expert, build_classifier
from rsrouter.router.tables import build_tables
from rsrouter.runtime import device_name, timed


def bare_loop(model, xs, sigma, n, batch_size, device, bf16, channels_last):
    """Forward passes over n noisy copies of every input, batch_size samples at a time."""
    per = max(1, batch_size // n)
    for g in range(0, len(xs), per):
        x = xs[g : g + per]
        batch = x.unsqueeze(1) + sigma * torch.randn((len(x), n, *x.shape[1:]), device=device)
        batch = batch.flatten(0, 1)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            model(batch).argmax(1).cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", type=int, default=None)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        arch, shape, name = "cifar_resnet110", (3, 32, 32), "ResNet-110"
    else:
        arch, shape, name = "small_cnn", (1, 28, 28), "small CNN"
    torch.manual_seed(0)
    net = build_classifier(arch, 10, shape[0])
    expert = Expert.from_module(
        net, sigma=args.sigma, arch=arch, num_classes=10, in_chans=shape[0], input_size=shape[1:]
    )
    expert = expert.to(device).eval()
    if gpu:
        expert = expert.to(memory_format=torch.channels_last)
    inputs = args.inputs or (2000 if gpu else 200)
    images = torch.rand((inputs, *shape))
    data = SimpleNamespace(
        images=images, labels=torch.randint(0, 10, (inputs,)), name="random", fingerprint="bench"
    )
    xs = images.to(device)
    bf16 = gpu

    def ours():
        with tempfile.TemporaryDirectory(prefix="rsrouter-bench-") as tmp:
            build_tables(
                {"expert": expert},
                data,
                tmp,
                n=args.n,
                batch_size=args.batch_size,
                shard_size=args.shard_size,
                device=device,
                channels_last=gpu,
                progress=False,
            )

    def bare():
        bare_loop(expert, xs, args.sigma, args.n, args.batch_size, device, bf16, gpu)

    ours(), bare()  # warm-up (allocator, cudnn autotune)
    t_bare, t_ours = [], []
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both
        t_bare.append(timed(bare, device))
        t_ours.append(timed(ours, device))
    t_bare, t_ours = min(t_bare), min(t_ours)
    samples = inputs * args.n
    where = device_name(device)
    print(f"machine: {where}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"model: {name}, inputs: {inputs}, n = {args.n}, batch {args.batch_size}")
    print(f"bare forward loop: {t_bare:.3f} s ({samples / t_bare:,.0f} samples/s)")
    print(f"build_tables:      {t_ours:.3f} s ({samples / t_ours:,.0f} samples/s)")
    print(f"ratio tables / bare (time): {t_ours / t_bare:.3f}")


if __name__ == "__main__":
    main()
