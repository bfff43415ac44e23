"""Workspace and expert commands: init, add-expert, experts, remove-expert, export/convert."""

from __future__ import annotations

import functools
import inspect
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
        console.print("no experts yet: `router add-expert FOLDER_OR_REPO --sigma S`")


@app.command("remove-expert")
def remove_expert_cmd(name: str, workspace: Path = WORKSPACE) -> None:
    """Unregister an expert (its files are left where they are)."""
    ws = Workspace.open(workspace)
    ws.remove_expert(name)
    console.print(f"removed expert {name!r}; wrote {ws.path}")


# The options every expert folder needs, shared by export-expert and convert-checkpoint.
EXPERT_OPTIONS = {
    "arch": (
        str,
        typer.Option(..., help="build_classifier name: small_cnn, cifar_resnet20/56/110, or timm."),
    ),
    "sigma": (float, typer.Option(..., help="The sigma the weights were trained at.")),
    "num_classes": (int, typer.Option(..., help="Number of classes.")),
    "in_chans": (int, typer.Option(..., help="Input channels (1 grey, 3 colour).")),
    "input_size": (str, typer.Option(..., help="Input size H or H,W.")),
    "arch_arg": (
        list[str],
        typer.Option(None, help="Architecture argument key=value (repeatable)."),
    ),
    "mean": (str, typer.Option(None, help="Per-channel mean, comma-separated (default 0).")),
    "std": (str, typer.Option(None, help="Per-channel std, comma-separated (default 1).")),
    "class_names": (str, typer.Option(None, help="Comma-separated class names.")),
    "dataset": (str, typer.Option("", help="Training dataset, for the model card.")),
    "license": (str, typer.Option("unknown", help="Licence of the weights (SPDX id).")),
}


def _expert_fields(v: dict) -> dict:
    """The EXPERT_OPTIONS values as the config fields export_expert/convert_checkpoint take."""
    fields = {
        "arch": v["arch"],
        "sigma": v["sigma"],
        "num_classes": v["num_classes"],
        "in_chans": v["in_chans"],
        "input_size": parse_size(v["input_size"]),
        "arch_args": parse_arch_args(v["arch_arg"] or []),
        "dataset": v["dataset"],
        "license": v["license"],
    }
    if v["mean"]:
        fields["mean"] = parse_floats(v["mean"], "--mean")
    if v["std"]:
        fields["std"] = parse_floats(v["std"], "--std")
    if v["class_names"]:
        fields["class_names"] = [c.strip() for c in v["class_names"].split(",")]
    return fields


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
    _print_written(folder, fields["sigma"])


@app.command("convert-checkpoint")
@with_expert_options
def convert_checkpoint_cmd(
    checkpoint: Path = typer.Argument(..., help="A .pt/.pth/.bin/.ckpt pickle checkpoint."),
    out: Path = typer.Argument(..., help="The expert folder to write."),
    fields: dict = None,
    key: str = typer.Option(None, help="Where the state dict sits in the checkpoint (a.b)."),
    strip_prefix: str = typer.Option(None, help="Remove this prefix from every weight name."),
) -> None:
    """Opt-in: read a pickle checkpoint with torch.load(weights_only=True), write safetensors."""
    from rsrouter.experts.convert import convert_checkpoint

    folder = convert_checkpoint(checkpoint, out, key=key, strip_prefix=strip_prefix, **fields)
    _print_written(folder, fields["sigma"])


def _print_written(folder: Path, sigma: float) -> None:
    console.print(
        f"wrote expert folder {folder}/ (add it: router add-expert {folder} --sigma {sigma})"
    )
