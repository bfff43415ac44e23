"""Workspace and expert commands: init, add-expert, experts, remove-expert, export/convert."""

from __future__ import annotations

import functools
import inspect
import shlex
from pathlib import Path

import typer
from rich.table import Table

from rsrouter.cli.app import WORKSPACE, app, console, show_table
from rsrouter.data import check_dataset_name
from rsrouter.errors import UsageError
from rsrouter.registry import Workspace


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise UsageError(f"{what} must be comma-separated numbers, got {text!r}.") from exc


def parse_size(text: str) -> list[int]:
    try:
        size = [int(part) for part in text.lower().replace("x", ",").split(",")]
    except ValueError as exc:
        raise UsageError(
            f"--input-size must be H or H,W (e.g. 28 or 32,32), got {text!r}."
        ) from exc
    return size * 2 if len(size) == 1 else size


def parse_arch_args(items: list[str]) -> dict:
    """key=value pairs; values are read as int, float, true/false, else kept as text."""
    args = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--arch-arg must be key=value, got {item!r}.")
        value: object = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                pass
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        args[key] = value
    return args


@app.command("init")
def init_cmd(
    directory: Path = typer.Argument(Path("."), help="Where to create router.toml."),
    dataset: str = typer.Option(
        "fashion-mnist-subset", help="Dataset name or ImageFolder path, recorded in [data]."
    ),
) -> None:
    """Create a workspace: router.toml (experts and settings) and its artifacts folder."""
    ws = Workspace.init(directory, dataset=check_dataset_name(dataset))
    console.print(f"created {ws.path}; outputs will go to {ws.artifacts}/")


@app.command("add-expert")
def add_expert_cmd(
    source: str = typer.Argument(
        None, help="An expert folder or Hub repo id (the classifier, with --denoiser)."
    ),
    sigma: str = typer.Option(..., help="Noise level(s): 0.25, or 0.25,0.5,1.0 if denoised."),
    name: str = typer.Option(
        None,
        help="Expert name (default: the source's name + -sigma<S>; a denoised expert's "
        "name always gets -sigma<S> added).",
    ),
    revision: str = typer.Option(None, help="Hub branch, tag or commit to pin."),
    denoiser: str = typer.Option(None, help="A diffusers UNet2DModel + DDPMScheduler repo."),
    classifier: str = typer.Option(None, help="With --denoiser: the classifier (else SOURCE)."),
    denoiser_revision: str = typer.Option(None, help="Hub revision of --denoiser."),
    resize_mode: str = typer.Option(
        None,
        help="With --denoiser: how the denoised image is resized to the classifier's input: "
        "bicubic-antialias (default, as Carlini et al.), bilinear-antialias, bicubic, bilinear "
        "or nearest.",
    ),
    endpoint: str = typer.Option(None, help="Hub endpoint (a mirror, or a private Hub)."),
    cache_dir: Path = typer.Option(None, help="Hub cache folder."),
    token: str = typer.Option(None, help="Hub token (else the usual HF_TOKEN / login)."),
    workspace: Path = WORKSPACE,
) -> None:
    """Register an expert: pin its revision, record the sha256 of every file it loads."""
    if classifier and source and classifier != source:
        raise UsageError("give the classifier either as SOURCE or as --classifier, not both.")
    source = classifier or source
    if not source:
        raise UsageError("give an expert folder or Hub repo id (or --classifier with --denoiser).")
    if classifier and not denoiser:
        raise UsageError("--classifier goes with --denoiser.")
    ws = Workspace.open(workspace)
    entries = ws.add_expert(
        source,
        parse_floats(sigma, "--sigma"),
        name=name,
        revision=revision,
        endpoint=endpoint,
        cache_dir=cache_dir,
        token=token,
        denoiser=denoiser,
        denoiser_revision=denoiser_revision,
        resize_mode=resize_mode,
    )
    for e in entries:
        console.print(f"added expert {e.name!r} (σ = {e.sigma}, {e.kind}, {e.pinned})")
    console.print(f"wrote {ws.path}")


@app.command("experts")
def experts_cmd(
    workspace: Path = WORKSPACE,
    verify: bool = typer.Option(False, help="Load every expert and check its files' sha256."),
) -> None:
    """List the registered experts in router order."""
    ws = Workspace.open(workspace)
    if verify:
        ws.load_experts()  # raises on a missing or changed file; a denoiser is loaded once

    table = Table(title=f"experts in {ws.path}")
    for col in ("#", "name", "σ", "kind", "params"):
        table.add_column(col, no_wrap=True)
    for col in ("source", "revision", "commit / weights sha256"):
        table.add_column(col, overflow="fold")
    for i, e in enumerate(ws.experts):
        source = e.source + (f" + {e.denoiser_source}" if e.denoiser_source else "")
        pin = e.commit[:12] if e.commit else e.sha256.get("model.safetensors", "?")[:12]
        table.add_row(
            str(i),
            e.name,
            f"{e.sigma:g}",
            e.kind,
            f"{e.parameters:,}",
            source,
            e.revision or ("local" if not e.commit else "main"),
            pin,
        )
    show_table(table)
    if verify and ws.experts:
        console.print(f"verified: every file of the {len(ws.experts)} experts matches its sha256")
    if not ws.experts:
        console.print(
            "no experts yet: add one with `router add-expert` (see `router add-expert --help`)"
        )


