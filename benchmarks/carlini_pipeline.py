"""Seconds per input of standard and dual certification on the CIFAR-10 pipeline of Carlini et al.

The pipeline is rebuilt with random weights (timing does not depend on them): a diffusers
UNet2DModel in the shape of the improved-diffusion CIFAR-10 model (32x32, channels 128-256-256-256,
3 residual blocks per level, attention at 16x16 and 8x8, about 49M parameters) denoises in one
step, the result is upsampled to 224x224 and classified by timm's ViT-B/16 (about 86M).
Standard certification is CERTIFY of that expert (n0 + n draws). Dual certification is the
paper's denoised router: CERTIFY of a router (a second denoiser pass at sigma_e + ResNet-110
over the experts), then CERTIFY of the routed expert, both through rsrouter's own code.
"Bare" is the same models on the same number of noisy samples in the same batches, with none
of the certification machinery (no seeded streams, no counting, no bounds). Each precision
(bf16 autocast, fp32; TF32 matmuls allowed on CUDA in both) is a run of its own.

The peer row is Cohen et al.'s CERTIFY loop as the field runs it (locuslab/smoothing): one input
at a time, fp32, batches of 1,000 noisy copies, each batch's predictions counted on the host; it
runs on the standard expert, and the report gives ours / theirs.

    python benchmarks/carlini_pipeline.py --device cuda --out runs/carlini     # bf16 + fp32 + peer
    python benchmarks/carlini_pipeline.py --device cuda --compile --precision bf16 --no-peer
    python benchmarks/carlini_pipeline.py --tiny        # small configs: a CPU smoke run

The report is rewritten after every measurement, so a run stopped by a time limit keeps what it
measured.

Every figure printed is measured in this run on this machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel

from rsrouter.composition import DualSmoothed
from rsrouter.experts import Expert, ExpertConfig
from rsrouter.experts.nets import build_classifier, count_parameters
from rsrouter.io import write_json, write_text
from rsrouter.router.model import RouterModel
from rsrouter.runtime import bare_forward, device_name, resolve_device, timed
from rsrouter.smoothing import certified_radius, certify_batch

SIGMAS = (0.25, 0.5, 1.0)  # the paper's CIFAR-10 candidate set; sigma_e = max
PRECISIONS = ("bf16", "fp32")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

FULL = {
    "unet": dict(
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=64,
    ),
    "timesteps": 4000,  # improved-diffusion's cosine schedule
    "classifier": ("vit_base_patch16_224", {}),
    "classifier_size": 224,
    "router": ("cifar_resnet110", {}),
}
TINY = {
    "unet": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    "timesteps": 1000,
    "classifier": ("vit_tiny_patch16_224", {"img_size": 64}),
    "classifier_size": 64,
    "router": ("cifar_resnet20", {}),
}


def build(config: dict, device: torch.device, channels_last: bool):
    """Experts at every sigma (one shared UNet and ViT) and the denoised router, all random."""
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, **config["unet"])
    scheduler = DDPMScheduler(
        num_train_timesteps=config["timesteps"], beta_schedule="squaredcos_cap_v2"
    )
    arch, extra = config["classifier"]
    size = config["classifier_size"]
    vit = build_classifier(arch, 10, 3, **extra)
    half = [0.5, 0.5, 0.5]
    classifier_config = ExpertConfig(
        kind="classifier", sigma=None, arch=arch, num_classes=10, in_chans=3,
        input_size=[size, size], arch_args=extra, mean=half, std=half,
    )  # fmt: skip
    first = Expert.from_parts(classifier_config, vit, unet, scheduler, sigma=SIGMAS[0])
    experts = [first, *(first.with_sigma(s) for s in SIGMAS[1:])]
    arch, extra = config["router"]
    router = RouterModel(
        arch=arch, arch_args=extra, expert_names=[f"sigma-{s}" for s in SIGMAS], sigmas=SIGMAS,
        fingerprints=[f"unsaved-random-weights-{s}" for s in SIGMAS], in_chans=3,
        input_size=[32, 32], mean=CIFAR_MEAN, std=CIFAR_STD, sigma_e=max(SIGMAS),
        unet=unet, scheduler=scheduler,
    )  # fmt: skip
    with torch.no_grad():  # random weights route anywhere; make every input go to one expert
        router.classifier.fc.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    memory = torch.channels_last if channels_last else torch.contiguous_format
    for model in (*experts, router):
        model.to(device, memory_format=memory).eval()
    params = {
        "denoiser (UNet2DModel)": count_parameters(unet),
        f"classifier ({config['classifier'][0]})": count_parameters(vit),
        f"router ({config['router'][0]})": count_parameters(router.classifier),
    }
    return experts, router, params


def bare(models_sigmas, xs, n0: int, n: int, batch_size: int, bf16: bool, channels_last: bool):
    """The same forward passes as certification: noise, model, argmax; nothing else."""
    for x in xs:
        for model, sigma in models_sigmas:
            for total in (n0, n):
                bare_forward(model, x, sigma, total, batch_size, bf16=bf16,
                             channels_last=channels_last)  # fmt: skip


def peer_counts(model, x, sigma: float, num: int, batch_size: int, classes: int) -> np.ndarray:
    """Cohen et al.'s sampling loop as the field runs it (locuslab/smoothing, ``_sample_noise``):
    one input, fp32, the input repeated into a batch, ``randn_like`` noise, and each batch's
    predictions copied to the host and counted there."""
    counts = np.zeros(classes, dtype=np.int64)
    with torch.no_grad():
        while num > 0:
            size = min(batch_size, num)
            num -= size
            batch = x.repeat((size, 1, 1, 1))
            predictions = model(batch + torch.randn_like(batch) * sigma).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=classes)
    return counts


def peer_certify(model, xs, sigma, n0, n, alpha, batch_size, classes):
    """Their CERTIFY, input by input: the top class of n0 draws, its Clopper-Pearson radius from
    n more (the statistics are the core's: only the sampling loop is theirs); (class or -1,
    radius) per input."""
    out = []
    for x in xs:
        top = int(peer_counts(model, x, sigma, n0, batch_size, classes).argmax())
        count = peer_counts(model, x, sigma, n, batch_size, classes)[top]
        radius = certified_radius(int(count), n, sigma, alpha)  # 0 where the bound is <= 1/2
        out.append((top, radius) if radius > 0 else (-1, 0.0))
    return out


def profile(fn, gpu: bool, rows: int = 25) -> str:
    """torch.profiler over one call of fn: the top operators by (device, else CPU) time, then the
    host syncs, copies and noise draws among them, with their call counts."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profiler(activities=activities) as prof:
        fn()
        if gpu:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_cuda_time_total" if gpu else "self_cpu_time_total"
    watch = ("synchronize", "memcpy", "copy_", "randn", "item", "_local_scalar_dense", "nonzero")
    lines = [
        "# Profile of one standard certification (torch.profiler)",
        "",
        events.table(sort_by=key, row_limit=rows),
        "Host syncs, copies and noise draws (calls, CPU total us):",
    ]
    for e in events:
        if any(w in e.key.lower() for w in watch):
            lines.append(f"  {e.key}: {e.count} calls, {e.cpu_time_total:.0f} us")
    return "\n".join(lines) + "\n"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="small models and n: a CPU smoke run")
    parser.add_argument("--inputs", type=int, default=None, help="default 1 (tiny: 2)")
    parser.add_argument("--n", type=int, default=None, help="default 10000 (tiny: 32)")
    parser.add_argument("--n0", type=int, default=None, help="default 100 (tiny: 8)")
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="default 1000 (tiny: 40): certification draws 1,000 noisy copies per block, so the "
        "bare loop's batches then have the same shapes (one compilation each under --compile)",
    )
    parser.add_argument(
        "--precision",
        action="append",
        choices=PRECISIONS,
        help="bf16 (autocast) and/or fp32, each a run of its own (default: both on CUDA, fp32 "
        "on the CPU)",
    )
    parser.add_argument(
        "--peer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time Cohen et al.'s loop (fp32, one input at a time, batches of "
        "--peer-batch, counts on the host) on the standard expert",
    )
    parser.add_argument("--peer-batch", type=int, default=None, help="default 1000 (tiny: 40)")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels_last memory format (default: on for CUDA)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and ViT")
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode: default, max-autotune, reduce-overhead (CUDA graphs)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats; the minimum counts")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the timings, profile one standard certification (the first precision) with "
        "torch.profiler: its top operators, host syncs and copies go to profile.txt in --out",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for carlini_pipeline.md/.json, rewritten after every measurement",
    )
    args = parser.parse_args(argv)
    args.n = args.n or (32 if args.tiny else 10_000)
    args.n0 = args.n0 or (8 if args.tiny else 100)
    args.inputs = args.inputs or (2 if args.tiny else 1)
    args.batch_size = args.batch_size or (40 if args.tiny else 1000)
    args.peer_batch = args.peer_batch or (40 if args.tiny else 1000)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    precisions = list(dict.fromkeys(args.precision or (PRECISIONS if gpu else ("fp32",))))
    channels_last = gpu if args.channels_last is None else args.channels_last
    torch.manual_seed(0)
    experts, router, params = build(TINY if args.tiny else FULL, device, channels_last)
    if args.compile:
        for module in (router.denoiser.unet, experts[0].classifier, router.classifier):
            module.compile(mode=args.compile_mode, dynamic=False)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    dual = DualSmoothed(router, max(SIGMAS), experts)
    routed = experts[1]  # the expert the router's bias sends every input to
    xs = torch.rand((args.inputs, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    xs = xs.to(device)
    report = {
        "machine": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if gpu else None,
        "threads": torch.get_num_threads(),
        "config": "tiny" if args.tiny else "Carlini et al. CIFAR-10 shapes",
        "parameters": params,
        "inputs": args.inputs,
        "n0": args.n0,
        "n": args.n,
        "batch_size": args.batch_size,
        "channels_last": channels_last,
        "compile": args.compile_mode if args.compile else None,
        "seconds_per_input": {},
        "peer": None,
    }

    def save():
        if args.out is not None:
            write_text(args.out / "carlini_pipeline.md", markdown(report))
            write_json(args.out / "carlini_pipeline.json", report)

    def runs_of(precision: str) -> dict:
        """name -> (certify(xs, n), the (model, sigma) pairs a bare loop runs) at a precision."""
        sampling = dict(batch_size=args.batch_size, device=device, bf16=precision == "bf16",
                        channels_last=channels_last)  # fmt: skip
        common = dict(n0=args.n0, alpha=args.alpha, seed=0, **sampling)
        return {
            "standard": (
                lambda x, n: certify_batch(
                    routed, x, routed.sigma, n=n, indices=list(range(len(x))), **common
                ),
                [(routed, routed.sigma)],
            ),
            "dual": (
                lambda x, n: dual.certify_batch(x, n=n, indices=list(range(len(x))), **common),
                [(router, dual.sigma_e), (routed, routed.sigma)],
            ),
        }

    for precision in precisions:
        bf16 = precision == "bf16"
        for name, (fn, pairs) in runs_of(precision).items():

            def bare_fn(x, n, pairs=pairs, bf16=bf16):
                bare(pairs, x, args.n0, n, args.batch_size, bf16, channels_last)

            # warm-up: the timed runs once (every batch shape: cuDNN autotuning, compilation;
            # inputs share batches, so fewer inputs would not do), reported apart
            first = timed(lambda f=fn, b=bare_fn: (f(xs, args.n), b(xs, args.n)), device)
            results: list = []
            timed_fn = lambda fn=fn, r=results: r.append(fn(xs, args.n))  # noqa: E731
            t_cert = min(timed(timed_fn, device) for _ in range(args.repeats))
            t_bare = min(
                timed(lambda b=bare_fn: b(xs, args.n), device) for _ in range(args.repeats)
            )
            if name == "dual" and any(c.expert != 1 for c in results[-1]):
                print("warning: the router did not route every input: dual time is a lower bound")
            report["seconds_per_input"][f"{name} {precision}"] = {
                "certify": t_cert / args.inputs,
                "bare": t_bare / args.inputs,
                "ratio": t_cert / t_bare,
                "warmup_s": first,
            }
            save()
            print(f"{name} {precision}: {t_cert / args.inputs:.3f} s/input", flush=True)

    if args.profile:
        text = profile(lambda: runs_of(precisions[0])["standard"][0](xs, args.n), gpu)
        if args.out is not None:
            write_text(args.out / "profile.txt", text)
        print(text, flush=True)

    if args.peer:
        peer = dict(
            sigma=routed.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
            batch_size=args.peer_batch, classes=10,
        )  # fmt: skip
        first = timed(lambda: peer_certify(routed, xs[:1], **peer), device)  # one at a time
        t_peer = min(
            timed(lambda: peer_certify(routed, xs, **peer), device) for _ in range(args.repeats)
        )
        report["peer"] = {
            "loop": "Cohen et al. (locuslab/smoothing): one input at a time, fp32, "
            f"batch {args.peer_batch}, counts on the host",
            "seconds_per_input": t_peer / args.inputs,
            "warmup_s": first,
        }
        save()
        print(f"peer (Cohen et al.'s loop, fp32): {t_peer / args.inputs:.3f} s/input", flush=True)

    print(markdown(report))
    if args.out is not None:
        print(f"wrote {args.out / 'carlini_pipeline.md'} and carlini_pipeline.json")


def markdown(r: dict) -> str:
    params = ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in r["parameters"].items())
    lines = [
        "# Certification time, CIFAR-10 pipeline of Carlini et al. (random weights)",
        "",
        f"Machine: {r['machine']}; torch {r['torch']} (CUDA {r['cuda']}); {r['config']}: {params}.",
        f"{r['inputs']} inputs, n0 = {r['n0']}, n = {r['n']}, batch {r['batch_size']}, "
        f"channels_last {r['channels_last']}, compile {r['compile']}.",
        "",
        "| certification | precision | s / input | bare forward s / input | ratio to bare |",
        "|---|---|---|---|---|",
    ]
    labels = {"standard": "standard (denoise + ViT)", "dual": "dual (denoised router + expert)"}
    for key, t in r["seconds_per_input"].items():
        name, precision = key.split()
        lines.append(
            f"| {labels[name]} | {precision} | {t['certify']:.3f} | {t['bare']:.3f} | "
            f"{t['ratio']:.3f} |"
        )
    peer = r.get("peer")
    if peer:
        t = peer["seconds_per_input"]
        lines += ["", f"Peer: {peer['loop']}: {t:.3f} s / input on the standard expert."]
        for key, ours in r["seconds_per_input"].items():
            if key.startswith("standard"):
                lines.append(
                    f"- speed-up of ours ({key.split()[1]}) over the peer loop (peer s / ours s): "
                    f"{t / ours['certify']:.2f}"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
