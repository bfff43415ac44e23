"""Reports from a certification run's records: tables, ACR, routing, abstentions, a plot.

Pure functions on the records (``summarize``, ``certified_accuracy``, ``to_markdown``, ...)
and one writer (``write_report``) for ``<artifacts>/report/``. Certified accuracy at r is the
fraction of ALL inputs that are correct (not abstained) with radius >= r; ACR = mean(correct * R).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from rsrouter.composition.baselines import MULTISCALE_LABEL, ORACLE_LABEL
from rsrouter.errors import UsageError
from rsrouter.io import atomic_path, write_json, write_text

STEP = 0.25
MAX_GRID = 1000  # radius columns of a report: a tiny step would write (and print) megabytes


def radius_grid(max_radius: float, step: float = STEP) -> list[float]:
    """0, step, 2 step, ... up to the largest radius seen (always at least [0])."""
    if not step > 0:
        raise UsageError(f"the radius step must be positive, got {step!r}.")
    top = math.floor(max(max_radius, 0.0) / step + 1e-9)
    if top + 1 > MAX_GRID:
        raise UsageError(
            f"a radius step of {step:g} up to radius {max_radius:.3g} gives {top + 1} columns "
            f"(at most {MAX_GRID}): use a larger step."
        )
    return [round(k * step, 10) for k in range(top + 1)]


def certified_accuracy(correct, radius, grid) -> np.ndarray:
    """Fraction of all inputs that are correct with radius >= r, for each r of ``grid``."""
    correct, radius = np.asarray(correct, dtype=bool), np.asarray(radius, dtype=np.float64)
    if len(correct) == 0:
        return np.zeros(len(grid))
    return np.array([float(np.mean(correct & (radius >= r))) for r in grid])


def acr(correct, radius) -> float:
    """Average certified radius: mean(correct * R) over all inputs."""
    correct, radius = np.asarray(correct, dtype=bool), np.asarray(radius, dtype=np.float64)
    return float(np.mean(correct * radius)) if len(correct) else 0.0


def methods(meta: dict, records: list[dict]) -> dict[str, dict]:
    """Per method: label, correct, radius, seconds (arrays over the records, in order)."""

    def col(get):
        return np.array([get(r) for r in records])

    out = {
        "dual": {
            "label": f"Dual RS (router sigma_e={meta['sigma_e']:g})",
            "correct": col(lambda r: r["correct"]),
            "radius": col(lambda r: r["radius"]),
            "seconds": col(lambda r: r["seconds"]),
        }
    }
    for i, (name, sigma) in enumerate(zip(meta["experts"], meta["sigmas"], strict=True)):
        out[f"expert:{name}"] = {
            "label": f"{name} alone (sigma={sigma:g})",
            "correct": col(lambda r, i=i: r["baselines"]["experts"][i]["correct"]),
            "radius": col(lambda r, i=i: r["baselines"]["experts"][i]["radius"]),
            "seconds": col(lambda r, i=i: r["baselines"]["experts"][i]["seconds"]),
        }
    out["multiscale"] = {
        "label": MULTISCALE_LABEL,
        "correct": col(lambda r: r["baselines"]["multiscale"]["correct"]),
        "radius": col(lambda r: r["baselines"]["multiscale"]["radius"]),
        "seconds": col(lambda r: r["baselines"]["multiscale"]["seconds"]),
    }
    out["oracle"] = {
        "label": ORACLE_LABEL,
        "correct": col(lambda r: r["baselines"]["oracle"]["correct"]),
        "radius": col(lambda r: r["baselines"]["oracle"]["radius"]),
        "seconds": None,
    }
    return out


def summarize(
    meta: dict, records: list[dict], grid: list[float] | None = None, step: float = STEP
) -> dict:
    """Every number of the report, JSON-ready (grid: 0, step, ... up to the largest radius)."""
    if not records:
        raise UsageError("the run has no records yet; run `router certify` first.")
    table = methods(meta, records)
    if grid is None:
        grid = radius_grid(max(float(m["radius"].max()) for m in table.values()), step)
    summary_methods = {
        key: {
            "label": m["label"],
            "certified_accuracy": certified_accuracy(m["correct"], m["radius"], grid).tolist(),
            "acr": acr(m["correct"], m["radius"]),
            "seconds_per_input": None if m["seconds"] is None else float(np.mean(m["seconds"])),
        }
        for key, m in table.items()
    }
    singles = [k for k in table if k.startswith("expert:")]
    best = [
        max(singles, key=lambda k, j=j: summary_methods[k]["certified_accuracy"][j])
        for j in range(len(grid))
    ]
    dual_acc = summary_methods["dual"]["certified_accuracy"]
    gap = [dual_acc[j] - summary_methods[k]["certified_accuracy"][j] for j, k in enumerate(best)]
    size = len(records)
    routed = np.array([r["expert"] for r in records])
    expert_abstain = sum(
        1 for r in records if r["expert"] >= 0 and r["expert_counts"]["prediction"] < 0
    )
    return {
        "run": meta.get("run"),
        "dataset": meta.get("dataset"),
        "inputs": size,
        "n0": meta["n0"],
        "n": meta["n"],
        "alpha": meta["alpha"],
        "alpha_router": meta["alpha_router"],
        "alpha_expert": meta["alpha_expert"],
        "sigma_e": meta["sigma_e"],
        "p_skip": meta.get("p_skip"),
        "grid": list(grid),
        "methods": summary_methods,
        "best_single": best,
        "gap_to_best_single": gap,
        "routing": {name: float(np.mean(routed == i)) for i, name in enumerate(meta["experts"])},
        "abstention": {
            "router": float(np.mean(routed < 0)),
            "expert": expert_abstain / size,
            "expert_among_routed": expert_abstain / max(1, int(np.sum(routed >= 0))),
        },
    }


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def to_markdown(summary: dict) -> str:
    grid = summary["grid"]
    head = "| method | " + " | ".join(f"r={r:g}" for r in grid) + " | ACR | s/input |"
    lines = [
        f"# Certified accuracy (%) on {summary['inputs']} inputs",
        "",
        f"n0={summary['n0']}, n={summary['n']}, alpha={summary['alpha']:g} (dual: router "
        f"{summary['alpha_router']:g} + expert {summary['alpha_expert']:g}), "
        f"sigma_e={summary['sigma_e']:g}. Abstentions count as wrong.",
        "",
        head,
        "|" + "---|" * (len(grid) + 3),
    ]
    for m in summary["methods"].values():
        secs = m["seconds_per_input"]
        cells = [_pct(v) for v in m["certified_accuracy"]]
        lines.append(
            f"| {m['label']} | "
            + " | ".join(cells)
            + f" | {m['acr']:.3f} | {'—' if secs is None else f'{secs:.3g}'} |"
        )
    gap = " | ".join(f"{100 * g:+.1f}" for g in summary["gap_to_best_single"])
    lines.append(f"| dual − best single expert (points) | {gap} | | |")
    lines += ["", "## Routing", "", "| expert | share of inputs |", "|---|---|"]
    lines += [f"| {k} | {_pct(v)} % |" for k, v in summary["routing"].items()]
    ab = summary["abstention"]
    lines += [
        f"| router abstained | {_pct(ab['router'])} % |",
        "",
        f"Abstentions: router {_pct(ab['router'])} % of inputs; routed expert "
        f"{_pct(ab['expert'])} % of inputs ({_pct(ab['expert_among_routed'])} % of routed ones).",
        "",
        "s/input is the sampling time per input (dual: router + routed expert; Multiscale: the "
        "stages it evaluated). The oracle reads the label: it is not a certificate.",
        "",
    ]
    return "\n".join(lines)


def to_csv(summary: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "label", *[f"r={r:g}" for r in summary["grid"]], "acr"])
    for key, m in summary["methods"].items():
        writer.writerow(
            [key, m["label"], *[f"{v:.6f}" for v in m["certified_accuracy"]], f"{m['acr']:.6f}"]
        )
    writer.writerow(
        ["gap", "dual − best single expert", *[f"{g:.6f}" for g in summary["gap_to_best_single"]],
         ""]
    )  # fmt: skip
    return buf.getvalue()


def plot(meta: dict, records: list[dict], path: str | Path) -> None:
    """Certified accuracy vs radius for every method, as a PNG (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = methods(meta, records)
    top = max(float(m["radius"].max()) for m in table.values())
    radii = np.linspace(0, max(top, STEP) * 1.05, 300)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, m in table.items():
        style = {"linestyle": "--", "color": "grey"} if key == "oracle" else {}
        if key == "dual":
            style = {"linewidth": 2.5, "color": "black"}
        ax.plot(radii, 100 * certified_accuracy(m["correct"], m["radius"], radii),
                label=m["label"], **style)  # fmt: skip
    ax.set_xlabel("radius (L2, [0, 1] pixels)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(f"{len(records)} inputs, n={meta['n']}, alpha={meta['alpha']:g}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_report(
    meta: dict,
    records: list[dict],
    out_dir: str | Path,
    grid: list[float] | None = None,
    step: float = STEP,
) -> dict[str, Path]:
    """certified_accuracy.md/.csv, summary.json and curve.png under ``out_dir``."""
    out = Path(out_dir)
    summary = summarize(meta, records, grid, step)
    paths = {
        "markdown": out / "certified_accuracy.md",
        "csv": out / "certified_accuracy.csv",
        "summary": out / "summary.json",
        "plot": out / "curve.png",
    }
    write_text(paths["markdown"], to_markdown(summary))
    write_text(paths["csv"], to_csv(summary))
    write_json(paths["summary"], summary)
    plot(meta, records, paths["plot"])
    return paths