@app.command("remove-expert")
def remove_expert_cmd(name: str, workspace: Path = WORKSPACE) -> None:
    """Unregister an expert (its files are left where they are)."""
    ws = Workspace.open(workspace)
    ws.remove_expert(name)
    console.print(f"removed expert {name!r}; wrote {ws.path}")


# The options every expert folder needs, shared by export-expert and convert-checkpoint.
# None = not given: the API fills it from a known source format or asks for it.
EXPERT_OPTIONS = {
    "arch": (
        str,
        typer.Option(
            None, help="build_classifier name: small_cnn, cifar_resnet20/56/110, or timm."
        ),
    ),
    "sigma": (
        float,
        typer.Option(
            None, help="The sigma the weights were trained at (omit: trained on clean images)."
        ),
    ),
    "num_classes": (int, typer.Option(None, help="Number of classes.")),
    "in_chans": (int, typer.Option(None, help="Input channels (1 grey, 3 colour).")),
    "input_size": (str, typer.Option(None, help="Input size H or H,W.")),
    "arch_arg": (
        list[str],
        typer.Option(None, help="Architecture argument key=value (repeatable)."),
    ),
    "mean": (
        str,
        typer.Option(
            None,
            help="Per-channel mean the weights expect, comma-separated (required unless "
            "the source records it).",
        ),
    ),
    "std": (str, typer.Option(None, help="Per-channel std, comma-separated (as --mean).")),
    "class_names": (str, typer.Option(None, help="Comma-separated class names.")),
    "dataset": (
        str,
        typer.Option(None, help="Training dataset (model card; cifar10/imagenet: see --format)."),
    ),
    "license": (str, typer.Option(None, help="Licence of the weights (SPDX id).")),
}


def _expert_fields(v: dict) -> dict:
    """The EXPERT_OPTIONS values as the config fields export_expert/convert_checkpoint take
    (None where not given)."""
    return {
        "arch": v["arch"],
        "sigma": v["sigma"],
        "num_classes": v["num_classes"],
        "in_chans": v["in_chans"],
        "input_size": parse_size(v["input_size"]) if v["input_size"] else None,
        "arch_args": parse_arch_args(v["arch_arg"]) if v["arch_arg"] else None,
        "dataset": v["dataset"],
        "license": v["license"],
        "mean": parse_floats(v["mean"], "--mean") if v["mean"] else None,
        "std": parse_floats(v["std"], "--std") if v["std"] else None,
        "class_names": [c.strip() for c in v["class_names"].split(",")]
        if v["class_names"]
        else None,
    }


