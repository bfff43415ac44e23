"""`router demo`: the smallest end-to-end run (replaced by the full pipeline demo)."""

from __future__ import annotations

import torch
from rich.table import Table

from rsrouter.cli.app import app, console
from rsrouter.smoothing import certify


@app.command()
def demo(n: int = 10_000, seed: int = 0) -> None:
    """Certify a linear classifier smoothed at three sigmas and compare with its true radius."""
    torch.manual_seed(seed)
    w, b = torch.randn(16), 0.3
    x = torch.randn(16) * 0.2

    def base(batch: torch.Tensor) -> torch.Tensor:
        return (batch @ w + b > 0).long()

    true_radius = abs(float(x @ w) + b) / float(w.norm())
    table = Table(title=f"linear base classifier, true robust radius {true_radius:.4f}")
    for col in ("sigma", "prediction", "n_A / n", "certified radius"):
        table.add_column(col)
    for sigma in (0.25, 0.5, 1.0):
        c = certify(base, x, sigma, n0=100, n=n, alpha=0.001, seed=seed)
        table.add_row(f"{sigma}", str(c.prediction), f"{c.count} / {c.n}", f"{c.radius:.4f}")
    console.print(table)
