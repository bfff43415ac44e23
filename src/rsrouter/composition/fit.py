"""Router biases fitted on a validation split, from the counts a certify run cached.

The biased rules route by argmax_j Phi^-1(q_j) + b_j. Their certificates hold for any FIXED b,
so b must be chosen on draws that never certify a test input: run `router certify --split
<validation split>`, fit here, then certify the test split once with the chosen b.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rsrouter.composition.certify_run import counts_key, read_records
from rsrouter.composition.dual import decide, split_alpha
from rsrouter.composition.report import STEP, acr, certified_accuracy, radius_grid, regret
from rsrouter.composition.rules import check_rule
from rsrouter.errors import UsageError
from rsrouter.smoothing import Certificate

CANDIDATES = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


def run_counts(artifacts: str | Path, meta: dict, records: Sequence[dict]):
    """(router counts, every expert's counts, labels) of a run's inputs, from its caches."""
    root = Path(artifacts) / "certify" / "experts"
    dataset, bf16 = meta["dataset"]["fingerprint"], bool(meta.get("bf16"))
    experts = []
    for fp, name in zip(meta["expert_fingerprints"], meta["experts"], strict=True):
        key = counts_key(fp, dataset, meta["n0"], meta["n"], meta["seed"], bf16)
        have = read_records(root / f"{key}.jsonl")
        missing = [r["index"] for r in records if r["index"] not in have]
        if missing:
            raise UsageError(
                f"the cached counts of expert {name!r} lack {len(missing)} input(s) of the run; "
                "rerun `router certify` on that split."
            )
        experts.append(have)
    router = [(r["router"]["selection_counts"], r["router"]["counts"]) for r in records]
    per_input = [
        [(e[r["index"]]["selection_counts"], e[r["index"]]["counts"]) for e in experts]
        for r in records
    ]
    return router, per_input, [int(r["label"]) for r in records]


def fit_biases(
    router_counts: Sequence[tuple],
    expert_counts: Sequence[Sequence[tuple]],
    labels: Sequence[int],
    *,
    sigma_e: float,
    sigmas: Sequence[float],
    alpha: float,
    alpha_router: float | None = None,
    rule: str = "pairwise",
    candidates: Sequence[float] = CANDIDATES,
    step: float = STEP,
) -> tuple[list[float], list[dict]]:
    """The biases (b_0 = 0, each other b_j from ``candidates``) whose ``rule`` has the least
    worst-case regret to the experts' envelope on these (validation) counts; ties go to the
    larger ACR, then to the smaller biases. Returns (best, every variant tried with its scores).
    """
    if check_rule(rule) == "min":
        raise UsageError("the min rule ignores router biases: fit them for pairwise or agreement.")
    if not router_counts:
        raise UsageError("fitting biases needs at least one validation input.")
    a_router, a_expert = split_alpha(alpha, alpha_router)
    labels = np.asarray(labels)
    singles = [
        [Certificate.from_counts(*e[j], s, alpha) for e in expert_counts]
        for j, s in enumerate(sigmas)
    ]
    correct = [np.array([c.prediction for c in certs]) == labels for certs in singles]
    radii = [np.array([c.radius for c in certs]) for certs in singles]
    grid = radius_grid(max(float(r.max()) for r in radii), step)
    env = np.max([certified_accuracy(c, r, grid) for c, r in zip(correct, radii, strict=True)], 0)
    tried = []
    for rest in itertools.product(candidates, repeat=len(sigmas) - 1):
        b = [0.0, *map(float, rest)]
        certs = [
            decide(
                rule,
                rc,
                ec,
                sigma_e=sigma_e,
                sigmas=sigmas,
                alpha_router=a_router,
                alpha_expert=a_expert,
                biases=b,
            )  # fmt: skip
            for rc, ec in zip(router_counts, expert_counts, strict=True)
        ]
        ok = np.array([c.prediction for c in certs]) == labels
        radius = np.array([c.radius for c in certs])
        tried.append({"biases": b, "regret": regret(ok, radius, grid, env), "acr": acr(ok, radius)})
    best = min(tried, key=lambda t: (t["regret"], -t["acr"], float(np.abs(t["biases"]).sum())))
    return best["biases"], tried
