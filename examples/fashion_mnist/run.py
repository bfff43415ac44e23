"""Dual randomized smoothing on full Fashion-MNIST, sized for one GPU.

Two expert families, each in its own workspace under --out:
  gaussian/  three Gaussian-trained ResNet-20 experts (σ = 0.25, 0.5, 1.0);
  denoised/  the paper's "single pretrained classifier" mode: a small diffusers DDPM trained on
             Fashion-MNIST and one clean-trained classifier used through it at all three σ.
For each: the router (by default the project's default design, the class gate fitted on a val
split of the training images, which carries the experts' class-aware cascade, the report's
headline; --router-kind learned trains the paper's router on radius tables, n = 100), dual
certification with n = 10,000 of the first --limit test images (1,000 by default), and the
report (table, CSV, summary, PNG). Rerunning resumes. --smoke runs the same code at a tiny size
on the bundled subset, on CPU.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from rsrouter.composition.tuning import CASCADE_FITS
from rsrouter.errors import UsageError
from rsrouter.experts.train import DenoiserConfig
from rsrouter.pipeline import PipelineConfig, run_pipeline

MODES = ("gaussian", "denoised")

FULL = PipelineConfig(
    dataset="fashion-mnist",
    sigmas=(0.25, 0.5, 1.0),
    expert_arch="cifar_resnet20",
    expert_arch_args={},
    expert_epochs=30,
    expert_batch_size=256,
    expert_lr=1e-3,
    denoiser=DenoiserConfig(
        block_out_channels=(64, 128, 128), layers_per_block=2, epochs=20, batch_size=256
    ),
    table_n=100,
    table_alpha=0.001,
    table_subset=0.5,
    router_arch="cifar_resnet20",
    router_arch_args={},
    router_epochs=30,
    router_batch_size=256,
    router_lr=0.01,
    router_kind="class-gate",
    validation=1000,
    certify_limit=1000,
    n0=100,
    n=10_000,
    alpha=0.001,
    batch_size=4000,
)

# The same pipeline sized for a 2-core CPU (Gaussian family: 25 minutes): small CNN experts
# trained on all 60,000 images, tables on a 20 % subset (the paper's §E.4), 500 test images
# at n = 2,000.
CPU = replace(
    FULL,
    expert_arch="small_cnn",
    expert_arch_args={"width": 16},
    expert_epochs=5,
    expert_batch_size=128,
    expert_lr=2e-3,
    denoiser=DenoiserConfig(block_out_channels=(16, 32), epochs=2, batch_size=128),
    table_subset=0.2,
    router_arch="small_cnn",
    router_arch_args={"width": 16},
    router_epochs=30,
    router_batch_size=128,
    router_lr=1e-3,
    validation=500,
    certify_limit=500,
    n=2000,
    batch_size=2000,
    device="cpu",
)

SMOKE = replace(
    FULL,
    dataset="fashion-mnist-subset",
    train_limit=200,
    validation=16,
    expert_arch="small_cnn",
    expert_arch_args={"width": 4},
    expert_epochs=1,
    expert_batch_size=64,
    denoiser=DenoiserConfig(
        block_out_channels=(8, 16), epochs=1, batch_size=64, extra={"add_attention": False}
    ),
    table_n=16,
    table_subset=0.1,
    router_arch="small_cnn",
    router_arch_args={"width": 4},
    router_epochs=1,
    router_batch_size=32,
    certify_limit=4,
    n0=8,
    n=16,
    batch_size=256,
    device="cpu",
)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/fashion-mnist"), help="output folder")
    p.add_argument(
        "--data-root",
        help="folder with the Fashion-MNIST IDX files (ours or "
        "torchvision's FashionMNIST/raw); default: $RSROUTER_DATA",
    )
    p.add_argument("--mode", choices=(*MODES, "both"), default="both")
    p.add_argument(
        "--dataset",
        choices=("fashion-mnist", "mnist+fashion-mnist"),
        default="fashion-mnist",
        help="fashion-mnist, or MNIST digits and Fashion-MNIST items as one 20-class set "
        "(--data-root then holds both mnist/ and fashion-mnist/)",
    )
    p.add_argument(
        "--validation",
        type=int,
        help="training images held out as the val split for tuning routers "
        "(default 1000; 500 with --cpu)",
    )
    p.add_argument(
        "--router-kind",
        choices=("learned", "gate", "class-gate"),
        help="class-gate (the default: a gate fitted on the val split, no tables; it also fits "
        "the experts' cascade, the report's headline), gate, or learned (the paper's router, "
        "trained on radius tables; the default with --router-denoiser)",
    )
    p.add_argument(
        "--cascade-fit",
        choices=tuple(CASCADE_FITS),
        help="how a gate router's fit fits the experts' cascade: regret (the default), "
        "keep-multiscale (the largest sigma first at 1/2, never below Multiscale there) or plain",
    )
    p.add_argument("--limit", type=int, help="test images to certify (default 1000)")
    p.add_argument("--expert-epochs", type=int, help="epochs of each expert's training")
    p.add_argument("--table-subset", type=float, help="fraction of train rows in the tables")
    p.add_argument("--n", type=int, help="Monte-Carlo draws per certificate (default 10000)")
    p.add_argument(
        "--router-denoiser",
        action="store_true",
        help="denoised mode: put the DDPM in front of the paper's learned router (the paper's "
        "design; implies --router-kind learned)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--cpu",
        action="store_true",
        help="CPU sizes on full Fashion-MNIST (Gaussian family: 25 min on 2 cores)",
    )
    size.add_argument("--smoke", action="store_true", help="tiny sizes on the bundled subset, CPU")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def config_for(args, mode: str) -> PipelineConfig:
    base = SMOKE if args.smoke else CPU if args.cpu else FULL
    overrides = {
        "workspace": args.out / mode,
        "data_root": None if args.smoke else args.data_root,
        "expert_kind": "classifier" if mode == "gaussian" else "denoised",
        "router_denoiser": mode == "denoised" and args.router_denoiser,
        "seed": args.seed,
        "progress": not args.quiet,
    }
    if not args.smoke:
        overrides["dataset"] = args.dataset
    if overrides["router_denoiser"] and args.router_kind is None:
        overrides["router_kind"] = "learned"  # the DDPM goes in front of the learned router
    for field in ("validation", "expert_epochs", "table_subset", "router_kind", "cascade_fit"):
        if getattr(args, field) is not None:
            overrides[field] = getattr(args, field)
    if not (args.smoke or args.cpu):
        overrides["device"] = args.device
    if args.limit is not None:
        overrides["certify_limit"] = args.limit
    if args.n is not None:
        overrides["n"] = args.n
    return replace(base, **overrides)


def main(argv=None) -> int:
    args = parse(argv)
    modes = MODES if args.mode == "both" else (args.mode,)
    try:
        for mode in modes:
            print(f"== {mode} experts: workspace {args.out / mode}", flush=True)
            result = run_pipeline(config_for(args, mode), log=lambda m: print(m, flush=True))
            print(result.table_markdown)
            print(
                f"report: {result.report_dir} (plot {result.plot.name}); "
                f"seconds per step: {result.seconds}",
                flush=True,
            )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
