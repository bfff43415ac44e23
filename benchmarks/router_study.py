"""Router study on a `router demo` workspace: train routers with other settings, certify each.

Every variant trains a router on the workspace's radius tables (cached; nothing is recomputed)
into ``<artifacts>/study/<name>/`` and certifies the workspace's [certify] test inputs with it.
The experts' test counts are cached in ``<artifacts>/certify/experts/``, so a variant costs its
router training plus one router pass. Printed per variant: the routing shares, router
abstention, dual − best single expert (points) at r = 0, 0.5, 1, 1.5, and the ACRs.

    router demo --workspace /tmp/demo                 # once: experts, tables, test counts
    python benchmarks/router_study.py /tmp/demo       # every variant of VARIANTS
    python benchmarks/router_study.py /tmp/demo --only T0.1 --only base

Every figure printed is measured in this run (train-set numbers are on the table's rows; test
numbers come from the certification records).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rsrouter.registry import Workspace
from rsrouter.router.certify_run import certify_run, certify_settings
from rsrouter.router.dual import DualSmoothed
from rsrouter.router.report import summarize
from rsrouter.router.tables import workspace_dataset, workspace_tables
from rsrouter.router.train import RouterTrainConfig, build_router, router_settings, train_router

RADII = (0.0, 0.5, 1.0, 1.5)

INIT = {"init": "gauss-sigma1", "arch_args": {"width": 16}}
# name -> ([train] overrides, [router] overrides); the workspace's own settings underneath
VARIANTS: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "ep60": ({"epochs": 60}, {}),
    "T0.1": ({"soft_label_scale": 0.1}, {}),
    "lam0": ({"consistency_lambda": 0.0, "consistency_eta": 0.0}, {}),
    "lam4": ({"consistency_lambda": 4.0}, {}),
    "nobal": ({"balance": False}, {}),
    "ep60-T0.1": ({"epochs": 60, "soft_label_scale": 0.1}, {}),
    "ep60-T0.1-lam0": ({"epochs": 60, "soft_label_scale": 0.1, "consistency_lambda": 0.0}, {}),
    "lr1e-3": ({"lr": 1e-3}, {}),
    "lr1e-3-ep30": ({"lr": 1e-3, "epochs": 30}, {}),
    "lr1e-3-ep60": ({"lr": 1e-3, "epochs": 60}, {}),
    "lr1e-3-ep60-T0.3": ({"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.3}, {}),
    "lr1e-3-ep60-T0.1": ({"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1}, {}),
    "lr1e-3-ep60-T0.1-lam4": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1, "consistency_lambda": 4.0},
        {},
    ),
    "lr1e-3-ep60-T0.1-lam0": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1, "consistency_lambda": 0.0},
        {},
    ),
    "lr1e-3-ep60-T0.1-nobal": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1, "balance": False},
        {},
    ),
    "lr1e-3-ep60-T0.1-w16": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1},
        {"arch_args": {"width": 16}},
    ),
    "lr1e-3-ep60-T0.1-lam100": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1, "consistency_lambda": 100.0},
        {},
    ),
    "lr1e-3-ep60-T0.1-wr-none": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1, "consistency_weight": "none"},
        {},
    ),
    "lr1e-3-ep60-T0.1-se0.75": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1},
        {"sigma_e": 0.75},
    ),
    "lr1e-3-ep60-T0.1-se0.5": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1},
        {"sigma_e": 0.5},
    ),
    # the router starts from the sigma = 1 expert's weights (same small_cnn, width 16)
    "init": ({}, INIT),
    "init-lr1e-3": ({"lr": 1e-3}, INIT),
    "init-lr1e-3-ep30": ({"lr": 1e-3, "epochs": 30}, INIT),
    "init-lr1e-3-ep30-T0.3": ({"lr": 1e-3, "epochs": 30, "soft_label_scale": 0.3}, INIT),
    "init-lr1e-3-ep30-T0.1": ({"lr": 1e-3, "epochs": 30, "soft_label_scale": 0.1}, INIT),
    "init-lr1e-3-ep30-T0.1-lam0": (
        {"lr": 1e-3, "epochs": 30, "soft_label_scale": 0.1, "consistency_lambda": 0.0},
        INIT,
    ),
    "init-lr1e-3-ep30-T0.1-nobal": (
        {"lr": 1e-3, "epochs": 30, "soft_label_scale": 0.1, "balance": False},
        INIT,
    ),
}


def table_stats(table) -> dict:
    """Share of kept rows whose best expert is each one, and the soft labels' mean entropy."""
    keep = table.certified
    radii = table.radii[keep].float()
    best = radii.argmax(1)
    shares = {n: float((best == e).float().mean()) for e, n in enumerate(table.names)}
    return {"rows": len(table.indices), "kept": int(keep.sum()), "best_share": shares}


