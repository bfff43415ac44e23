"""Routing designs on a workspace with a val split: tune on val, certify the test split once.

For a workspace made by `examples/fashion_mnist/run.py` (experts, its router and its test run;
the learned designs need the paper's router, `--router-kind learned`), every design below is
tuned on the workspace's val split only, then certified once on the [certify] test inputs;
every composition rule is decided from the same cached counts, so each design gives one row per
rule. Nothing tuned ever reads the test split.

Designs (names for --only):
  learned        the paper's router as the workspace trained it (no tuning)
  learned-bias   the same router with per-expert biases on Phi^-1(q) fitted on val (design b)
  gate           experts that gate themselves: the sigma_e expert's entropy, thresholds fitted
                 on val (design a, `router train --kind gate`)
  class-gate     the same with one threshold row per class the copy predicts on the draw
                 (`router train --kind class-gate`)
  abstain-gate   the gate whose copy of the sigma_e expert was first taught to abstain where a
                 smaller sigma is right (design e; the experts routed to are unchanged). With the
                 expert itself replaced: `router finetune-expert NAME --abstain`, then `gate`.
  cascade        no router: the experts gate themselves on their own smoothed confidence, a
                 threshold per stage and class and the stage order fitted on val (the cascade
                 rule, composition/cascade.py; `router train --kind gate` fits it too)
  cascade-keep   the same rule with the largest sigma first at 1/2 for every class, the later
                 stages' order and thresholds fitted on val (`router train --cascade
                 keep-multiscale`: Multiscale's certificates from that stage are all kept)
  cascade-plain  the same rule unfitted: Multiscale's stages (largest sigma first) and
                 thresholds (all 1/2), where a stage that may fire with the certified class
                 does not stop the cascade (Multiscale itself abstains there)

    python benchmarks/routing_study.py runs/fm/gaussian --out docs/results/routing-fm.json

Printed last: a markdown table with, per design and rule, the worst-case regret to the
single-expert envelope (with its 95 % bootstrap interval over the test inputs), the same over
every radius with no grid (with its interval), the regret at r = 0 / 0.5 / 1 / 1.5, the
largest shortfall below Multiscale on the grid, ACR, routing shares, router abstentions and the
cost per input; the single experts and Multiscale for reference. Every figure is measured in
this run on this machine; the JSON keeps the val fits (every candidate).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from rsrouter.composition.cascade import multiscale_spec
from rsrouter.composition.certify_run import certify_run, certify_settings, run_options
from rsrouter.composition.dual import DualSmoothed
from rsrouter.composition.report import methods, regret, regret_text, summarize
from rsrouter.composition.rules import CASCADE, RULES
from rsrouter.composition.tuning import (
    experts_val_counts,
    fit_biases,
    fit_cascade,
    router_val_counts,
    train_gate_workspace,
)
from rsrouter.errors import UsageError
from rsrouter.io import write_json
from rsrouter.registry import Workspace
from rsrouter.router.finetune import FinetuneConfig, abstain_in_workspace
from rsrouter.router.model import RouterModel
from rsrouter.router.tables import workspace_dataset
from rsrouter.runtime import resolve_device

DESIGNS = ("learned", "learned-bias", "gate", "class-gate", "abstain-gate", "cascade",
           "cascade-keep", "cascade-plain")  # fmt: skip
CASCADE_FIT = {"cascade": "regret", "cascade-keep": "keep-multiscale"}  # fitted on val
# the abstain-gate copy's training (Adam: AdamW without decay), chosen on val
ABSTAIN = FinetuneConfig(epochs=10, batch_size=128, lr=1e-3, weight_decay=0.0)
RADII = ("0", "0.5", "1", "1.5")
GRID = [0.0, 0.5, 1.0, 1.5]


def certify_test(ws, dual, names, device, progress, envelope=None, sample_router=True):
    """The test run's summary; with ``envelope`` (another study's), each method's worst-case
    regret against it too (``regret_reference``). ``sample_router`` False: the cascade alone
    (it reads no router, so none is sampled)."""
    s = certify_settings(ws)
    test = workspace_dataset(ws, s["split"])
    options = {**run_options(s), "sample_router": sample_router}
    if not sample_router:
        options["rule"] = CASCADE  # the one rule such a run decides: its headline
    run = certify_run(dual, test, ws.artifacts, expert_names=names, device=device,
                      progress=progress, **options)  # fmt: skip
    meta = json.loads(run.meta_path.read_text())
    summary = summarize(meta, run.records, grid=GRID)
    if envelope is not None:
        grid, acc = (np.asarray(envelope[k], dtype=float) for k in ("grid", "certified_accuracy"))
        for key, m in methods(meta, run.records).items():
            summary["methods"][key]["regret_reference"] = regret(m["correct"], m["radius"], grid,
                                                                 acc)  # fmt: skip
    return summary


def rows_of(design: str, summary: dict, seconds: float, fit: dict | None) -> list[dict]:
    out = []
    for key, m in summary["methods"].items():
        if not key.startswith("dual"):
            continue
        rule = summary["rule"] if key == "dual" else key.split(":", 1)[1]
        if (rule == CASCADE) != design.startswith("cascade"):  # the cascade reads no router
            continue
        routing = summary["routing_by_method"][key]
        out.append({"design": design, "rule": rule, **m, **routing, "fit": fit,
                    "study_seconds": seconds})  # fmt: skip
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workspace", type=Path)
    p.add_argument("--only", action="append", choices=DESIGNS, help="designs to run (all)")
    p.add_argument("--rule", choices=RULES, default="agreement", help="rule the fits optimise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="write every figure as JSON here")
    p.add_argument("--envelope", type=Path, help="also score against this study JSON's "
                   "envelope (e.g. the experts' before finetuning)")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    envelope = None
    if args.envelope:
        try:
            envelope = json.loads(args.envelope.read_text())["envelope"]
        except (OSError, ValueError, KeyError, TypeError):
            p.error(f"--envelope {args.envelope}: not a routing study JSON with an envelope.")
    ws = Workspace.open(args.workspace)
    device = resolve_device(args.device)
    progress = not args.quiet
    experts = ws.load_experts(device=device)
    names = list(experts)
    learned = RouterModel.from_pretrained(Path(ws.artifacts) / "router", device=device)
    if {"learned", "learned-bias"} & set(args.only or DESIGNS):
        if learned.gate is not None:  # e.g. the fashion_mnist example's default design
            p.error("the workspace's router is a gate router; the learned designs need the "
                    "paper's router (router train --kind learned).")  # fmt: skip
        try:  # the cascade rows read no router, so a stale one only matters to these designs
            learned.check_experts(names, [e.fingerprint for e in experts.values()])
        except UsageError as exc:
            p.error(f"the workspace's router: {exc}")
    rows, reference = [], None
    for design in args.only or DESIGNS:
        start = time.perf_counter()
        fit = None
        if design == "learned":
            dual = DualSmoothed(learned, learned.sigma_e, list(experts.values()), rule=args.rule)
        elif design.startswith("cascade"):
            if design in CASCADE_FIT:
                vc = experts_val_counts(ws, experts, device=device, progress=progress)
                spec, tried = fit_cascade(vc, alpha=_alphas(ws)["alpha"],
                                          fit=CASCADE_FIT[design])  # fmt: skip
                fit = {"cascade": spec.to_dict(), "tried": [t for t in tried if t["kept"]],
                       "tried_count": len(tried)}  # fmt: skip
            else:
                classes = next(iter(experts.values())).num_classes
                spec = multiscale_spec([e.sigma for e in experts.values()], classes)
                fit = {"cascade": spec.to_dict()}
            dual = DualSmoothed(learned, learned.sigma_e, list(experts.values()), rule=CASCADE,
                                cascade=spec)  # fmt: skip
        elif design == "learned-bias":
            vc, sel, est = router_val_counts(ws, learned, experts, device=device,
                                             progress=progress)  # fmt: skip
            biases, tried = fit_biases(sel, est, vc, sigma_e=learned.sigma_e, rule=args.rule,
                                       **_alphas(ws))  # fmt: skip
            fit = {"biases": biases, "tried": tried}
            dual = DualSmoothed(learned, learned.sigma_e, list(experts.values()),
                                rule=args.rule, biases=biases)  # fmt: skip
        else:
            folder = Path(ws.artifacts) / "study" / f"{design}-{args.rule}"
            kind, source, taught = design, None, None
            if design == "abstain-gate":
                kind, source, taught = "gate", *abstain_copy(ws, experts, device, progress)
            gate, tried, _ = train_gate_workspace(ws, device=device, progress=progress,
                                                  folder=folder, rule=args.rule, copy=source,
                                                  router_overrides={"kind": kind})  # fmt: skip
            fit = {"gate": gate.gate, "tried": kept(tried), "tried_count": len(tried),
                   **({"abstain": taught} if taught else {})}  # fmt: skip
            dual = DualSmoothed(gate.to(device), gate.sigma_e, list(experts.values()),
                                rule=args.rule)  # fmt: skip
        summary = certify_test(ws, dual, names, device, progress, envelope,
                               sample_router=not design.startswith("cascade"))  # fmt: skip
        reference = reference or summary
        rows += rows_of(design, summary, time.perf_counter() - start, fit)
        report = {
            "workspace": str(args.workspace),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}",
            "fit_rule": args.rule,
            "designs": rows,
            "reference": {
                k: m for k, m in reference["methods"].items() if not k.startswith("dual")
            },
            "envelope": reference["envelope"],
            "inputs": reference["inputs"],
            "n": reference["n"],
        }
        if envelope:
            report["reference_envelope"] = {"file": str(args.envelope), **envelope}
        if args.out:  # after every design: a long study killed later keeps what it measured
            write_json(args.out, report)
    print(markdown(report, names))
    return 0


def abstain_copy(ws, experts: dict, device, progress: bool):
    """A copy of the sigma_e expert taught to abstain on the workspace's table: (copy, record)."""
    name = max(experts, key=lambda n: experts[n].sigma)
    taught = {**experts, name: copy.deepcopy(experts[name])}
    _, record = abstain_in_workspace(ws, name, taught, ABSTAIN, device, progress)
    return taught[name], record


