"""`router tables`, `router train`, `router finetune-expert`: thin shells over rsrouter.router."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import typer
from rich.table import Table

from rsrouter.cli.app import DEVICE, WORKSPACE, app, console, hold_lock, show_table
from rsrouter.registry import Workspace
from rsrouter.runtime import format_seconds


def _print_table(table) -> None:
    view = Table(title=f"radius table: {len(table.indices)} inputs, n={table.n}, α={table.alpha}")
    for col in ("expert", "sigma", "certified (R>0)", "mean radius", "best for"):
        view.add_column(col, justify="left" if col == "expert" else "right")
    for row in table.summary():
        view.add_row(
            row["expert"],
            f"{row['sigma']:g}",
            f"{100 * row['certified']:.1f}%",
            f"{row['mean_radius']:.3f}",
            f"{100 * row['best_share']:.1f}%",
        )
    show_table(view)
    kept = int(table.certified.sum())
    console.print(f"{kept} of {len(table.indices)} inputs are certified by some expert.")


@app.command("tables")
def tables_cmd(
    ctx: typer.Context,
    n: int = typer.Option(None, help="Noisy copies per input (default 100)."),
    alpha: float = typer.Option(None, help="Confidence level of each radius (default 0.001)."),
    subset: float = typer.Option(None, help="Fraction of the split to use (default 1.0)."),
    split: str = typer.Option(None, help="Dataset split (default train)."),
    seed: int = typer.Option(None, help="Noise and subset seed (default 0)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Forward batch size (1000)."),
    shard_size: int = typer.Option(None, "--shard-size", help="Inputs per shard file (256)."),
    device: str = DEVICE,
    workspace: Path = WORKSPACE,
) -> None:
    """Compute the missing radius-table columns (one per expert); cached columns are reused."""
    from rsrouter import distributed
    from rsrouter.router.tables import table_settings, workspace_dataset, workspace_tables

    ws = Workspace.open(workspace)
    hold_lock(ctx, ws, "tables")
    ctx = distributed.context()
    overrides = dict(n=n, alpha=alpha, subset=subset, split=split, seed=seed,
                     batch_size=batch_size, shard_size=shard_size)  # fmt: skip
    s = table_settings(ws, **overrides)  # checked: a bad value is refused before it is saved
    dataset = workspace_dataset(ws, s["split"])  # an unknown split too
    given = {k: v for k, v in overrides.items() if v is not None}
    stored = ws.settings("tables")
    if ctx.is_main and any(stored.get(k) != v for k, v in given.items()):
        ws.update_settings("tables", **given)  # `router train` then uses this same table
        console.print(f"saved {', '.join(f'{k}={v}' for k, v in given.items())} in {ws.path}")
    ctx.barrier()
    experts = ws.load_experts(device=ctx.device(device)) if ctx.is_main else None
    table, _ = workspace_tables(
        ws, experts=experts, dataset=dataset, device=device, ctx=ctx,
        on_plan=functools.partial(_print_table_plan, s["split"], ctx.device(device))
        if ctx.is_main else None, **overrides,
    )  # fmt: skip
    if ctx.is_main and table is not None:
        _print_table(table)
        console.print(f"columns: {Path(ws.artifacts) / 'tables'}")
        console.print("next: `router train`.")


def _print_table_plan(split: str, device, plan) -> None:
    """`router tables`' plan, before any column is computed: what, how much, how long."""
    for name, path in plan.corrupt.items():
        console.print(f"the cached column of {name} ({path}) is truncated or corrupt: redoing it.")
    if not plan.compute:
        console.print(f"every column is cached ({', '.join(plan.cached)}): nothing to compute.")
        return
    cached = f" ({', '.join(plan.cached)} cached)" if plan.cached else ""
    console.print(
        f"plan: {plan.inputs} inputs of split {split!r} (subset {plan.subset:g}), n={plan.n}, "
        f"alpha={plan.alpha:g}; computing {len(plan.compute)} column(s): "
        f"{', '.join(plan.compute)}{cached}.\n"
        f"      {plan.samples:,} noisy forward passes: about {format_seconds(plan.seconds)} on "
        f"{device} (timed on a short calibration)."
    )


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    epochs: int = typer.Option(None, help="Training epochs (workspace [train], default 30)."),
    batch_size: int = typer.Option(None, "--batch-size", help="Batch size (256)."),
    lr: float = typer.Option(None, help="AdamW learning rate (0.01)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay (0.01)."),
    lam: float = typer.Option(None, "--lambda", help="Consistency weight λ (40)."),
    eta: float = typer.Option(None, help="Entropy weight η (0.5)."),
    copies: int = typer.Option(None, "--copies", help="Noise copies m per input (2)."),
    weighting: str = typer.Option(None, help="Consistency weight w_r: none, weak or strong."),
    balance: bool = typer.Option(None, "--balance/--no-balance", help="Class balance w_e."),
    label_scale: float = typer.Option(None, "--label-scale", help="T in softmax(R / T) (1)."),
    target: str = typer.Option(
        None,
        help="Soft labels of a learned router: radius (softmax(R / T), the paper's) or utility "
        "(softmax(U / T), each radius valued by how rare it is among the experts).",
    ),
    seed: int = typer.Option(None, help="Initialisation, shuffling and noise seed (0)."),
    arch: str = typer.Option(None, help="Router architecture (built-in or timm; small_cnn)."),
    sigma_e: float = typer.Option(None, "--sigma-e", help="Router sigma (largest expert σ)."),
    denoiser: str = typer.Option(
        None, help="Denoiser in front of the router: a denoised expert's name or a folder."
    ),
    init: str = typer.Option(
        None, help="Start from this expert's classifier weights (all but the output layer)."
    ),
    head_only: bool = typer.Option(
        None, "--head-only/--all-layers", help="Train the output layer only (needs --init)."
    ),
    kind: str = typer.Option(
        None,
        help="Router design: learned (the paper's, trained on the tables), class-map, gate "
        "(the sigma_e expert's own uncertainty picks the expert; thresholds fitted on the val "
        "split) or class-gate (a gate with thresholds per predicted class). Default: workspace "
        "[router] kind, else class-gate when the workspace has a val split ([data] "
        "validation), else learned.",
    ),
    cascade: str = typer.Option(
        None,
        help="How a gate router's fit fits the experts' cascade: regret (order and thresholds "
        "with the least val regret), keep-multiscale (the largest sigma first at 1/2, so never "
        "below Multiscale where only it certifies; the rest fitted) or plain (Multiscale's "
        "stages, nothing fitted). Default: workspace [tune] cascade, else regret.",
    ),
    class_map: str = typer.Option(
        None,
        "--class-map",
        help="No training: route by the sigma_e expert's predicted class, CLASS=EXPERT,... "
        "(unlisted classes stay with it), e.g. Shirt=gauss-sigma0.25,Coat=gauss-sigma0.5.",
    ),
    device: str = DEVICE,
    workspace: Path = WORKSPACE,
) -> None:
    """Train the router on the radius tables (missing columns are built first); resumes."""
    from rsrouter.router.train import GATE_KINDS, router_kind, router_settings, train_workspace

    ws = Workspace.open(workspace)
    hold_lock(ctx, ws, "train")
    train_overrides = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        consistency_lambda=lam, consistency_eta=eta, noise_copies=copies,
        consistency_weight=weighting, balance=balance, soft_label_scale=label_scale, seed=seed,
        head_only=head_only, target=target,
    )  # fmt: skip
    class_map = _parse_class_map(class_map)
    router_overrides = dict(
        kind=kind or ("class-map" if class_map else None),  # --class-map alone means class-map
        arch=arch,
        sigma_e=sigma_e,
        denoiser=denoiser,
        init=init,
        class_map=class_map,
    )
    chosen = router_kind(router_settings(ws, **router_overrides))
    if cascade is not None and chosen not in GATE_KINDS:
        raise typer.BadParameter(
            f"a {chosen} router fits no cascade: use it with --kind gate or class-gate.",
            param_hint="--cascade",
        )
    if kind is None and ws.settings("router").get("kind") is None and chosen == "learned":
        console.print(
            "no val split in router.toml ([data] validation = K): training the paper's learned "
            "router; with one, `router train` fits a gate router (the best design measured)."
        )
    if chosen in GATE_KINDS:
        _train_gate(ws, device, router_overrides, cascade)
        return
    from rsrouter import distributed

    result = train_workspace(
        ws, device=device, router_overrides=router_overrides, train_overrides=train_overrides,
        ctx=distributed.context(),
    )  # fmt: skip
    if result is None:  # not rank 0: it helped with the tables; rank 0 trains
        return
    router, history, folder = result
    if router.class_map is not None:
        console.print(
            f"class-map router: a copy of {router.info['init']}; its predicted class picks the "
            "expert (nothing trained)."
        )
    else:
        _print_history(history)
    console.print(
        f"router over {', '.join(router.expert_names)} (σ_e = {router.sigma_e:g}) saved to "
        f"{folder}\nnext: `router certify`."
    )


