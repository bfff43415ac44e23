"""Dual vs standard certification time: same inputs, same experts, one run, rsrouter's own classes.

The experts are denoised experts as `router add-expert` builds them (`rsrouter.experts.Expert`:
a diffusers UNet2DModel one-step denoiser, resize, classifier), one per sigma in {0.25, 0.5,
1.0}, sharing the UNet and classifier. Standard certification is CERTIFY of the routed expert
(n0 + n draws). Dual certification is `DualSmoothed.certify_batch`: CERTIFY of the router at
sigma_e = 1.0 (n0 + n draws), then CERTIFY of the expert it picks, with two routers
(`rsrouter.router.model.RouterModel`):

- lightweight: a small CNN that sees x + delta (no denoiser);
- denoised: the experts' UNet at sigma_e, then a small classifier (the paper's router).

Random weights (time does not depend on them); the router's head is biased so that every input
is routed (an abstaining router would skip the expert and flatter the ratio). Also printed:
the per-sample forward cost of each router relative to the expert (the cost ratio chosen).

    python benchmarks/dual_overhead.py                 # CPU, tiny shapes (about a minute)
    python benchmarks/dual_overhead.py --device cuda   # CIFAR-10 shapes: 36M UNet + ViT-B/16

Every figure printed is measured in this run on this machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDPMScheduler, UNet2DModel

from rsrouter.composition import DualSmoothed
from rsrouter.experts import Expert, ExpertConfig, build_classifier, count_parameters
from rsrouter.router.model import RouterModel
from rsrouter.runtime import device_name, resolve_device, timed
from rsrouter.smoothing import certify_batch

SIGMAS = (0.25, 0.5, 1.0)
ROUTED = 1  # every input goes to the sigma = 0.5 expert
# on CPU this process's CPU seconds (one thread), which other jobs on a shared machine do not
# inflate; on CUDA wall seconds
CPU_CLOCK = time.process_time

CPU = {  # tiny, with the GPU setup's proportions: the classifier costs more than the UNet
    "unet": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ),
    "classifier": ("cifar_resnet20", {}, 64),
    "light": ("small_cnn", {"width": 8}),
    "denoised": ("small_cnn", {"width": 8}),
    "inputs": 2,
    "n0": 20,
    "n": 200,
    "batch_size": 110,
}
GPU = {
    "unet": dict(  # the google/ddpm-cifar10-32 configuration (35.7M parameters)
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ),
    "classifier": ("vit_base_patch16_224", {}, 224),
    "light": ("small_cnn", {"width": 32}),
    "denoised": ("cifar_resnet20", {}),
    "inputs": 4,
    "n0": 100,
    "n": 10_000,
    "batch_size": 1000,
}


def route_everything_to(router: RouterModel, expert: int) -> None:
    """Bias the router's last linear layer so it always picks ``expert``."""
    head = [m for m in router.classifier.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias.zero_()
        head.bias[expert] = 50.0


def build(cfg: dict, device: torch.device):
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, **cfg["unet"])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    arch, arch_args, size = cfg["classifier"]
    classifier = build_classifier(arch, 10, 3, **arch_args)
    base = ExpertConfig(
        kind="classifier", sigma=None, arch=arch, num_classes=10, in_chans=3,
        input_size=[size, size], arch_args=arch_args, mean=[0.5] * 3, std=[0.5] * 3,
    )  # fmt: skip
    experts = [
        Expert.from_parts(base, classifier, unet, scheduler, sigma=s).to(device).eval()
        for s in SIGMAS
    ]
    common = dict(
        expert_names=[f"denoised-{s:g}" for s in SIGMAS], sigmas=list(SIGMAS),
        fingerprints=[f"bench-{s:g}" for s in SIGMAS], in_chans=3, input_size=[32, 32],
        sigma_e=max(SIGMAS),
    )  # fmt: skip
    light = RouterModel.create(arch=cfg["light"][0], arch_args=cfg["light"][1], **common)
    denoised = RouterModel.create(
        arch=cfg["denoised"][0], arch_args=cfg["denoised"][1], unet=unet, scheduler=scheduler,
        **common,
    )  # fmt: skip
    for router in (light, denoised):
        route_everything_to(router, ROUTED)
        router.to(device).eval()
    params = {
        "UNet2DModel": count_parameters(unet),
        f"expert classifier ({arch} at {size})": count_parameters(classifier),
        f"light router ({cfg['light'][0]})": count_parameters(light.classifier),
        f"denoised router classifier ({cfg['denoised'][0]})": count_parameters(denoised.classifier),
    }
    return experts, light, denoised, params