def with_expert_options(command):
    """Put the EXPERT_OPTIONS where the command has its `fields` parameter (so every command
    lists them alike, in one place) and call it with their parsed values as `fields`."""
    signature = inspect.signature(command)
    params = []
    for p in signature.parameters.values():
        if p.name != "fields":
            params.append(p)
            continue
        for name, (kind, option) in EXPERT_OPTIONS.items():
            params.append(inspect.Parameter(name, p.kind, default=option, annotation=kind))

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {name: kwargs.pop(name) for name in EXPERT_OPTIONS}
        return command(fields=_expert_fields(values), **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


@app.command("export-expert")
@with_expert_options
def export_expert_cmd(
    weights: Path = typer.Argument(..., help="A safetensors state dict of the classifier."),
    out: Path = typer.Argument(..., help="The expert folder to write."),
    fields: dict = None,
    strip_prefix: str = typer.Option(None, help="Remove this prefix from every weight name."),
) -> None:
    """Make an expert folder (config.json, model.safetensors, README.md) from a state dict."""
    from rsrouter.experts.convert import export_expert

    folder = export_expert(weights, out, strip_prefix=strip_prefix, **fields)
    _print_written(folder)


@app.command("convert-checkpoint")
@with_expert_options
def convert_checkpoint_cmd(
    checkpoint: Path = typer.Argument(
        ..., help="A .pt/.pth/.pth.tar/.bin/.ckpt pickle checkpoint, or a transformers ViT folder."
    ),
    out: Path = typer.Argument(..., help="The expert folder to write."),
    fields: dict = None,
    format: str = typer.Option(
        None,
        help="cohen: a checkpoint.pth.tar of Cohen et al. / Salman et al. / Jeong & Shin "
        "(architecture from the file, mean/std from --dataset cifar10 or imagenet).",
    ),
    key: str = typer.Option(None, help="Where the state dict sits in the checkpoint (a.b)."),
    strip_prefix: str = typer.Option(None, help="Remove this prefix from every weight name."),
) -> None:
    """Opt-in: read a pickle checkpoint with torch.load(weights_only=True) (or a Cohen et al.
    checkpoint with --format cohen, or a transformers ViT folder), write safetensors."""
    from rsrouter.experts.convert import convert_checkpoint

    folder = convert_checkpoint(
        checkpoint, out, key=key, format=format, strip_prefix=strip_prefix, **fields
    )
    _print_written(folder)


def _print_written(folder: Path) -> None:
    """Where the folder went, and the add-expert command for it (pasteable as printed)."""
    from rsrouter.experts.expert import read_config

    sigma = read_config(folder).sigma
    command = f"router add-expert {shlex.quote(str(folder))} --sigma {sigma or 0.25:g}"
    what = "" if sigma else "a classifier trained on clean images; "
    console.print(f"wrote expert folder {folder}/ ({what}add it: {command})")


@app.command("convert-denoiser")
def convert_denoiser_cmd(
    source: str = typer.Argument(
        ...,
        help="--format diffusers: a diffusers folder or Hub repo id whose UNet is a pickle "
        "diffusion_pytorch_model.bin; improved-diffusion / guided-diffusion: the openai .pt file.",
    ),
    out: Path = typer.Argument(..., help="The diffusers denoiser folder to write (safetensors)."),
    format: str = typer.Option(
        ..., "--format", help="diffusers, improved-diffusion or guided-diffusion."
    ),
    schedule: str = typer.Option(
        None, help="openai formats: linear or cosine (default: cosine improved, linear guided)."
    ),
    steps: int = typer.Option(
        None, help="openai formats: diffusion steps (default: 4000 improved, 1000 guided)."
    ),
    rescale_timesteps: bool = typer.Option(
        None,
        "--rescale-timesteps/--no-rescale-timesteps",
        help="openai formats: the UNet sees t * 1000 / steps (default: on improved, off guided).",
    ),
    num_heads: int = typer.Option(
        None, help="openai formats: attention heads per layer (improved-diffusion: 4)."
    ),
    head_channels: int = typer.Option(
        None, help="openai formats: channels per attention head (guided-diffusion: 64)."
    ),
    sample_size: int = typer.Option(
        None,
        help="openai formats: the image size the UNet is for (default: 32 improved, 256 "
        "guided); a denoised expert takes inputs of this size.",
    ),
    attention_order: str = typer.Option(
        None,
        help="openai formats: legacy (QKVAttentionLegacy, the published models; default) or "
        "new (guided-diffusion's use_new_attention_order).",
    ),
    key: str = typer.Option(None, help="openai formats: where the state dict sits (a.b)."),
    revision: str = typer.Option(None, help="--format diffusers, a Hub repo: branch/tag/commit."),
    endpoint: str = typer.Option(None, help="Hub endpoint (a mirror, or a private Hub)."),
    cache_dir: Path = typer.Option(None, help="Hub cache folder."),
    token: str = typer.Option(None, help="Hub token (else the usual HF_TOKEN / login)."),
) -> None:
    """Opt-in: read a published denoiser's pickle with torch.load(weights_only=True) and write a
    diffusers UNet2DModel + DDPMScheduler folder of safetensors (for add-expert --denoiser)."""
    from rsrouter.experts import convert_denoiser as cd

    if format not in cd.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(cd.FORMATS)}, got {format!r}.")
    openai = {
        "--schedule": schedule,
        "--steps": steps,
        "--rescale-timesteps": rescale_timesteps,
        "--num-heads": num_heads,
        "--head-channels": head_channels,
        "--sample-size": sample_size,
        "--attention-order": attention_order,
        "--key": key,
    }
    if format == "diffusers":
        given = [flag for flag, value in openai.items() if value is not None]
        if given:
            raise UsageError(
                f"{given[0]} is for the openai formats; a diffusers folder has its own config."
            )
        folder = cd.convert_diffusers_pickle(
            source, out, revision=revision, endpoint=endpoint, cache_dir=cache_dir, token=token
        )
    else:
        if revision or endpoint:
            raise UsageError(
                f"--revision and --endpoint are for --format diffusers; {format} takes a local .pt."
            )
        folder = cd.convert_openai_unet(
            source,
            out,
            format=format,
            schedule=schedule,
            steps=steps,
            rescale_timesteps=rescale_timesteps,
            num_heads=num_heads,
            head_channels=head_channels,
            sample_size=sample_size,
            attention_order=attention_order or "legacy",
            key=key,
        )
    console.print(
        f"wrote denoiser folder {folder}/ (register it with a classifier: router add-expert "
        f"--denoiser {folder} --classifier <classifier folder or Hub repo> --sigma 0.25,0.5,1.0)"
    )