def _train_gate(ws, device: str, router_overrides: dict, cascade: str | None = None) -> None:
    from rsrouter import distributed
    from rsrouter.composition.tuning import train_gate_workspace

    router, tried, folder = train_gate_workspace(
        ws, device=device, router_overrides=router_overrides, cascade_fit=cascade
    )
    if not distributed.context().is_main:  # under torchrun rank 0 reports
        return
    chosen = router.info["tuning"]["chosen"]
    shares = ", ".join(
        f"{name} {100 * share:.0f} %"
        for name, share in zip(router.expert_names, chosen["routed"], strict=True)
    )
    rows = router.gate.get("class_thresholds")
    fitted = (
        f"entropy thresholds {_thresholds(router.gate['thresholds'])}"
        if rows is None
        else f"entropy thresholds per predicted class ({'; '.join(map(_thresholds, rows))})"
    )
    cascade, fit = router.info["cascade"], router.info["tuning"]["cascade"]
    stages = " → ".join(router.expert_names[i] for i in cascade["order"])
    console.print(
        f"{router.kind} router: a copy of {router.info['init']}; {fitted} chosen among "
        f"{len(tried)} on {router.info['tuning']['inputs']} val inputs (val regret "
        f"{chosen['regret']:.1f} points, {chosen['objective']:.1f} on average over val "
        f"resamples, ACR {chosen['acr']:.3f}; routed {shares}).\n"
        f"the experts' cascade, fitted on the same val inputs "
        f"({router.info['tuning']['cascade_fit']}): stages {stages} (val regret "
        f"{fit['regret']:.1f} points, {fit['objective']:.1f} on average over val resamples, "
        f"ACR {fit['acr']:.3f}); the headline rule of `router "
        f"certify` unless [certify] rule says otherwise.\n"
        f"saved to {folder} (every candidate in tuning.json)\nnext: `router certify`."
    )


