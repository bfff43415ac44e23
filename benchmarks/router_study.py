"""Router study on a `router demo` workspace: train routers with other settings, certify each.

Every variant trains a router on the workspace's radius tables (cached; nothing is recomputed)
into ``<artifacts>/study/<name>/`` and certifies the workspace's [certify] test inputs with it.
The experts' test counts are cached in ``<artifacts>/certify/experts/``, so a variant costs its
router training plus one router pass. Printed per variant: the routing shares, router
abstention, dual − best single expert (points) at r = 0, 0.5, 1, 1.5, dual's certified
accuracy there, the same for an uncertified use of the router's votes (a diagnostic: what the
routing decisions would give if certifying the router cost nothing), and the ACRs.

    router demo --workspace /tmp/demo                 # once: experts, tables, test counts
    python benchmarks/router_study.py /tmp/demo       # every variant of VARIANTS
    python benchmarks/router_study.py /tmp/demo --only T0.1 --only base

Every figure printed is measured in this run (train-set numbers are on the table's rows; test
numbers come from the certification records).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from rsrouter.composition.certify_run import certify_run, certify_settings, run_options
from rsrouter.composition.dual import DualSmoothed
from rsrouter.composition.report import summarize
from rsrouter.registry import Workspace
from rsrouter.router.tables import workspace_dataset, workspace_tables
from rsrouter.router.train import (
    RouterTrainConfig,
    build_router,
    router_settings,
    soft_labels,
    train_router,
)
from rsrouter.runtime import resolve_device

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
    "lr1e-3-ep60-T0.1-lam200": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1, "consistency_lambda": 200.0},
        {},
    ),
    "lr1e-3-ep120-T0.1-lam100": (
        {"lr": 1e-3, "epochs": 120, "soft_label_scale": 0.1, "consistency_lambda": 100.0},
        {},
    ),
    "lr1e-3-ep60-T0.1-lam100-m4": (
        {
            "lr": 1e-3,
            "epochs": 60,
            "soft_label_scale": 0.1,
            "consistency_lambda": 100.0,
            "noise_copies": 4,
        },
        {},
    ),
    "lr1e-3-ep60-T0.1-lam400": (
        {"lr": 1e-3, "epochs": 60, "soft_label_scale": 0.1, "consistency_lambda": 400.0},
        {},
    ),
    "lr1e-3-ep60-T0.1-lam100-eta5": (
        {
            "lr": 1e-3,
            "epochs": 60,
            "soft_label_scale": 0.1,
            "consistency_lambda": 100.0,
            "consistency_eta": 5.0,
        },
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
    # the same start, only the output layer trained: a probe on the sigma = 1 expert's features
    "init-probe": ({"head_only": True}, INIT),
    "init-probe-T0.1": ({"head_only": True, "soft_label_scale": 0.1}, INIT),
}
# class-map routers: a copy of the sigma = 1 expert whose predicted class picks the expert (no
# training); the class groups come from the train table's best expert per class (Shirt: 0.25;
# Pullover, Coat: split; the other classes: 1)
TOPS = ("T-shirt/top", "Pullover", "Coat", "Shirt")
VARIANTS |= {
    "classmap-shirt0.25": ({}, {"kind": "class-map", "class_map": {"Shirt": "gauss-sigma0.25"}}),
    "classmap-shirt0.25-pullcoat0.5": (
        {},
        {
            "kind": "class-map",
            "class_map": {
                "Shirt": "gauss-sigma0.25",
                "Pullover": "gauss-sigma0.5",
                "Coat": "gauss-sigma0.5",
            },
        },
    ),  # fmt: skip
    "classmap-tops0.5": (
        {},
        {"kind": "class-map", "class_map": dict.fromkeys(TOPS, "gauss-sigma0.5")},
    ),
    "classmap-tops0.25": (
        {},
        {"kind": "class-map", "class_map": dict.fromkeys(TOPS, "gauss-sigma0.25")},
    ),
    "classmap-shirt0.25-tops0.5": (
        {},
        {
            "kind": "class-map",
            "class_map": {**dict.fromkeys(TOPS, "gauss-sigma0.5"), "Shirt": "gauss-sigma0.25"},
        },
    ),
}


def table_stats(table, class_names) -> dict:
    """Over the kept rows: the share whose best expert is each one (overall and per class), and
    the soft labels' mean entropy at a few label scales T (uniform = log E)."""
    keep = table.certified
    radii, labels = table.radii[keep].float(), table.labels[keep]
    best = radii.argmax(1)

    def shares(mask):
        return [round(float((best[mask] == e).float().mean()), 2) for e in range(len(table.names))]

    entropy = {}
    for t in (1.0, 0.3, 0.1):
        y = soft_labels(radii, t)
        entropy[f"T={t:g}"] = round(float(-(y * y.clamp_min(1e-12).log()).sum(1).mean()), 3)
    return {
        "rows": len(table.indices),
        "kept": int(keep.sum()),
        "experts": list(table.names),
        "best_share": shares(torch.ones_like(best, dtype=torch.bool)),
        "best_share_by_class": {
            name: shares(labels == c) for c, name in enumerate(class_names) if (labels == c).any()
        },
        "soft_label_entropy": entropy,
        "uniform_entropy": round(math.log(len(table.names)), 3),
    }


