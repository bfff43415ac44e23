"""How close any Multiscale-keeping cascade could come to the envelope, from a workspace's counts.

A cascade whose first stage is the largest sigma at tau = 1/2 for every class keeps every
certificate Multiscale gives with that sigma (`router train --cascade keep-multiscale`,
docs/composition-rules.md). This script bounds what that whole family can certify at each radius
(`baselines.keep_multiscale_ceiling`: per input, the best any member certifies the label) and
compares it with the single-expert envelope, on the val split and on the test inputs a certify
run has sampled. It reads the labels and fits nothing: the ceiling is not a certificate, and
the test counts are read only to say how far the family can go, never to choose a design.
Beside it, two members: cascade-plain (Multiscale's spec) and the keep-multiscale fit on val.

    python benchmarks/cascade_ceiling.py runs/fm/gaussian --out ceiling.json

`--plug-in` scores the same with every bound replaced by its point estimate (an expert's
certificate then has radius sigma Phi^-1(p-hat)): an estimate of the n -> infinity limit of
these experts, for telling what more Monte-Carlo samples could buy from what only other
experts could. Printed last: per split and per kind (bounds, plug-in), the envelope, the
ceiling and both members at each radius of the report's grid up to --show, and each one's
worst-case regret over the whole grid. Every figure is computed in this run from cached
counts (no model is run except for missing val counts).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import numpy as np
import torch
from scipy.special import ndtri

from rsrouter import distributed
from rsrouter.composition.baselines import KEEP_CEILING_LABEL, keep_multiscale_ceiling
from rsrouter.composition.cascade import (
    StageBounds,
    bounds_of,
    certify_cascade,
    multiscale_spec,
)
from rsrouter.composition.certify_run import CountsCache, certify_settings, expert_counts_path
from rsrouter.composition.report import (
    certified_accuracy,
    envelope,
    radius_grid,
    regret_intervals,
)
from rsrouter.composition.tuning import (
    ValidationCounts,
    expert_certificates,
    experts_val_counts,
    fit_cascade,
)
from rsrouter.errors import UsageError
from rsrouter.io import write_json
from rsrouter.registry import Workspace
from rsrouter.router.tables import workspace_dataset
from rsrouter.runtime import resolve_device
from rsrouter.smoothing import check_count, uses_bf16


def cached_test_counts(ws, experts: dict, s: dict, limit: int | None, device) -> ValidationCounts:
    """Every expert's cached counts on the first ``limit`` test inputs, as a certify run of the
    workspace (``s``: its [certify] settings) sampled them on ``device`` (bf16 autocast on
    CUDA, float32 elsewhere)."""
    test = workspace_dataset(ws, s["split"])
    size = len(test.labels) if limit is None else min(int(limit), len(test.labels))
    root = Path(ws.artifacts) / "certify"
    ctx = distributed.context()
    sel, est = [], []
    for name, e in experts.items():
        path = expert_counts_path(root, e.fingerprint, test, s["n0"], s["n"], s["seed"],
                                  uses_bf16(device))  # fmt: skip
        have = CountsCache(path, ctx).have
        missing = [i for i in range(size) if i not in have]
        if missing:
            raise UsageError(
                f"expert {name!r} has no cached test counts for {len(missing)} of the first "
                f"{size} inputs: certify them first (router certify), or lower --limit."
            )
        sel.append(np.array([have[i]["selection_counts"] for i in range(size)]))
        est.append(np.array([have[i]["counts"] for i in range(size)]))
    labels = test.labels[:size].numpy()
    return ValidationCounts(labels, sel, est, [e.sigma for e in experts.values()])


def plug_in(vc: ValidationCounts):
    """(stage bounds, each expert's (prediction, radius)) with every bound replaced by the point
    estimate from the estimation counts, kept half a count inside (0, 1) (an input whose n
    draws all agree would otherwise get an infinite radius): not a certificate."""
    bounds, pred, rad = [], [], []
    for est, sigma in zip(vc.estimation, vc.sigmas, strict=True):
        n = est.sum(axis=1, keepdims=True)
        p = np.clip(est / n, 0.5 / n, 1 - 0.5 / n)
        top = est.argmax(axis=1)
        share = p[np.arange(len(top)), top]
        bounds.append(StageBounds(top, share, p, float(sigma)))
        pred.append(np.where(share > 0.5, top, -1))
        rad.append(np.where(share > 0.5, sigma * ndtri(share), 0.0))
    return bounds, (np.stack(pred), np.stack(rad))


def score(vc: ValidationCounts, alpha: float, specs: dict, step: float, plugin: bool) -> dict:
    """Certified accuracy (%) on the report's grid of the envelope, the ceiling and each spec,
    and each one's worst-case regret with its 95 % paired bootstrap interval over the inputs."""
    y = vc.labels
    singles = expert_certificates(vc, alpha)
    grid = radius_grid(float(singles[1].max()), step)  # the report's grid, either way
    if plugin:
        bounds, singles = plug_in(vc)
    else:
        bounds = bounds_of(vc.selection, vc.estimation, vc.sigmas, alpha)
    table = {f"expert:{i}": {"correct": p == y, "radius": r}
             for i, (p, r) in enumerate(zip(*singles, strict=True))}  # fmt: skip
    ceiling = keep_multiscale_ceiling(bounds, y)
    table["ceiling"] = {"correct": ceiling > 0, "radius": ceiling}
    for name, spec in specs.items():
        pred, radius, _ = certify_cascade(bounds, spec)
        table[name] = {"correct": pred == y, "radius": radius}
    env = envelope([(t["correct"], t["radius"]) for k, t in table.items()
                    if k.startswith("expert:")], grid)  # fmt: skip
    curves = {"envelope": env}
    curves |= {k: certified_accuracy(t["correct"], t["radius"], grid) for k, t in table.items()
               if not k.startswith("expert:")}  # fmt: skip
    intervals = regret_intervals(table, grid)
    return {
        "grid": grid,
        "certified_accuracy": {k: [round(100 * float(v), 3) for v in c] for k, c in curves.items()},
        "regret": {
            k: round(100 * float(np.max(env - c)), 3) for k, c in curves.items() if k != "envelope"
        },
        "regret_interval": {
            k: [round(v, 3) for v in intervals[k]] for k in curves if k != "envelope"
        },  # fmt: skip
    }


def markdown(out: dict, show: float) -> str:
    lines = []
    for key, block in out["splits"].items():
        grid = block["grid"]
        cols = [i for i, r in enumerate(grid) if r <= show + 1e-9]
        lines += [
            f"\n{key} ({block['inputs']} inputs)\n",
            "| | worst-case regret [95 %] | " + " | ".join(f"r={grid[i]:g}" for i in cols) + " |",
            "|---|---|" + "---|" * len(cols),
        ]
        acc = block["certified_accuracy"]
        for name, curve in acc.items():
            worst = ""
            if name != "envelope":
                lo, hi = block["regret_interval"][name]
                worst = f"{block['regret'][name]:.2f} [{lo:.1f}, {hi:.1f}]"
            lines.append(f"| {name} | {worst} | " + " | ".join(f"{curve[i]:.2f}" for i in cols)
                         + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workspace", type=Path)
    p.add_argument("--limit", type=int, help="test inputs (default: [certify] limit)")
    p.add_argument("--step", type=float, default=0.25, help="the regret grid's step")
    p.add_argument("--show", type=float, default=1.0, help="print radii up to this one")
    p.add_argument("--plug-in", action="store_true", help="also with point estimates")
    p.add_argument("--device", default="cpu", help="where the counts were sampled (and missing "
                   "val counts are)")  # fmt: skip
    p.add_argument("--out", type=Path, help="write every figure as JSON here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not args.step > 0:
        p.error(f"--step must be positive, got {args.step}.")
    try:
        if args.limit is not None:
            check_count("limit", args.limit)
        ws = Workspace.open(args.workspace)
        device = resolve_device(args.device)
        experts = ws.load_experts(device=device)
        settings = certify_settings(ws)
        alpha = settings["alpha"]
        limit = args.limit if args.limit is not None else settings["limit"]
        val = experts_val_counts(ws, experts, device=device, progress=not args.quiet)
        classes = next(iter(experts.values())).num_classes
        keep, _ = fit_cascade(val, alpha=alpha, fit="keep-multiscale")
        specs = {"cascade-plain": multiscale_spec(val.sigmas, classes), "cascade-keep": keep}
        splits = {"val": val, "test": cached_test_counts(ws, experts, settings, limit, device)}
    except UsageError as exc:
        p.exit(2, f"cascade_ceiling: {exc}\n")
    out = {
        "workspace": str(args.workspace),
        "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}",
        "what": f"'ceiling': {KEEP_CEILING_LABEL}; 'plug-in': every bound replaced by its "
        "point estimate (not a certificate)",
        "experts": {name: e.sigma for name, e in experts.items()},
        "n0": settings["n0"],
        "n": settings["n"],
        "alpha": alpha,
        "keep_multiscale_fit": keep.to_dict(),
        "splits": {},
    }
    for name, vc in splits.items():
        for plugin in (False, True) if args.plug_in else (False,):
            key = f"{name}, plug-in" if plugin else name
            out["splits"][key] = {"inputs": len(vc.labels),
                                  **score(vc, alpha, specs, args.step, plugin)}  # fmt: skip
    if args.out:
        write_json(args.out, out)
    print(markdown(out, args.show))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
