"""Experts that gate themselves (ACES, Horváth et al. 2022, for K experts).

A gate router is a copy of the sigma_e expert (trained for the router's own noise): on each
noisy draw x + δ_e it scores its own uncertainty, the normalised entropy h of its softmax, and
the thresholds t_1 <= ... <= t_{K-1} pick the expert: h <= t_1 goes to the expert of the largest
sigma (a confident input: the large radii are there), and each further band to the next smaller
sigma. Smoothed at sigma_e it is an ordinary router: CERTIFY counts its votes per expert, so
every composition rule applies to it unchanged.

A class gate (``class_thresholds``) keeps one threshold row per class: the class the copy
predicts on the draw picks the row, so a class the sigma_e expert often gets wrong (a shirt) can
be sent to a small sigma unless the draw is very confident, and an easy one (a trouser) stays
with the large sigma. The class-map router is the special case of entropy-free rows.

The thresholds are fitted on the validation split, never the test split, from one pass that
counts the draws of each input in fixed score bins (``ScoreBins``; per predicted class and
score bin for a class gate): the gate router's counts for any thresholds on the bin edges are
sums of those bins, under the same noise (the router's stages, seeded by input index), so no
threshold needs its own pass.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from rsrouter.errors import UsageError

SCORES = ("entropy",)
BINS = 20  # score bins of the fitting pass: thresholds are fitted on their edges


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dimension, divided by log K: in [0, 1]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(dim=-1)
    return (h / math.log(logits.shape[-1])).clamp(0.0, 1.0)


def _check_row(thresholds, width: int, what: str) -> list[float]:
    if len(thresholds) != width:
        raise UsageError(f"gate: {what} must have {width} values, got {len(thresholds)}.")
    if any(b < a for a, b in itertools.pairwise(thresholds)):
        raise UsageError(f"gate {what} must not decrease, got {thresholds}.")
    return thresholds


def check_gate(gate: dict, sigmas: Sequence[float]) -> dict:
    """A gate spec {"score", "thresholds", "order", "classes"[, "class_thresholds"]} checked
    against the experts' sigmas (classes: the class count of the classifier whose softmax is
    scored; class_thresholds: one threshold row per class, used instead of thresholds)."""
    if not isinstance(gate, dict):
        raise UsageError(f"gate must be a table with thresholds and order, got {gate!r}.")
    score = gate.get("score", "entropy")
    if score not in SCORES:
        raise UsageError(f"gate score must be one of {SCORES}, got {score!r}.")
    try:
        thresholds = [float(t) for t in gate["thresholds"]]
        order = [int(e) for e in gate["order"]]
        classes = int(gate["classes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(
            "gate needs numeric thresholds, an order of expert indices and a class count."
        ) from exc
    if classes < 2:
        raise UsageError(f"gate: the scored classifier needs at least 2 classes, got {classes}.")
    if sorted(order) != list(range(len(sigmas))):
        raise UsageError(f"gate: order must list each of the {len(sigmas)} experts once.")
    spec = {"score": score, "thresholds": _check_row(thresholds, len(order) - 1, "thresholds"),
            "order": order, "classes": classes}  # fmt: skip
    rows = gate.get("class_thresholds")
    if rows is not None:
        try:
            rows = [[float(t) for t in row] for row in rows]
        except (TypeError, ValueError) as exc:
            raise UsageError("gate class_thresholds must be rows of numbers.") from exc
        if len(rows) != classes:
            raise UsageError(f"gate: class_thresholds needs {classes} rows, got {len(rows)}.")
        spec["class_thresholds"] = [
            _check_row(row, len(order) - 1, f"class_thresholds row {c}")
            for c, row in enumerate(rows)
        ]
    return spec


def default_order(sigmas: Sequence[float]) -> list[int]:
    """Experts from the largest sigma to the smallest: the confident band goes first."""
    return sorted(range(len(sigmas)), key=lambda i: (-float(sigmas[i]), i))


def route_by_score(score: torch.Tensor, thresholds: torch.Tensor, order: torch.Tensor):
    """order[#(thresholds < score)]: the band of each score picks an expert index."""
    return order[torch.bucketize(score, thresholds)]


def route_by_class_score(score, predicted, rows: torch.Tensor, order: torch.Tensor):
    """order[#(rows[predicted] < score)]: the predicted class's threshold row, then the band."""
    return order[(rows[predicted] < score.unsqueeze(-1)).sum(dim=-1)]


def bin_edges(bins: int = BINS) -> np.ndarray:
    """The inner edges of ``bins`` equal score bins on [0, 1]."""
    return np.linspace(0.0, 1.0, bins + 1)[1:-1]


class ScoreBins(nn.Module):
    """The gate router's score on a draw, as a one-hot vote over fixed score bins: sampled with
    the router's noise it counts, per input, how many draws fall in each bin. With
    ``per_class`` the vote is over (predicted class, score bin) pairs, class-major."""

    def __init__(self, router, edges: np.ndarray, *, per_class: bool = False):
        super().__init__()
        self.router = router
        self.per_class = per_class
        self.register_buffer("edges", torch.as_tensor(np.asarray(edges), dtype=torch.float32))

    @property
    def bins(self) -> int:
        return len(self.edges) + 1

    @property
    def num_classes(self) -> int:
        return self.bins * (self.router.gate["classes"] if self.per_class else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router.expert_logits(x)
        bins = torch.bucketize(normalized_entropy(logits), self.edges)
        if self.per_class:
            bins = logits.argmax(dim=-1) * self.bins + bins
        return nn.functional.one_hot(bins, self.num_classes).to(x.dtype)


def counts_for(bin_counts: np.ndarray, cuts: Sequence[int], order: Sequence[int]) -> np.ndarray:
    """Gate counts (N, E) from bin counts (N, B) for the thresholds ``cut_thresholds(cuts)``:
    bins [0, cuts[0]) vote for order[0], bins [cuts[0], cuts[1]) for order[1], and so on."""
    bin_counts = np.asarray(bin_counts)
    bounds = [0, *cuts, bin_counts.shape[1]]
    out = np.zeros((bin_counts.shape[0], len(order)), dtype=np.int64)
    for band, expert in enumerate(order):
        out[:, expert] = bin_counts[:, bounds[band] : bounds[band + 1]].sum(axis=1)
    return out


def class_counts_for(bin_counts: np.ndarray, class_cuts, order: Sequence[int]) -> np.ndarray:
    """Class-gate counts (N, E) from (N, C * B) class-major bin counts: class c's bins are split
    by its own cuts ``class_cuts[c]``."""
    bin_counts = np.asarray(bin_counts)
    classes = len(class_cuts)
    per = bin_counts.reshape(bin_counts.shape[0], classes, -1)
    return sum(counts_for(per[:, c], cuts, order) for c, cuts in enumerate(class_cuts))


def threshold_grid(bins: int, experts: int):
    """Every non-decreasing choice of experts - 1 cuts among the bin boundaries 0..bins."""
    return itertools.combinations_with_replacement(range(bins + 1), experts - 1)


def cut_thresholds(cuts: Sequence[int], edges: np.ndarray) -> list[float]:
    """Score thresholds of cuts: cut c routes the first c bins below it (c = 0: none, c = B:
    all), i.e. threshold edges[c - 1], with -1 and 1 standing for 'nothing' and 'everything'."""
    full = [-1.0, *[float(e) for e in edges], 1.0]
    return [full[c] for c in cuts]