def forward_cost(model, shape, batch: int, device, bf16: bool, repeats: int = 3) -> float:
    """Seconds per sample of one forward pass on a batch of noisy inputs (min of repeats)."""
    x = torch.rand((batch, *shape), device=device)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            model(x)

    run()
    return min(timed(run, device, CPU_CLOCK) for _ in range(repeats)) / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--inputs", type=int, default=None)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--n0", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats; the minimum counts")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU time is timed)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    cfg = GPU if gpu else CPU
    inputs, n0, n = args.inputs or cfg["inputs"], args.n0 or cfg["n0"], args.n or cfg["n"]
    batch_size = args.batch_size or cfg["batch_size"]
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    experts, light, denoised, params = build(cfg, device)
    routed = experts[ROUTED]
    xs = torch.rand((inputs, 3, 32, 32), generator=torch.Generator().manual_seed(1)).to(device)
    sampling = dict(batch_size=batch_size, device=device, bf16=gpu, seed=0)
    kw = dict(n0=n0, n=n, alpha=0.001, indices=list(range(inputs)), **sampling)
    duals = {"lightweight": DualSmoothed(light, 1.0, experts),
             "denoised": DualSmoothed(denoised, 1.0, experts)}  # fmt: skip

    def standard():
        certify_batch(routed, xs, routed.sigma, **kw)

    runs = {"standard": standard}
    for name, dual in duals.items():
        runs[name] = lambda dual=dual: dual.certify_batch(xs, **kw)
        runs[f"{name} router pass"] = lambda dual=dual: dual.router_counts(
            xs, n0=n0, n=n, indices=kw["indices"], **sampling
        )
    warm = dict(kw, n0=min(n0, 8), n=min(n, batch_size))
    certify_batch(routed, xs, routed.sigma, **warm)
    for dual in duals.values():
        assert all(c.expert == ROUTED for c in dual.certify_batch(xs, **warm))
    # interleave the repeats so that drift in machine load hits every method alike
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device, CPU_CLOCK) / inputs)
    seconds = {name: min(t) for name, t in times.items()}
    shape = (3, 32, 32)
    cost = {
        name: forward_cost(model, shape, batch_size, device, gpu)
        for name, model in (("expert", routed), ("lightweight", light), ("denoised", denoised))
    }

    where = device_name(device)
    print("# Dual vs standard certification time (rsrouter.DualSmoothed, random weights)\n")
    clock = "wall time" if gpu else "CPU time of this process"
    print(f"machine: {where}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"timed: {clock}")  # fmt: skip
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items()))
    print(f"{inputs} inputs, n0 = {n0}, n = {n}, batch {batch_size}, bf16 {gpu}\n")
    print("forward cost per sample, relative to the expert (denoise + classify):")
    for name in ("lightweight", "denoised"):
        print(f"  {name} router: {cost[name] / cost['expert']:.3f} x the expert's")
    print()
    print("| certification | s / input | ratio to standard | goal |")
    print("|---|---|---|---|")
    print(f"| standard (routed expert only) | {seconds['standard']:.3f} | 1.000 | |")
    goals = {"lightweight": 1.05, "denoised": 1.65}
    for name, goal in goals.items():
        ratio = seconds[name] / seconds["standard"]
        verdict = "met" if ratio <= goal else "missed"
        alone = seconds[f"{name} router pass"]
        print(f"| dual, {name} router | {seconds[name]:.3f} | {ratio:.3f} | "
              f"<= {goal} ({verdict}) |")  # fmt: skip
        print(f"| {name} router pass alone | {alone:.3f} | "
              f"{alone / seconds['standard']:.3f} | |")  # fmt: skip
    spread = max(max(t) / min(t) for t in times.values())
    print(f"\nmin of {args.repeats} interleaved repeats; largest max/min spread of a row: "
          f"{spread:.3f} (timing noise of this machine)")  # fmt: skip
    print("\nthe paper (RTX 4090, n = 10k, denoised router): 22.58 / 14.07 s = 1.60x")


if __name__ == "__main__":
    main()
