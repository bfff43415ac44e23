"""Reports from a certification run's records: tables, ACR, regret, cost, routing, a plot.

Pure functions on the records (``summarize``, ``certified_accuracy``, ``to_markdown``, ...)
and one writer (``write_report``) for ``<artifacts>/report/``. Certified accuracy at r is the
fraction of ALL inputs that are correct (not abstained) with radius >= r; ACR = mean(correct * R).

Regret: the envelope at r is the best single expert's certified accuracy at r (each expert at
the full alpha); a method's regret is its largest shortfall from the envelope, in points, over
the grid 0, step, ... up to the largest radius any expert certifies (<= 0: at or above the
envelope everywhere); ``regret_every_radius`` is the same over every radius, no grid. The 95 %
interval of each (``regret_intervals``) is a paired bootstrap over the inputs, the envelope
recomputed on each resample: how much the figure moves with the sample of inputs, not a
certificate.
Cost: model forward passes per input (router + the experts a method reads), and the sampling
seconds the records hold.
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
from rsrouter.smoothing import check_count

STEP = 0.25
REGRET_AT = (0.0, 0.5, 1.0, 1.5)  # radii whose regret every report shows on its own
RULE_LABELS = {
    "min": "min(R_sigma, R_c), the paper's Theorem 4.2",
    "pairwise": "pairwise router radius",
    "agreement": "agreement-aware",
}
CASCADE_LABEL = "class-aware cascade of the experts (thresholds fitted on val, no router)"
BOOTSTRAP = 1000  # resamples of the regret's interval
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
    grid = np.asarray(grid, dtype=np.float64).reshape(-1)
    if len(correct) == 0:
        return np.zeros(len(grid))
    held = np.sort(radius[correct & ~np.isnan(radius)])  # a NaN radius certifies nothing
    return (len(held) - np.searchsorted(held, grid, side="left")) / len(correct)


def acr(correct, radius) -> float:
    """Average certified radius: mean(correct * R) over all inputs."""
    correct, radius = np.asarray(correct, dtype=bool), np.asarray(radius, dtype=np.float64)
    return float(np.mean(correct * radius)) if len(correct) else 0.0


def _dual_rows(meta: dict, records: list[dict], col) -> dict[str, dict]:
    """The dual rows: the headline rule as "dual", every other rule as "dual:<rule>".

    Runs written before the rules existed hold only the paper's rule (the top-level fields).
    """
    sigma_e = f"router sigma_e={meta['sigma_e']:g}"
    if not all("rules" in r for r in records):
        per_model = meta["n0"] + meta["n"]
        return {
            "dual": {
                "label": f"Dual RS ({sigma_e})",
                "correct": col(lambda r: r["correct"]),
                "radius": col(lambda r: r["radius"]),
                "seconds": col(lambda r: r["seconds"]),
                "forwards": col(lambda r: per_model * (1 + (r["expert"] >= 0))),
                "expert": col(lambda r: r["expert"]),
                "expert_abstained": col(
                    lambda r: r["expert"] >= 0 and r["expert_counts"]["prediction"] < 0
                ),
            }
        }
    headline = meta.get("rule", "min")
    names = [headline] + [k for k in records[0]["rules"] if k != headline]
    out = {}
    for name in names:
        key = "dual" if name == headline else f"dual:{name}"
        what = RULE_LABELS.get(name, name)
        label = f"Dual RS, {what} ({sigma_e}{', headline' if key == 'dual' else ''})"
        if name == "cascade":
            label = CASCADE_LABEL + (" (headline)" if key == "dual" else "")
        out[key] = {
            "label": label,
            **{
                field: col(lambda r, f=field, k=name: r["rules"][k][f])
                for field in ("correct", "radius", "seconds", "forwards", "expert")
            },
            "expert_abstained": col(lambda r, k=name: r["rules"][k]["expert_abstained"]),
        }
    return out


def methods(meta: dict, records: list[dict]) -> dict[str, dict]:
    """Per method: label, correct, radius, seconds, forwards (arrays over the records, or None
    where the records do not say); the dual rows also hold each input's route."""

    def col(get):
        return np.array([get(r) for r in records])

    def col_or_none(get):
        values = [get(r) for r in records]
        return None if any(v is None for v in values) else np.array(values)

    out = _dual_rows(meta, records, col)
    per_model = meta["n0"] + meta["n"]
    for i, (name, sigma) in enumerate(zip(meta["experts"], meta["sigmas"], strict=True)):
        out[f"expert:{name}"] = {
            "label": f"{name} alone (sigma={sigma:g})",
            "correct": col(lambda r, i=i: r["baselines"]["experts"][i]["correct"]),
            "radius": col(lambda r, i=i: r["baselines"]["experts"][i]["radius"]),
            "seconds": col(lambda r, i=i: r["baselines"]["experts"][i]["seconds"]),
            "forwards": col(lambda r, i=i: r["baselines"]["experts"][i].get("forwards", per_model)),
        }
    out["multiscale"] = {
        "label": MULTISCALE_LABEL,
        "correct": col(lambda r: r["baselines"]["multiscale"]["correct"]),
        "radius": col(lambda r: r["baselines"]["multiscale"]["radius"]),
        "seconds": col(lambda r: r["baselines"]["multiscale"]["seconds"]),
        "forwards": col_or_none(lambda r: r["baselines"]["multiscale"].get("forwards")),
    }
    out["oracle"] = {
        "label": ORACLE_LABEL,
        "correct": col(lambda r: r["baselines"]["oracle"]["correct"]),
        "radius": col(lambda r: r["baselines"]["oracle"]["radius"]),
        "seconds": None,
        "forwards": None,
    }
    return out