def _thresholds(row) -> str:
    return ", ".join(f"{t:g}" for t in row)


def _parse_class_map(text: str | None) -> dict | None:
    if text is None:
        return None
    pairs = [p.partition("=") for p in text.split(",") if p.strip()]
    if not pairs or any(
        not key.strip() or not sep or not value.strip() for key, sep, value in pairs
    ):
        raise typer.BadParameter(
            "use CLASS=EXPERT pairs separated by commas.", param_hint="--class-map"
        )
    return {key.strip(): value.strip() for key, _, value in pairs}


def _print_history(history: list[dict]) -> None:
    view = Table(title="router training")
    for col in ("epoch", "loss", "soft CE", "consistency", "picks best expert"):
        view.add_column(col, justify="right")
    for h in history[-5:]:
        view.add_row(
            str(h["epoch"]),
            f"{h['loss']:.4f}",
            f"{h['soft_ce']:.4f}",
            f"{h['consistency']:.4f}",
            f"{100 * h['picks_best']:.1f}%",
        )
    show_table(view)


@app.command("finetune-expert")
def finetune_cmd(
    ctx: typer.Context,
    names: list[str] = typer.Argument(
        ...,
        help="The experts: Gaussian experts (each trained on the inputs routed to it, "
        "registered as <name>-sigma<σ>), or one model registered at several σ (with --abstain: "
        "one expert).",
    ),
    epochs: int = typer.Option(15, help="Finetuning epochs."),
    batch_size: int = typer.Option(128, "--batch-size", help="Batch size."),
    lr: float = typer.Option(2e-5, help="AdamW learning rate."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
    route_n: int = typer.Option(32, "--route-n", help="Router votes per input to pick σ(x)."),
    seed: int = typer.Option(0, help="Shuffling and noise seed."),
    name: str = typer.Option(None, help="Name of the new experts (default <family>-ft)."),
    replace: bool = typer.Option(
        True, "--replace/--keep", help="Replace the family in the workspace (same positions)."
    ),
    retrain: bool = typer.Option(
        False, "--retrain", help="Then build the new columns and retrain (or refit) the router."
    ),
    abstain: bool = typer.Option(
        False,
        "--abstain",
        help="Teach one expert to abstain (uniform target) on the table rows where it is wrong "
        "and a smaller σ certifies, label cross-entropy elsewhere; no router needed. A gate "
        "router copying it then sends those inputs to the smaller σ.",
    ),
    device: str = DEVICE,
    workspace: Path = WORKSPACE,
) -> None:
    """Finetune a classifier under the router's σ(x) (paper §5.2.2), or teach one to abstain
    where a smaller σ is right (--abstain), and register it."""
    from rsrouter.router.finetune import FinetuneConfig, finetune_workspace
    from rsrouter.router.train import GATE_KINDS, router_kind, router_settings

    ws = Workspace.open(workspace)
    hold_lock(ctx, ws, "finetune-expert")
    config = FinetuneConfig(epochs=epochs, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, route_n=route_n, seed=seed)  # fmt: skip
    refit = retrain and router_kind(router_settings(ws)) in GATE_KINDS
    result = finetune_workspace(ws, list(names), config, name=name, replace=replace,
                                retrain=retrain and not refit, abstain=abstain,
                                device=device)  # fmt: skip
    if abstain:
        console.print(f"abstain target on {result['abstain']} of {result['rows']} table rows "
                      "(wrong here, certified by a smaller σ)")  # fmt: skip
    else:
        console.print(f"inputs routed to each expert: {json.dumps(result['routed'])}")
    console.print(f"loss per epoch: {', '.join(f'{v:.4f}' for v in result['history'])}")
    console.print(f"saved {result['folder']}; registered {', '.join(result['registered'])}.")
    if refit:
        _train_gate(ws, device, {})
    elif retrain:
        _print_history(result["router_history"])
        console.print(f"router retrained: {result['router']}")
    else:
        console.print("next: `router train` (the router must be retrained for the new experts).")