def evaluate(ws, router, experts, names, device) -> dict:
    """Certify the workspace's test inputs with ``router`` over the cached expert counts."""
    s = certify_settings(ws)
    dual = DualSmoothed(router, router.sigma_e, list(experts.values()))
    run = certify_run(
        dual,
        workspace_dataset(ws, s["split"]),
        ws.artifacts,
        expert_names=names,
        progress=False,
        device=device,
        **run_options(s),
    )
    meta = json.loads(run.meta_path.read_text())
    return summarize(meta, run.records, grid=list(RADII)), run.records


def uncertified_routing(records: list[dict]) -> list[float]:
    """Diagnostic, NOT a certificate: accuracy at RADII if every input went to the router's
    most-voted expert (no router abstention, no R_sigma cap, the expert at the full alpha).
    Its distance to the dual row is what certifying the router costs."""
    out = []
    for r in RADII:
        hits = 0
        for rec in records:
            votes = rec["router"]["counts"]
            e = rec["baselines"]["experts"][max(range(len(votes)), key=votes.__getitem__)]
            hits += bool(e["correct"] and e["radius"] >= r)
        out.append(round(100 * hits / len(records), 1))
    return out


def row(name: str, result, history: list[dict], seconds: float) -> dict:
    summary, records = result
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
        "uncertified_routing": uncertified_routing(records),
        "acr_dual": round(m["dual"]["acr"], 3),
        "acr_best_single": round(max(m[k]["acr"] for k in singles), 3),
        "train_picks_best": round(history[-1]["picks_best"], 3) if history else None,
        "train_seconds": round(seconds, 1),
    }


def markdown(rows: list[dict], names: list[str]) -> str:
    head = (
        "| variant | routing "
        + " / ".join(names)
        + " (%) | router abst. | "
        + " | ".join(f"gap r={r:g}" for r in RADII)
        + " | dual (%) | uncertified routing (%) | ACR dual | ACR best single |"
        + " train picks best |"
    )
    lines = [head, "|" + "---|" * (len(RADII) + 8)]
    for r in rows:
        shares = " / ".join(f"{100 * r['routing'][n]:.0f}" for n in names)
        gaps = " | ".join(f"{g:+.1f}" for g in r["gap"].values())
        lines.append(
            f"| {r['variant']} | {shares} | {100 * r['router_abstain']:.1f} | {gaps} | "
            f"{' / '.join(f'{v:g}' for v in r['dual'])} | "
            f"{' / '.join(f'{v:g}' for v in r['uncertified_routing'])} | {r['acr_dual']:.3f} | "
            f"{r['acr_best_single']:.3f} | "
            f"{'—' if r['train_picks_best'] is None else format(r['train_picks_best'], '.2f')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--only", action="append", help="run only these variants (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    unknown = sorted(set(args.only or ()) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    ws = Workspace.open(args.workspace)
    experts = ws.load_experts(device="cpu")
    names = list(experts)
    table, dataset = workspace_tables(ws, experts=experts, device="cpu", progress=False)
    print("train table:", json.dumps(table_stats(table, dataset.class_names)))
    rows = []
    for name, (train_over, router_over) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        config = RouterTrainConfig.from_settings(ws.settings("train"), **train_over)
        settings = router_settings(ws, **router_over)
        router = build_router(
            experts, settings, seed=config.seed, info={"class_names": list(dataset.class_names)}
        )
        start = time.perf_counter()
        history = train_router(
            router, table, dataset.images, Path(ws.artifacts) / "study" / name, config,
            device=device, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        rows.append(row(name, evaluate(ws, router, experts, names, device), history, seconds))
        print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows, names))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
