"""The paper's CIFAR-10 set-up: diffusion denoised smoothing experts (Carlini et al. 2023) at
Σ = {0.25, 0.5, 1.0} behind a dual-RS router, for users with internet access and a GPU.

One classifier is used at every σ through a one-step diffusion denoiser: the paper's (Carlini et
al.'s improved-diffusion cifar10_uncond_50M_500K.pt, --denoiser-format improved-diffusion,
converted once into a diffusers folder of safetensors in the workspace), or any diffusers
UNet2DModel + DDPMScheduler folder or Hub repo (by default google/ddpm-cifar10-32). The
denoised 32x32 image is resized to the classifier's input as Carlini et al. do (bicubic,
antialiased). The classifier is either an rsrouter expert folder / Hub repo trained on
clean CIFAR-10 (--classifier), or a timm architecture plus a safetensors state dict
(--timm-arch, --weights), converted here into an expert folder. The router is the paper's
design: the same denoiser at σ_e = 1.0, then a small CIFAR ResNet. Every weight file is pinned
(commit + sha256) in the workspace's router.toml; nothing is unpickled.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from rsrouter.errors import UsageError
from rsrouter.pipeline import PipelineConfig, run_pipeline

FULL = PipelineConfig(
    dataset="cifar10",
    sigmas=(0.25, 0.5, 1.0),
    expert_kind="denoised",
    table_n=100,
    table_alpha=0.001,
    table_subset=0.2,  # the paper's §E.4: a 20% subset of the training set loses little
    router_arch="cifar_resnet20",
    router_arch_args={},
    router_denoiser=True,
    router_epochs=90,
    router_batch_size=256,
    router_lr=0.01,
    certify_limit=500,
    n0=100,
    n=10_000,
    alpha=0.001,
    batch_size=1000,
)

# Tiny sizes for a CPU check of the same code with stand-in models (see tests/test_examples.py).
SMOKE = replace(
    FULL,
    table_n=16,  # at alpha = 0.001 fewer than 10 draws can never certify
    table_subset=1.0,
    router_arch="small_cnn",
    router_arch_args={"width": 4},
    router_epochs=1,
    router_batch_size=16,
    certify_limit=3,
    n0=8,
    n=16,
    batch_size=64,
    device="cpu",
)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/cifar10-dds"), help="the workspace")
    p.add_argument("--dataset", default="cifar10", help="cifar10, or an ImageFolder path")
    p.add_argument(
        "--data-root",
        help="torchvision CIFAR-10 root (holding cifar-10-batches-py/); default: $RSROUTER_DATA",
    )
    p.add_argument(
        "--denoiser",
        default="google/ddpm-cifar10-32",
        help="diffusers UNet2DModel + DDPMScheduler: Hub repo or folder",
    )
    p.add_argument("--denoiser-revision", help="Hub revision (branch, tag or commit) to pin")
    p.add_argument(
        "--denoiser-format",
        choices=("diffusers", "improved-diffusion"),
        default="diffusers",
        help="improved-diffusion: --denoiser is the openai .pt (cifar10_uncond_50M_500K.pt), "
        "converted once with `router convert-denoiser` into <out>/denoiser",
    )
    c = p.add_mutually_exclusive_group(required=True)
    c.add_argument("--classifier", help="rsrouter classifier expert: Hub repo or folder")
    c.add_argument("--timm-arch", help="timm architecture of --weights, e.g. vit_base_patch16_224")
    p.add_argument("--classifier-revision", help="Hub revision of --classifier")
    p.add_argument("--weights", type=Path, help="safetensors state dict for --timm-arch")
    p.add_argument("--arch-args", default="", help="timm keyword arguments, e.g. img_size=224")
    p.add_argument("--input-size", type=int, default=224, help="classifier input size (pixels)")
    p.add_argument("--mean", default="0.5,0.5,0.5", help="classifier normalisation mean")
    p.add_argument("--std", default="0.5,0.5,0.5", help="classifier normalisation std")
    p.add_argument("--endpoint", help="Hub endpoint (default: huggingface.co)")
    p.add_argument("--cache-dir", help="Hub cache folder")
    p.add_argument("--limit", type=int, help="test images to certify (default 500)")
    p.add_argument("--n", type=int, help="Monte-Carlo draws per certificate (default 10000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU check with stand-ins)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.timm_arch and not args.weights:
        p.error("--timm-arch needs --weights (a safetensors state dict).")
    if args.denoiser_format != "diffusers" and args.denoiser_revision:
        p.error("--denoiser-revision is for a Hub repo; an improved-diffusion .pt is a file.")
    return args


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise UsageError(f"{text!r} is not a comma-separated list of numbers.") from exc


def _arch_args(text: str) -> dict:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = float(value) if value.replace(".", "", 1).isdigit() else value
    return out


def timm_classifier_folder(args, folder: Path) -> Path:
    """An rsrouter classifier expert folder (bound to no σ) from a timm arch + safetensors."""
    from safetensors.torch import load_file

    from rsrouter.experts import Expert
    from rsrouter.experts.nets import build_classifier

    if (folder / "config.json").is_file():
        return folder
    if not args.weights.is_file() or args.weights.suffix != ".safetensors":
        raise UsageError(f"--weights {args.weights} must be an existing .safetensors file.")
    arch_args = _arch_args(args.arch_args)
    model = build_classifier(args.timm_arch, 10, 3, **arch_args)
    try:
        model.load_state_dict(load_file(str(args.weights)))
    except RuntimeError as exc:
        raise UsageError(f"{args.weights} does not fit {args.timm_arch} with 10 classes.") from exc
    expert = Expert.from_module(
        model,
        sigma=0,  # trained on clean images: bound to no σ, used through the denoiser
        arch=args.timm_arch,
        arch_args=arch_args,
        num_classes=10,
        in_chans=3,
        input_size=args.input_size,
        mean=_floats(args.mean),
        std=_floats(args.std),
        dataset="cifar10",
        source=str(args.weights),
    )
    return expert.save_pretrained(folder)


def denoiser_source(args, root: Path) -> str:
    """--denoiser as add-expert takes it: an improved-diffusion .pt is converted once (opt-in,
    torch.load(weights_only=True)) into root/denoiser, a diffusers folder of safetensors."""
    if args.denoiser_format == "diffusers":
        return args.denoiser
    from rsrouter.experts.convert_denoiser import convert_openai_unet

    folder = root / "denoiser"
    if not (folder / "diffusion_pytorch_model.safetensors").is_file():
        convert_openai_unet(args.denoiser, folder, format=args.denoiser_format)
    return str(folder)


def register(args):
    """The pipeline's expert step: one denoised expert per σ (skipped when registered)."""

    def step(ws, train, config, device):
        names = [f"dds-sigma{s:g}" for s in config.sigmas]
        registered = {e.name for e in ws.experts}
        missing = [s for s, n in zip(config.sigmas, names, strict=True) if n not in registered]
        if not missing:
            return names
        classifier = args.classifier
        if args.timm_arch:
            classifier = str(timm_classifier_folder(args, Path(ws.root) / "classifier"))
        ws.add_expert(  # every missing sigma at once: fetched, loaded and hashed once
            classifier,
            sigma=missing,
            name="dds",  # registered as "dds-sigma<σ>"
            revision=args.classifier_revision,
            denoiser=denoiser_source(args, Path(ws.root)),
            denoiser_revision=args.denoiser_revision,
            endpoint=args.endpoint,
            cache_dir=args.cache_dir,
        )
        return names

    return step


def config_for(args) -> PipelineConfig:
    overrides = {
        "workspace": args.out,
        "dataset": args.dataset,
        "data_root": args.data_root,
        "seed": args.seed,
        "progress": not args.quiet,
    }
    if not args.smoke:
        overrides["device"] = args.device
    if args.limit is not None:
        overrides["certify_limit"] = args.limit
    if args.n is not None:
        overrides["n"] = args.n
    return replace(SMOKE if args.smoke else FULL, **overrides)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        config = config_for(args)
        result = run_pipeline(config, register=register(args), log=lambda m: print(m, flush=True))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.table_markdown)
    print(f"report: {result.report_dir} (plot {result.plot.name}); seconds: {result.seconds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
