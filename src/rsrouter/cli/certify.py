"""`router certify`, `router report` and `router predict`: thin shells over rsrouter.router."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import typer
from rich.table import Table

from rsrouter import distributed
from rsrouter.cli.app import DEVICE, WORKSPACE, app, console, hold_lock, show_table
from rsrouter.errors import UsageError
from rsrouter.io import read_json
from rsrouter.registry import Workspace
from rsrouter.runtime import format_seconds, resolve_device


@app.command("certify")
def certify_cmd(
    ctx: typer.Context,
    split: str = typer.Option(None, help="Dataset split to certify (default: test)."),
    n: int = typer.Option(None, help="Monte-Carlo samples per input and stage (default 10000)."),
    n0: int = typer.Option(None, help="Selection samples (default 100)."),
    alpha: float = typer.Option(None, help="Total failure probability (default 0.001)."),
    alpha_router: float = typer.Option(
        None, "--alpha-router", help="The router's share of alpha (default alpha / 2)."
    ),
    limit: int = typer.Option(None, help="Certify only the first K inputs of the split."),
    seed: int = typer.Option(None, help="Noise seed (default 0)."),
    p_skip: float = typer.Option(None, "--p-skip", help="Multiscale baseline threshold (0.5)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Forward batch size (1000)."),
    rule: str = typer.Option(
        None,
        help="Headline composition rule: cascade (the experts' own, no router; a gate router "
        "fitted on val carries one), agreement, min (the paper's) or pairwise. Default: "
        "[certify] rule, else cascade where the router has one, else agreement.",
    ),
    router: bool = typer.Option(
        None,
        "--router/--no-router",
        help="--no-router: certify the experts' cascade alone, without sampling the router it "
        "does not read (1 / (K + 1) less sampling; the other rules' rows are left out). "
        "Default: [certify] sample_router, else the router is sampled.",
    ),
    device: str = DEVICE,
    workspace: Path = WORKSPACE,
) -> None:
    """Dual-certify a split, with every composition rule, each expert alone, Multiscale and the
    oracle beside it."""
    from rsrouter.composition.certify_run import certify_workspace
    from rsrouter.composition.report import regret_text, summarize

    ws = Workspace.open(workspace)
    hold_lock(ctx, ws, "certify")
    result = certify_workspace(
        ws,
        on_plan=functools.partial(_print_plan, resolve_device(device)),
        device=device,
        split=split,
        n=n,
        n0=n0,
        alpha=alpha,
        alpha_router=alpha_router,
        limit=limit,
        seed=seed,
        p_skip=p_skip,
        batch_size=batch_size,
        rule=rule,
        sample_router=router,
    )
    if not distributed.context().is_main:
        return
    meta = read_json(result.meta_path)
    summary = summarize(meta, result.records, grid=[0.0, 0.25, 0.5, 0.75, 1.0])
    table = Table(title=f"certified accuracy (%) on {summary['inputs']} inputs")
    table.add_column("method")
    for r in summary["grid"]:
        table.add_column(f"r={r:g}", justify="right")
    table.add_column("ACR", justify="right")
    table.add_column("regret [95 %]", justify="right")
    table.add_column("every r", justify="right")
    for m in summary["methods"].values():
        cells = [f"{100 * v:.1f}" for v in m["certified_accuracy"]]
        every = f"{m['regret_every_radius']:.1f}"
        table.add_row(m["label"], *cells, f"{m['acr']:.3f}", regret_text(m), every)
    show_table(table)
    more = result.stored - len(result.records)
    kept = (
        f" (and {more} more from a larger --limit: `router report` shows them all)" if more else ""
    )
    console.print(
        f"{result.computed} input(s) certified now, {len(result.records)} in the run{kept}.\n"
        f"records: {result.path}\nsettings: {result.meta_path}\n"
        "next: `router report` for the full table and the plot."
    )


def _print_plan(device, plan) -> None:
    """`router certify`'s plan, before any input is certified: what, how much, how long."""
    if not plan.todo:
        console.print(f"every one of the {plan.inputs} inputs is certified already.")
        return
    if not plan.samples:
        console.print(f"plan: {plan.todo} inputs to decide from cached counts (no sampling).")
        return
    models = ", ".join(f"{name} {k}" for name, k in plan.sample.items() if k)
    console.print(
        f"plan: {plan.todo} of {plan.inputs} inputs of split {plan.split!r} to certify, "
        f"n0={plan.n0}, n={plan.n}, alpha={plan.alpha:g}; inputs to sample per model: {models}.\n"
        f"      {plan.samples:,} noisy forward passes: about {format_seconds(plan.seconds)} on "
        f"{device} (timed on a short calibration; --limit and --n cut it)."
    )


