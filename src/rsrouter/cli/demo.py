"""`router demo`: the whole dual-RS pipeline on the bundled Fashion-MNIST subset, on CPU."""

from __future__ import annotations

from pathlib import Path

import typer

from rsrouter.cli.app import app, console
from rsrouter.pipeline import demo_config, run_pipeline
from rsrouter.registry.lock import workspace_lock
from rsrouter.registry.workspace import ARTIFACTS_DIR


@app.command()
def demo(
    ctx: typer.Context,
    workspace: Path = typer.Option(
        Path("demo-output"), "--workspace", "-w", help="Folder for experts and results."
    ),
    limit: int = typer.Option(None, help="Test images to certify (default: the demo's size)."),
    n: int = typer.Option(None, help="Monte-Carlo draws per certificate."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    seed: int = typer.Option(0, help="Seed of training and of every noise draw."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train three experts (σ = 0.25, 0.5, 1.0), fit on a val split a gate router (the σ = 1
    expert's own uncertainty picks the expert) and the experts' class-aware cascade (each expert
    fires where its own smoothed confidence passes a threshold per class), certify test images
    and report: the cascade (headline), the gate under every composition rule, every expert,
    Multiscale and the oracle, each with its regret to the best single expert.

    A rerun reuses what the workspace holds (experts, tables, router, certificates).
    """
    ctx.with_resource(workspace_lock(Path(workspace) / ARTIFACTS_DIR, "demo"))
    config = demo_config(
        workspace=workspace,
        certify_limit=limit,
        n=n,
        device=device,
        seed=seed,
        progress=not quiet,
    )
    result = run_pipeline(config, log=lambda step: console.print(f"step: {step}"))
    console.print(result.table_markdown, highlight=False)
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
    console.print(f"time: {steps} (total {sum(result.seconds.values()):.0f} s)")
    console.print(f"workspace: {result.workspace}")
    console.print(f"report: {result.report_dir}")
    console.print(f"plot: {result.plot}")