def evaluate(ws, router, experts, names) -> dict:
    """Certify the workspace's test inputs with ``router`` over the cached expert counts."""
    s = certify_settings(ws)
    dual = DualSmoothed(router, router.sigma_e, list(experts.values()))
    run = certify_run(
        dual,
        workspace_dataset(ws, s["split"]),
        ws.artifacts,
        n0=s["n0"],
        n=s["n"],
        alpha=s["alpha"],
        alpha_router=s["alpha_router"],
        seed=s["seed"],
        limit=s["limit"],
        p_skip=s["p_skip"],
        expert_names=names,
        chunk=s["chunk"],
        progress=False,
        batch_size=s["batch_size"],
        device="cpu",
    )
    meta = json.loads(run.meta_path.read_text())
    return summarize(meta, run.records, grid=list(RADII))


def row(name: str, summary: dict, history: list[dict], seconds: float) -> dict:
    m = summary["methods"]
    singles = [k for k in m if k.startswith("expert:")]
    return {
        "variant": name,
        "routing": {k: round(v, 3) for k, v in summary["routing"].items()},
        "router_abstain": round(summary["abstention"]["router"], 3),
        "gap": {
            f"{r:g}": round(100 * g, 1)
            for r, g in zip(RADII, summary["gap_to_best_single"], strict=True)
        },
        "dual": [round(100 * v, 1) for v in m["dual"]["certified_accuracy"]],
        "acr_dual": round(m["dual"]["acr"], 3),
        "acr_best_single": round(max(m[k]["acr"] for k in singles), 3),
        "train_picks_best": round(history[-1]["picks_best"], 3),
        "train_seconds": round(seconds, 1),
    }


def markdown(rows: list[dict], names: list[str]) -> str:
    head = (
        "| variant | routing "
        + " / ".join(names)
        + " (%) | router abst. | "
        + " | ".join(f"gap r={r:g}" for r in RADII)
        + " | ACR dual | ACR best single | train picks best |"
    )
    lines = [head, "|" + "---|" * (len(RADII) + 6)]
    for r in rows:
        shares = " / ".join(f"{100 * r['routing'][n]:.0f}" for n in names)
        gaps = " | ".join(f"{g:+.1f}" for g in r["gap"].values())
        lines.append(
            f"| {r['variant']} | {shares} | {100 * r['router_abstain']:.1f} | {gaps} | "
            f"{r['acr_dual']:.3f} | {r['acr_best_single']:.3f} | {r['train_picks_best']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--only", action="append", help="run only these variants (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ws = Workspace.open(args.workspace)
    experts = ws.load_experts(device="cpu")
    names = list(experts)
    table, dataset = workspace_tables(ws, experts=experts, device="cpu", progress=False)
    print("train table:", json.dumps(table_stats(table)))
    rows = []
    for name, (train_over, router_over) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        config = RouterTrainConfig.from_settings(ws.settings("train"), **train_over)
        settings = router_settings(ws, **router_over)
        router = build_router(experts, settings, seed=config.seed)
        start = time.perf_counter()
        history = train_router(
            router, table, dataset.images, Path(ws.artifacts) / "study" / name, config,
            progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        rows.append(row(name, evaluate(ws, router, experts, names), history, seconds))
        print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows, names))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
