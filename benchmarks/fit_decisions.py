"""Val-fit decisions: every input at once (`tuning.decide_all`) vs input by input (`dual.decide`).

A fit on the val split (the gates, the class gate, the biases) decides every val input under
each of thousands of candidate router counts, exactly as a certify run would. The plain
baseline is the certify run's own path: `dual.decide` per input, building each input's
certificates. Ours decides all inputs of a candidate in one array pass (`rules.decide_rows`),
with the experts' certificates computed once per fit. Both get the same synthetic counts (random
votes, sure and split, abstentions included) and must return the same decisions, which this
script checks before it prints a time.

    python benchmarks/fit_decisions.py                 # 500 inputs, 3 experts, 10 classes
    python benchmarks/fit_decisions.py --inputs 1000 --candidates 40

Every figure printed is measured in this run on this machine (CPU seconds of this process).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from rsrouter.composition.dual import decide, split_alpha
from rsrouter.composition.rules import RULES
from rsrouter.composition.tuning import ValidationCounts, decide_all

SIGMAS = (0.25, 0.5, 1.0)


def votes(rng, rows: int, width: int, n: int) -> np.ndarray:
    """(rows, width) counts of n draws: concentrated, split and unanimous votes."""
    p = rng.dirichlet(np.full(width, 0.3), size=rows)
    c = np.array([rng.multinomial(n, q) for q in p])
    c[rng.random(rows) < 0.1] = np.eye(width, dtype=np.int64)[rng.integers(0, width)] * n
    return c


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=500, help="val inputs (500)")
    p.add_argument("--candidates", type=int, default=20, help="router counts per rule (20)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--n", type=int, default=2000, help="estimation draws per input (2,000)")
    p.add_argument("--alpha", type=float, default=0.001)
    args = p.parse_args(argv)
    for name in ("inputs", "candidates", "n"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.classes < 2:
        p.error(f"--classes must be at least 2, got {args.classes}.")
    if not 0 < args.alpha < 1:
        p.error(f"--alpha must lie strictly between 0 and 1, got {args.alpha}.")
    rng = np.random.default_rng(0)
    rows, width = args.inputs, len(SIGMAS)
    est = [votes(rng, rows, args.classes, args.n) for _ in SIGMAS]
    vc = ValidationCounts(rng.integers(0, args.classes, rows), [e // 20 for e in est], est,
                          list(SIGMAS))  # fmt: skip
    routers = [votes(rng, rows, width, args.n) for _ in range(args.candidates)]
    a_router, a_expert = split_alpha(args.alpha)
    kw = {"sigma_e": max(SIGMAS), "alpha_router": a_router, "alpha_expert": a_expert}
    machine = platform.processor() or platform.machine()
    print(f"{machine}: {rows} val inputs, {width} experts, {args.classes} classes, "
          f"n = {args.n}, {args.candidates} candidates per rule")  # fmt: skip
    print("| rule | input by input (s / candidate) | all at once (s / candidate) | speed-up |")
    print("|---|---|---|---|")
    for rule in RULES:
        start = time.process_time()
        plain = []
        for r in routers:
            certs = [decide(rule, (r[i] // 20, r[i]),
                            [(s[i], e[i]) for s, e in zip(vc.selection, vc.estimation,
                                                          strict=True)],
                            sigmas=SIGMAS, **kw)
                     for i in range(rows)]  # fmt: skip
            plain.append([(c.prediction, c.radius, c.expert) for c in certs])
        t_plain = (time.process_time() - start) / len(routers)
        start = time.process_time()
        memo: dict = {}
        ours = [decide_all(rule, r // 20, r, vc, memo=memo, **kw) for r in routers]
        t_ours = (time.process_time() - start) / len(routers)
        for a, (pred, radius, routed) in zip(plain, ours, strict=True):
            if a != list(zip(pred.tolist(), radius.tolist(), routed.tolist(), strict=True)):
                raise SystemExit(f"{rule}: the decisions differ; no time is printed.")
        print(f"| {rule} | {t_plain:.4f} | {t_ours:.4f} | {t_plain / t_ours:.1f}x |")
    print("Same decisions, input for input, under every rule.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