def envelope(singles, grid) -> np.ndarray:
    """The best single expert's certified accuracy at each r of ``grid``; ``singles``: each
    expert's (correct, radius)."""
    return np.max([certified_accuracy(c, r, grid) for c, r in singles], axis=0)


def regret(correct, radius, env_grid, env_acc) -> float:
    """Largest shortfall (points) from the envelope over its grid; <= 0: never below it."""
    return float(100 * np.max(env_acc - certified_accuracy(correct, radius, env_grid)))


def breakpoints(radii, top: float) -> np.ndarray:
    """0 and every radius of ``radii`` (arrays) in [0, top], sorted and unique: the only radii
    where a certified-accuracy curve built from them can step (it is constant on each interval
    (a, b] between two consecutive ones)."""
    points = np.concatenate([[0.0], *(np.asarray(r, dtype=np.float64).ravel() for r in radii)])
    return np.unique(points[(points >= 0) & (points <= top)])


def regret_every_radius(correct, radius, singles) -> float:
    """The regret with no grid: the largest shortfall (points) from the envelope of ``singles``
    (each expert's (correct, radius)) over EVERY r from 0 to the largest radius an expert
    certifies. Every certified-accuracy curve is constant on each interval (a, b] between two
    consecutive radii that occur (its own or an expert's), so the largest shortfall is attained
    at r = 0 or at one of those radii (``breakpoints``); they are all evaluated. It is never
    below ``regret`` on any grid inside that range, and shows dips a grid steps over (where one
    expert's certificates end, say)."""
    singles = [(np.asarray(c, dtype=bool), np.asarray(r, dtype=np.float64)) for c, r in singles]
    top = max(float(np.nanmax(r, initial=0.0)) for _, r in singles)
    points = breakpoints([radius, *(r for _, r in singles)], top)
    shortfall = envelope(singles, points) - certified_accuracy(correct, radius, points)
    return float(100 * np.max(shortfall))