def kept(tried: list[dict]) -> list[dict]:
    """Every candidate of a gate fit; of a class-gate fit (thousands of rows) the shared rows
    and the descent's kept steps (the router's tuning.json keeps them all)."""
    if not tried or "class" not in tried[0]:
        return tried
    return [t for t in tried if t["class"] is None or t["kept"]]


def _alphas(ws) -> dict:
    s = certify_settings(ws)
    return {"alpha": s["alpha"], "alpha_router": s["alpha_router"]}


def _fmt(m: dict, names) -> list[str]:
    at = " / ".join(f"{-m['regret_at'][r]:.1f}" for r in RADII)
    routed = " / ".join(f"{100 * m['routing'][n]:.0f}" for n in names) if "routing" in m else "—"
    abst = f"{100 * m['abstention']['router']:.1f}" if "abstention" in m else "—"
    fw = m.get("forwards_per_input")
    cost = f"{fw:,.0f} fwd, {m['seconds_per_input']:.2f} s" if fw else "—"
    acc = " / ".join(f"{100 * a:.1f}" for a in m["certified_accuracy"])
    worst = regret_text({**m, "regret": max(m["regret"], 0)})
    every = regret_text({**m, "regret_every_radius": max(m["regret_every_radius"], 0)},
                        "regret_every_radius")  # fmt: skip
    below = f"{m['below_multiscale']:.1f}" if "below_multiscale" in m else "—"
    row = [worst, every, at, acc, below, f"{m['acr']:.3f}", routed, abst, cost]
    if "regret_reference" in m:
        row.append(f"{max(m['regret_reference'], 0):.1f}")
    return row


def markdown(report: dict, names) -> str:
    head = ("| design | rule | worst-case regret [95 % interval] | every r [95 %] "
            "| gap at r=0 / 0.5 / 1 / 1.5 | certified at r=0 / 0.5 / 1 / 1.5 "
            "| below Multiscale, at most | ACR | routed "
            + " / ".join(names)
            + " (%) | router abst. (%) | cost per input |")  # fmt: skip
    columns = 11
    if "reference_envelope" in report:
        head += " regret to the reference envelope |"
        columns += 1
    lines = [head, "|" + "---|" * columns]
    for r in report["designs"]:
        lines.append("| " + " | ".join([r["design"], r["rule"], *_fmt(r, names)]) + " |")
    for m in report["reference"].values():
        lines.append("| " + " | ".join([m["label"], "—", *_fmt(m, names)]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
