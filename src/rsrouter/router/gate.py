"""Experts that gate themselves (ACES, Horváth et al. 2022, for K experts).

A gate router is a copy of the sigma_e expert (trained for the router's own noise): on each
noisy draw x + δ_e it scores its own uncertainty, the normalised entropy h of its softmax, and
the thresholds t_1 <= ... <= t_{K-1} pick the expert: h <= t_1 goes to the expert of the largest
sigma (a confident input: the large radii are there), and each further band to the next smaller
sigma. Smoothed at sigma_e it is an ordinary router: CERTIFY counts its votes per expert, so
every composition rule applies to it unchanged.

The thresholds are fitted on the validation split, never the test split, from one pass that
counts the draws of each input in fixed score bins (``ScoreBins``): the gate router's counts for
any thresholds on the bin edges are sums of those bins, under the same noise (the router's
stages, seeded by input index), so no threshold needs its own pass.
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


def check_gate(gate: dict, sigmas: Sequence[float]) -> dict:
    """A gate spec {"score", "thresholds", "order", "classes"} checked against the experts'
    sigmas (classes: the class count of the classifier whose softmax is scored)."""
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
    if sorted(order) != list(range(len(sigmas))) or len(thresholds) != len(order) - 1:
        raise UsageError(
            f"gate: order must list each of the {len(sigmas)} experts once and thresholds must "
            f"have {len(sigmas) - 1} values."
        )
    if any(b < a for a, b in itertools.pairwise(thresholds)):
        raise UsageError(f"gate thresholds must not decrease, got {thresholds}.")
    return {"score": score, "thresholds": thresholds, "order": order, "classes": classes}


def default_order(sigmas: Sequence[float]) -> list[int]:
    """Experts from the largest sigma to the smallest: the confident band goes first."""
    return sorted(range(len(sigmas)), key=lambda i: (-float(sigmas[i]), i))


def route_by_score(score: torch.Tensor, thresholds: torch.Tensor, order: torch.Tensor):
    """order[#(thresholds < score)]: the band of each score picks an expert index."""
    return order[torch.bucketize(score, thresholds)]


def bin_edges(bins: int = BINS) -> np.ndarray:
    """The inner edges of ``bins`` equal score bins on [0, 1]."""
    return np.linspace(0.0, 1.0, bins + 1)[1:-1]


class ScoreBins(nn.Module):
    """The gate router's score on a draw, as a one-hot vote over fixed score bins: sampled with
    the router's noise it counts, per input, how many draws fall in each bin."""

    def __init__(self, router, edges: np.ndarray):
        super().__init__()
        self.router = router
        self.register_buffer("edges", torch.as_tensor(np.asarray(edges), dtype=torch.float32))

    @property
    def num_classes(self) -> int:
        return len(self.edges) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = normalized_entropy(self.router.expert_logits(x))
        bins = torch.bucketize(score, self.edges)
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


def threshold_grid(bins: int, experts: int):
    """Every non-decreasing choice of experts - 1 cuts among the bin boundaries 0..bins."""
    return itertools.combinations_with_replacement(range(bins + 1), experts - 1)


def cut_thresholds(cuts: Sequence[int], edges: np.ndarray) -> list[float]:
    """Score thresholds of cuts: cut c routes the first c bins below it (c = 0: none, c = B:
    all), i.e. threshold edges[c - 1], with -1 and 1 standing for 'nothing' and 'everything'."""
    full = [-1.0, *[float(e) for e in edges], 1.0]
    return [full[c] for c in cuts]