@app.command("report")
def report_cmd(
    run: Path = typer.Option(None, help="A run's .jsonl (default: the latest under certify/)."),
    step: float = typer.Option(0.25, help="Radius grid step."),
    limit: int = typer.Option(
        None, help="Report the run's first K inputs only (default: every input it holds)."
    ),
    workspace: Path = WORKSPACE,
) -> None:
    """Certified-accuracy table (md + csv), ACR, routing, abstentions and a PNG curve."""
    from rsrouter.composition.certify_run import latest_run, load_run
    from rsrouter.composition.report import write_report
    from rsrouter.smoothing import check_count

    if limit is not None:
        check_count("limit", limit)
    ws = Workspace.open(workspace)
    path = run if run is not None else latest_run(ws.artifacts)
    meta, records = load_run(path)
    if limit is not None:
        records = [r for r in records if r["index"] < limit]
    if not records:
        raise UsageError(f"{path} has no records yet; run `router certify` first.")
    paths = write_report(meta, records, Path(ws.artifacts) / "report", step=step)
    # the markdown source itself: its pipe table reads as it is and is never re-wrapped
    console.print(paths["markdown"].read_text(encoding="utf-8"), markup=False, highlight=False)
    for what, p in paths.items():
        console.print(f"{what}: {p}")


def load_images(paths: list[Path], shape: tuple[int, int, int]) -> torch.Tensor:
    """Image files as a (N, C, H, W) [0, 1] batch of exactly ``shape``; else one sentence.

    8- and 16-bit images are scaled to [0, 1]; float images (e.g. a 32-bit TIFF) must already
    hold finite values in [0, 1], as the Python API requires.
    """
    channels, height, width = shape
    if channels not in (1, 3):
        raise UsageError(f"image files can feed 1- or 3-channel models, not {channels}.")
    out = []
    for path in paths:
        array = _pixels(Path(path), channels)
        if array.shape[:2] != (height, width):
            raise UsageError(
                f"{path} is {array.shape[1]}x{array.shape[0]} pixels, "
                f"but the models expect {width}x{height}."
            )
        if not np.isfinite(array).all():
            raise UsageError(f"{path} has NaN or infinite pixels; give an image of [0, 1] values.")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise UsageError(
                f"{path} has pixels outside [0, 1] ({low:g} to {high:g}); scale a float image "
                "to [0, 1] or save it as an 8-bit PNG."
            )
        array = array[None] if channels == 1 else array.transpose(2, 0, 1)
        out.append(torch.from_numpy(np.ascontiguousarray(array)))
    return torch.stack(out)


def _pixels(path: Path, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) float32 pixels of one image file, integers scaled to [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    if path.is_dir():
        raise UsageError(f"{path} is a folder: give image files, e.g. {path / '*.png'}.")
    if not path.is_file():
        raise UsageError(f"{path} does not exist.")
    try:
        with Image.open(path) as img:
            if img.mode in ("F", "I", "I;16", "I;16B", "I;16L"):  # one channel, kept as numbers
                scale = {"F": 1.0, "I": 1.0}.get(img.mode, 65535.0)
                array = np.asarray(img, dtype=np.float32) / scale
                return array if channels == 1 else np.repeat(array[..., None], 3, axis=2)
            img = img.convert("L" if channels == 1 else "RGB")
            return np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"{path} is not a readable image (PNG, JPEG, TIFF).") from exc


@app.command("predict")
def predict_cmd(
    images: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, TIFF)."),
    n: int = typer.Option(1000, help="Monte-Carlo samples per stage."),
    alpha: float = typer.Option(0.001, help="Total failure probability."),
    alpha_router: float = typer.Option(None, "--alpha-router", help="Router share (alpha / 2)."),
    seed: int = typer.Option(0, help="Noise seed."),
    rule: str = typer.Option(
        None,
        help="Composition rule (default: [certify] rule, else cascade where the router has "
        "one, else agreement).",
    ),
    device: str = DEVICE,
    workspace: Path = WORKSPACE,
) -> None:
    """PREDICT with the router, then with the expert it picks (abstains unless both are sure)."""
    from rsrouter.composition.certify_run import certify_settings, workspace_dual

    ws = Workspace.open(workspace)
    dev = resolve_device(device)
    dual, names = workspace_dual(ws, device=dev, rule=certify_settings(ws, rule=rule)["rule"])
    rule = dual.rule
    xs = load_images(list(images), tuple(dual.router.input_shape))
    preds = dual.predict_batch(
        xs, n=n, alpha=alpha, alpha_router=alpha_router, seed=seed, device=dev
    )
    classes = list(getattr(dual.experts[0], "class_names", None) or [])
    table = Table(title=f"dual PREDICT (n={n}, alpha={alpha:g}, rule {rule})")
    table.add_column("image", overflow="fold")
    for col in ("routed expert", "sigma", "prediction"):
        table.add_column(col)
    for path, p in zip(images, preds, strict=True):
        if p.expert >= 0:
            routed, sigma = names[p.expert], f"{dual.sigmas[p.expert]:g}"
        elif p.rule == "cascade":
            routed, sigma = "abstain (no expert's stage is sure)", "—"
        elif len(p.consulted) > 1:  # agreement: the router is unsure, these experts were asked
            routed = "unsure: " + " or ".join(names[i] for i in p.consulted)
            sigma = "/".join(f"{dual.sigmas[i]:g}" for i in p.consulted)
        else:
            routed, sigma = "abstain (router unsure)", "—"
        if p.prediction >= 0:
            label = classes[p.prediction] if p.prediction < len(classes) else str(p.prediction)
        else:
            label = "abstain"
        table.add_row(str(path), routed, sigma, label)
    show_table(table)