def bootstrap_weights(rows: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, rows): each row the weights of one bootstrap resample of ``rows`` inputs (how
    often each is drawn, over ``rows``)."""
    return rng.multinomial(rows, np.full(rows, 1.0 / rows), size=resamples) / rows


def resampled_accuracy(correct, radius, grid, weights: np.ndarray) -> np.ndarray:
    """(resamples, G): certified accuracy at each r of ``grid`` on each weighted resample. One
    sort of the radii and a cumulative sum, no (inputs, G) matrix, so a grid holding every
    radius that occurs (the every-r regret's interval) stays cheap."""
    ok = np.asarray(correct, dtype=bool) & ~np.isnan(np.asarray(radius, dtype=np.float64))
    r = np.where(ok, np.asarray(radius, dtype=np.float64), -np.inf)  # -inf: certifies nothing
    order = np.argsort(r, kind="stable")
    w = np.asarray(weights, dtype=np.float64)[:, order]
    tail = np.zeros((len(w), len(order) + 1))
    tail[:, :-1] = np.cumsum(w[:, ::-1], axis=1)[:, ::-1]  # weight of sorted positions >= i
    at = np.searchsorted(r[order], np.asarray(grid, dtype=np.float64).reshape(-1), side="left")
    return tail[:, at]


def regret_intervals(
    table: dict[str, dict],
    env_grid,
    *,
    resamples: int = BOOTSTRAP,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Each method's worst-case regret's central ``level`` interval (points) over ``resamples``
    paired bootstrap resamples of the inputs (the same resample for every method, the envelope
    recomputed on each): the noise of the test sample, not a certificate. ``env_grid``: the
    radii the regret is taken over (the report's grid, or every radius that occurs for the
    every-r regret); the same seed draws the same resamples for either."""
    check_count("resamples", resamples)
    if not 0 < level < 1:
        raise UsageError(f"the interval's level must lie in (0, 1), got {level!r}.")
    keys = list(table)
    rows = len(next(iter(table.values()))["correct"])
    rng = np.random.default_rng(seed)

    def curve(key: str, weights: np.ndarray) -> np.ndarray:
        return resampled_accuracy(table[key]["correct"], table[key]["radius"], env_grid, weights)

    out = []
    for start in range(0, resamples, 100):  # 100 resamples at a time: bounded memory
        weights = bootstrap_weights(rows, min(100, resamples - start), rng)
        singles = {k: curve(k, weights) for k in keys if k.startswith("expert:")}
        env = np.max(list(singles.values()), axis=0)
        out.append(np.stack([100 * (env - (singles[k] if k in singles else curve(k, weights)))
                             .max(axis=1) for k in keys], axis=1))  # fmt: skip
    regrets = np.concatenate(out)
    tail = 50 * (1 - level)
    return {
        k: np.percentile(regrets[:, j], [tail, 100 - tail]).tolist() for j, k in enumerate(keys)
    }


def _routing(m: dict, names: list[str]) -> dict:
    routed = m["expert"]
    abstained = int(np.sum(m["expert_abstained"]))
    return {
        "routing": {name: float(np.mean(routed == i)) for i, name in enumerate(names)},
        "abstention": {
            "router": float(np.mean(routed < 0)),
            "expert": abstained / len(routed),
            "expert_among_routed": abstained / max(1, int(np.sum(routed >= 0))),
        },
    }


def summarize(
    meta: dict, records: list[dict], grid: list[float] | None = None, step: float = STEP
) -> dict:
    """Every number of the report, JSON-ready (grid: 0, step, ... up to the largest radius).

    The regret grid runs from 0 by ``step`` to the largest radius any expert certifies.
    """
    if not records:
        raise UsageError("the run has no records yet; run `router certify` first.")
    table = methods(meta, records)
    if grid is None:
        grid = radius_grid(max(float(m["radius"].max()) for m in table.values()), step)
    singles = [k for k in table if k.startswith("expert:")]
    regret_grid = radius_grid(max(float(table[k]["radius"].max()) for k in singles), step)
    single_curves = [(table[k]["correct"], table[k]["radius"]) for k in singles]
    env_grid = envelope(single_curves, regret_grid)
    env_at = envelope(single_curves, REGRET_AT)
    intervals = regret_intervals(table, regret_grid)
    top = max(float(np.nanmax(table[k]["radius"], initial=0.0)) for k in singles)
    every = regret_intervals(table, breakpoints([m["radius"] for m in table.values()], top))
    ms = table["multiscale"]
    ms_grid = certified_accuracy(ms["correct"], ms["radius"], regret_grid)

    def one(key: str, m: dict) -> dict:
        at = env_at - certified_accuracy(m["correct"], m["radius"], REGRET_AT)
        below_ms = ms_grid - certified_accuracy(m["correct"], m["radius"], regret_grid)
        return {
            "label": m["label"],
            "certified_accuracy": certified_accuracy(m["correct"], m["radius"], grid).tolist(),
            "acr": acr(m["correct"], m["radius"]),
            "regret": regret(m["correct"], m["radius"], regret_grid, env_grid),
            "regret_interval": intervals[key],
            "regret_every_radius": regret_every_radius(m["correct"], m["radius"], single_curves),
            "regret_every_radius_interval": every[key],
            "regret_at": {f"{r:g}": float(100 * v) for r, v in zip(REGRET_AT, at, strict=True)},
            # the largest shortfall below Multiscale on the regret grid, points (0: never below)
            "below_multiscale": float(100 * max(below_ms.max(initial=0.0), 0.0)),
            "seconds_per_input": None if m["seconds"] is None else float(np.mean(m["seconds"])),
            "forwards_per_input": None if m["forwards"] is None else float(np.mean(m["forwards"])),
        }

    summary_methods = {key: one(key, m) for key, m in table.items()}
    best = [
        max(singles, key=lambda k, j=j: summary_methods[k]["certified_accuracy"][j])
        for j in range(len(grid))
    ]
    dual_acc = summary_methods["dual"]["certified_accuracy"]
    gap = [dual_acc[j] - summary_methods[k]["certified_accuracy"][j] for j, k in enumerate(best)]
    ms_acc = summary_methods["multiscale"]["certified_accuracy"]
    names = list(meta["experts"])
    duals = {k: _routing(m, names) for k, m in table.items() if k.startswith("dual")}
    return {
        "run": meta.get("run"),
        "dataset": meta.get("dataset"),
        "inputs": len(records),
        "n0": meta["n0"],
        "n": meta["n"],
        "alpha": meta["alpha"],
        "alpha_router": meta["alpha_router"],
        "alpha_expert": meta["alpha_expert"],
        "sigma_e": meta["sigma_e"],
        "p_skip": meta.get("p_skip"),
        "rule": meta.get("rule", "min"),
        "biases": meta.get("biases"),
        "grid": list(grid),
        "methods": summary_methods,
        "envelope": {"grid": list(regret_grid), "certified_accuracy": env_grid.tolist()},
        "best_single": best,
        "gap_to_best_single": gap,
        "gap_to_multiscale": [d - m for d, m in zip(dual_acc, ms_acc, strict=True)],
        **duals["dual"],
        "routing_by_method": duals,
    }


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def _cost(m: dict) -> str:
    fw, secs = m["forwards_per_input"], m["seconds_per_input"]
    return f"{'—' if fw is None else f'{fw:.0f}'} | {'—' if secs is None else f'{secs:.3g}'}"


def regret_text(m: dict, key: str = "regret") -> str:
    """A summary method's worst-case regret (``key``: "regret" on the grid, or
    "regret_every_radius") with its 95 % interval: "3.2 [2.3, 4.7]"."""
    lo, hi = m[f"{key}_interval"]
    return f"{m[key]:.1f} [{lo:.1f}, {hi:.1f}]"


def to_markdown(summary: dict) -> str:
    grid = summary["grid"]
    at = " / ".join(f"{r:g}" for r in REGRET_AT)
    head = (
        "| method | "
        + " | ".join(f"r={r:g}" for r in grid)
        + f" | ACR | regret [95 % interval] | regret, every r [95 %] | regret at r={at}"
        " | forwards/input | s/input |"
    )
    top = summary["envelope"]["grid"][-1]
    cascade = summary["rule"] == "cascade" or "dual:cascade" in summary["routing_by_method"]
    if summary["rule"] == "cascade" and list(summary["routing_by_method"]) == ["dual"]:
        split = "(all of it on the experts: the cascade alone, no router sampled)"
    else:
        split = (
            f"(dual: router {summary['alpha_router']:g} + expert {summary['alpha_expert']:g}"
            f"{'; the cascade: all of it on the experts' if cascade else ''}), "
            f"sigma_e={summary['sigma_e']:g}"
        )
    lines = [
        f"# Certified accuracy (%) on {summary['inputs']} inputs",
        "",
        f"n0={summary['n0']}, n={summary['n']}, alpha={summary['alpha']:g} {split}, "
        f"headline rule {summary['rule']}. Abstentions count as wrong.",
        "",
        head,
        "|" + "---|" * (len(grid) + 7),
    ]
    for m in summary["methods"].values():
        cells = [_pct(v) for v in m["certified_accuracy"]]
        regret_at = " / ".join(f"{v:+.1f}" for v in m["regret_at"].values())
        lines.append(
            f"| {m['label']} | "
            + " | ".join(cells)
            + f" | {m['acr']:.3f} | {regret_text(m)} | {regret_text(m, 'regret_every_radius')}"
            f" | {regret_at} | {_cost(m)} |"
        )
    for name, key in (("best single expert", "gap_to_best_single"),
                      ("Multiscale", "gap_to_multiscale")):  # fmt: skip
        if key in summary:  # a summary written before session 15 has no Multiscale row
            gap = " | ".join(f"{100 * g:+.1f}" for g in summary[key])
            lines.append(f"| dual − {name} (points) | {gap} | | | | | | |")
    lines += [
        "",
        f"Regret: the largest shortfall (points) from the best single expert at each radius "
        f"(each expert at the full alpha), over r = 0 to {top:g} by {_step(summary)}, the "
        "largest radius any expert certifies; at or below 0, the method never trails it. "
        "Regret, every r: the same over every radius in that range, no grid (a grid can step "
        "over a dip, where one expert's certificates end). "
        "Regret at r = ...: the shortfall at those radii (negative: above the envelope). "
        f"{_below_multiscale(summary)}"
        "The intervals: a paired bootstrap over the inputs (the envelope recomputed on each of "
        f"{BOOTSTRAP} resamples, the same for both regrets), how much the regret moves with the "
        "sample of inputs; they are not certificates.",
        "",
        "## Routing",
        "",
        "| method | " + " | ".join(summary["routing"]) + " | router abstained |",
        "|" + "---|" * (len(summary["routing"]) + 2),
    ]
    for key, r in summary["routing_by_method"].items():
        shares = " | ".join(f"{_pct(v)} %" for v in r["routing"].values())
        label = summary["methods"][key]["label"]
        lines.append(f"| {label} | {shares} | {_pct(r['abstention']['router'])} % |")
    ab = summary["abstention"]
    if summary["rule"] == "cascade":
        headline = (
            f"Abstentions (headline, the cascade): no stage certified on {_pct(ab['router'])} % "
            "of inputs"
        )
    else:
        headline = (
            f"Abstentions (headline): router {_pct(ab['router'])} % of inputs; routed expert "
            f"{_pct(ab['expert'])} % of inputs ({_pct(ab['expert_among_routed'])} % of routed "
            "ones)"
        )
    lines += [
        "",
        f"{headline}. The agreement rule can certify where its router abstains, when the experts "
        "agree. "
        'The cascade\'s routing is the expert whose stage certified ("router abstained": none '
        "did).",
        "",
        "forwards/input counts the model forward passes behind each input's counts (router + "
        "the experts a method reads: one for min and pairwise, every one for agreement; the "
        "cascade reads every expert and no router; "
        "Multiscale: the stages it evaluated); s/input is the sampling time behind them. "
        "The oracle reads the label: it is not a certificate.",
        "",
    ]
    return "\n".join(lines)


def _below_multiscale(summary: dict) -> str:
    """The report's sentence on the headline against Multiscale ("" for an older summary)."""
    below = summary["methods"]["dual"].get("below_multiscale")
    if below is None:
        return ""
    if below == 0:
        return "The headline is never below Multiscale on that grid. "
    return f"The headline is up to {below:.1f} points below Multiscale on that grid. "


def _step(summary: dict) -> str:
    g = summary["envelope"]["grid"]
    return f"{g[1] - g[0]:g}" if len(g) > 1 else "its step"


def to_csv(summary: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    regret_at = [f"regret r={r:g}" for r in REGRET_AT]
    stats = ["acr", "regret", "regret_95_lo", "regret_95_hi", "regret_every_radius",
             "regret_every_radius_95_lo", "regret_every_radius_95_hi",
             "below_multiscale"]  # fmt: skip
    writer.writerow(
        ["method", "label", *[f"r={r:g}" for r in summary["grid"]], *stats, *regret_at,
         "forwards_per_input"]
    )  # fmt: skip
    for key, m in summary["methods"].items():
        fw = m["forwards_per_input"]
        writer.writerow(
            [key, m["label"], *[f"{v:.6f}" for v in m["certified_accuracy"]], f"{m['acr']:.6f}",
             f"{m['regret']:.4f}", *[f"{v:.4f}" for v in m["regret_interval"]],
             f"{m['regret_every_radius']:.4f}",
             *[f"{v:.4f}" for v in m["regret_every_radius_interval"]],
             f"{m['below_multiscale']:.4f}",
             *[f"{v:.4f}" for v in m["regret_at"].values()],
             "" if fw is None else f"{fw:.1f}"]
        )  # fmt: skip
    gaps = (("gap", "dual − best single expert", "gap_to_best_single"),
            ("gap_multiscale", "dual − Multiscale", "gap_to_multiscale"))  # fmt: skip
    for row, label, key in gaps:
        writer.writerow([row, label, *[f"{g:.6f}" for g in summary[key]], *[""] * len(stats),
                         *[""] * len(REGRET_AT), ""])  # fmt: skip
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
