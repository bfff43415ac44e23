"""Randomized-smoothing statistics core (Cohen et al., 2019).

Sampling is kept apart from deciding: ``sample_counts`` runs the base model on Gaussian copies
and returns class counts; ``Certificate.from_counts`` / ``Prediction.from_counts`` turn counts
into a decision for a given alpha. Counts are stored, so radii for any alpha can be recomputed
offline without another pass over the model.

Noise is added to [0, 1] images (sigma in pixel units); normalisation belongs inside ``base``.
With a ``seed``, the noise of input ``indices[i]`` in ``stage`` s comes from its own generator
seeded by (seed, s, index), drawn in fixed blocks, so counts do not depend on the batch size,
on how inputs are grouped, or on which process handles them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.special import betaincinv, ndtri
from scipy.stats import binomtest

from rsrouter.errors import UsageError

ABSTAIN = -1
NOISE_BLOCK = 1000  # draws generated per input per step; fixed so that seeded noise is stable
SELECTION, ESTIMATION = 0, 1  # noise stages of CERTIFY (independent draws)
ROUTER_SELECTION, ROUTER_ESTIMATION = 2, 3  # the router's own stages (dual RS)

Base = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- validation


def check_sigma(sigma: float) -> float:
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise UsageError(f"sigma must be a positive finite number, got {sigma!r}.")
    return float(sigma)


def check_alpha(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise UsageError(f"alpha must lie strictly between 0 and 1, got {alpha!r}.")
    return float(alpha)


def check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be a whole number of at least 1, got {value!r}.")
    return int(value)


def check_seed(seed: int | None, *, allow_none: bool = True) -> int | None:
    """A noise seed: a non-negative whole number, or None (unseeded) where ``allow_none``."""
    if seed is None and allow_none:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"seed must be a non-negative whole number, got {seed!r}.")
    return seed


def check_inputs(x: torch.Tensor, *, batched: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if not x.is_floating_point():
        raise UsageError(f"inputs must be floating point [0, 1] values, got dtype {x.dtype}.")
    want = "(N, C, H, W) or (N, D)" if batched else "(C, H, W) or (D,)"
    if x.ndim not in ((2, 4) if batched else (1, 3)):
        raise UsageError(f"inputs must have shape {want}, got {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise UsageError("inputs contain NaN or infinite values.")
    return x


# ---------------------------------------------------------------- statistics


def lower_confidence_bound(count, n, alpha: float):
    """One-sided Clopper-Pearson lower bound on a binomial proportion at level alpha.

    The Beta(count, n - count + 1) quantile, as scipy.special.betaincinv: the same numbers as
    scipy.stats.beta.ppf without its per-call overhead (the rules read many bounds per input).
    """
    count, n = np.asarray(count, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = betaincinv(count, n - count + 1, alpha)
    bound = np.where(count > 0, bound, 0.0)
    return float(bound) if bound.ndim == 0 else bound


def certified_radius(count, n, sigma: float, alpha: float):
    """sigma * Phi^-1(p_lower); 0.0 where p_lower <= 1/2 (abstain). Works on arrays too."""
    check_sigma(sigma)
    check_alpha(alpha)
    if np.any(np.asarray(count) < 0) or np.any(np.asarray(count) > np.asarray(n)):
        raise UsageError(f"count must lie in [0, n], got count={count!r}, n={n!r}.")
    p = np.asarray(lower_confidence_bound(count, n, alpha))
    radius = np.where(p > 0.5, sigma * ndtri(np.clip(p, 0.5, 1.0)), 0.0)  # = norm.ppf, faster
    return float(radius) if radius.ndim == 0 else radius


def certify_rows(selection_counts, counts, sigma: float, alpha: float):
    """(prediction, radius) arrays of ``Certificate.from_counts`` for (N, K) counts at once: the
    same numbers, row by row (prediction -1 where the radius is 0)."""
    sel = np.atleast_2d(np.asarray(selection_counts, dtype=np.int64))
    est = np.atleast_2d(np.asarray(counts, dtype=np.int64))
    selected = sel.argmax(axis=1)
    radius = np.atleast_1d(certified_radius(est[np.arange(len(est)), selected],
                                            est.sum(axis=1), sigma, alpha))  # fmt: skip
    return np.where(radius > 0, selected, ABSTAIN), radius.astype(np.float64)


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's outcome with the counts it came from (prediction -1 means abstain)."""

    prediction: int
    radius: float
    selected: int  # class chosen from the selection draws
    count: int  # n_A: votes for `selected` among the n estimation draws
    n: int
    n0: int
    sigma: float
    alpha: float
    counts: tuple[int, ...]  # estimation counts per class
    selection_counts: tuple[int, ...]

    @classmethod
    def from_counts(cls, selection_counts, counts, sigma: float, alpha: float) -> Certificate:
        sel = np.asarray(selection_counts, dtype=np.int64)
        est = np.asarray(counts, dtype=np.int64)
        selected = int(np.argmax(sel))
        count = int(est[selected]) if selected < len(est) else 0
        n = int(est.sum())
        radius = certified_radius(count, n, sigma, alpha)
        return cls(
            prediction=selected if radius > 0 else ABSTAIN,
            radius=float(radius),
            selected=selected,
            count=count,
            n=n,
            n0=int(sel.sum()),
            sigma=float(sigma),
            alpha=float(alpha),
            counts=tuple(int(c) for c in est),
            selection_counts=tuple(int(c) for c in sel),
        )

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def with_alpha(self, alpha: float) -> Certificate:
        """The same counts decided at another alpha (no new sampling)."""
        return Certificate.from_counts(self.selection_counts, self.counts, self.sigma, alpha)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"], d["selection_counts"] = list(self.counts), list(self.selection_counts)
        return d


@dataclass(frozen=True)
class Prediction:
    """PREDICT's outcome: the top class if a two-sided binomial test beats alpha, else -1."""

    prediction: int
    pvalue: float
    n: int
    alpha: float
    counts: tuple[int, ...]

    @classmethod
    def from_counts(cls, counts, alpha: float) -> Prediction:
        c = np.asarray(counts, dtype=np.int64)
        order = np.argsort(-c, kind="stable")
        n_a = int(c[order[0]])
        n_b = int(c[order[1]]) if len(c) > 1 else 0
        pvalue = float(binomtest(n_a, n_a + n_b, 0.5).pvalue) if n_a + n_b > 0 else 1.0
        return cls(
            prediction=int(order[0]) if pvalue <= alpha else ABSTAIN,
            pvalue=pvalue,
            n=int(c.sum()),
            alpha=float(alpha),
            counts=tuple(int(v) for v in c),
        )

    @property
    def abstained(self) -> bool:
        return self.prediction == ABSTAIN

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts"] = list(self.counts)
        return d


# ---------------------------------------------------------------- sampling


def noise_seed(seed: int, stage: int, index: int) -> int:
    """A 63-bit seed for one input's noise stream, independent of rank and batching."""
    words = np.random.SeedSequence([int(seed), int(stage), int(index)]).generate_state(2)
    return (int(words[0]) << 31 | int(words[1])) & (2**63 - 1)


def _generators(count, seed, generator, indices, stage, device):
    if seed is None:
        return [generator] * count
    if indices is None:
        indices = range(count)
    elif len(indices) != count:
        raise UsageError(f"indices has {len(indices)} entries for {count} inputs.")
    return [torch.Generator(device=device).manual_seed(noise_seed(seed, stage, i)) for i in indices]


def _as_labels(out: torch.Tensor, size: int) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == size:
        return out.argmax(dim=1)
    if (
        isinstance(out, torch.Tensor)
        and out.ndim == 1
        and out.shape[0] == size
        and not out.is_floating_point()
    ):
        return out.long()
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    raise UsageError(
        f"the base model returned {shape} for a batch of {size} inputs; "
        f"expected ({size}, num_classes) logits or ({size},) class ids."
    )


class _Forward:
    """Runs the base model in chunks, halving the chunk on a CUDA out-of-memory error."""

    def __init__(self, base: Base, batch_size: int, device, bf16: bool, channels_last: bool):
        self.base, self.batch_size, self.device = base, batch_size, device
        self.bf16, self.channels_last = bf16, channels_last

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        labels, start = [], 0
        while start < len(batch):
            chunk = batch[start : start + self.batch_size]
            try:
                labels.append(self._run(chunk))
            except torch.cuda.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                torch.cuda.empty_cache()
                continue
            start += len(chunk)
        return torch.cat(labels)

    def _run(self, chunk: torch.Tensor) -> torch.Tensor:
        if self.channels_last and chunk.ndim == 4:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16),
        ):
            return _as_labels(self.base(chunk), len(chunk))


def uses_bf16(device, bf16: bool | None = None) -> bool:
    """Whether sampling on ``device`` runs under bf16 autocast: as asked, else on CUDA only (the
    core's default). Cache keys of counts record it, so bf16 and float32 counts never mix."""
    if bf16 is not None:
        return bool(bf16)
    return device is not None and torch.device(device).type == "cuda"


def sample_counts(
    base: Base,
    xs: torch.Tensor,
    sigma: float,
    n: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    indices: Sequence[int] | None = None,
    stage: int = ESTIMATION,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
    bf16: bool | None = None,
    channels_last: bool = False,
    num_classes: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Class counts (N, K) of ``base`` on n Gaussian copies of each input in ``xs``.

    Many inputs share one forward pass (inputs x draws), counting happens on the device, and
    ``progress`` (if given) is called with the number of noisy samples just evaluated.
    """
    sigma, n, batch_size = (
        check_sigma(sigma),
        check_count("n", n),
        check_count("batch_size", batch_size),
    )
    xs = check_inputs(xs, batched=True)
    device = torch.device(device) if device is not None else xs.device
    bf16 = uses_bf16(device, bf16)
    xs = xs.to(device=device, dtype=torch.float32)
    gens = _generators(len(xs), seed, generator, indices, stage, device)
    forward = _Forward(base, batch_size, device, bf16, channels_last)
    block = min(n, NOISE_BLOCK)
    group = max(1, batch_size // block)
    width = num_classes or 1
    out = torch.zeros((len(xs), width), dtype=torch.long)
    for g0 in range(0, len(xs), group):
        x = xs[g0 : g0 + group]
        k = len(x)
        counts = torch.zeros((k, width), dtype=torch.long, device=device)
        for done in range(0, n, block):
            m = min(block, n - done)
            shape = (m, *x.shape[1:])
            if gens[g0] is None:
                noise = torch.randn((k, *shape), device=device)
            else:
                noise = torch.stack(
                    [torch.randn(shape, generator=g, device=device) for g in gens[g0 : g0 + k]]
                )
            labels = forward((x.unsqueeze(1) + sigma * noise).reshape(k * m, *x.shape[1:]))
            labels = labels.view(k, m)
            low, high = torch.stack(torch.aminmax(labels)).tolist()  # one device sync
            if low < 0:
                raise UsageError("the base model returned a negative class id.")
            top = high + 1
            if top > counts.shape[1]:
                counts = torch.nn.functional.pad(counts, (0, top - counts.shape[1]))
            counts.scatter_add_(1, labels, torch.ones_like(labels))
            if progress is not None:
                progress(k * m)
        if counts.shape[1] > out.shape[1]:
            out = torch.nn.functional.pad(out, (0, counts.shape[1] - out.shape[1]))
        out[g0 : g0 + k, : counts.shape[1]] = counts.cpu()
    return out


def pad_counts(*counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Count matrices (B, K_i) zero-padded on the right to the widest K: a class id that one
    draw never returned has count 0 there."""
    width = max(c.shape[1] for c in counts)
    return tuple(torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in counts)


def certify_batch(
    base: Base,
    xs: torch.Tensor,
    sigma: float,
    *,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    **sampling,
) -> list[Certificate]:
    """CERTIFY for every input of ``xs``; selection and estimation use independent draws."""
    alpha, n0 = check_alpha(alpha), check_count("n0", n0)
    sel = sample_counts(base, xs, sigma, n0, stage=SELECTION, **sampling)
    est = sample_counts(base, xs, sigma, n, stage=ESTIMATION, **sampling)
    sel, est = pad_counts(sel, est)
    return [
        Certificate.from_counts(s, e, sigma, alpha)
        for s, e in zip(sel.numpy(), est.numpy(), strict=True)
    ]


def single_indices(
    seed: int | None, index: int | None, indices: Sequence[int] | None = None
) -> list[int] | None:
    """The noise stream of a single-input call: with a ``seed`` the caller must name the
    input's ``index`` (its position in the dataset), or two inputs would share stream 0."""
    check_seed(seed)
    if indices is not None:
        if index is not None:
            raise UsageError("pass index= or indices=, not both.")
        return list(indices)
    if index is None:
        if seed is not None:
            raise UsageError(
                "a single-input call with seed= needs index= (the input's own noise stream, "
                "e.g. its position in the dataset); without it every input would get the noise "
                "of index 0."
            )
        return None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise UsageError(f"index must be a non-negative whole number, got {index!r}.")
    return [index]


def certify(
    base: Base, x: torch.Tensor, sigma: float, *, index: int | None = None, **kwargs
) -> Certificate:
    """CERTIFY(f, sigma, x, n0, n, alpha) for one input of shape (C, H, W) or (D,); with a
    ``seed``, ``index`` names the input's noise stream."""
    x = check_inputs(x, batched=False)
    kwargs["indices"] = single_indices(kwargs.get("seed"), index, kwargs.get("indices"))
    return certify_batch(base, x.unsqueeze(0), sigma, **kwargs)[0]


def predict_batch(
    base: Base, xs: torch.Tensor, sigma: float, *, n: int, alpha: float, **sampling
) -> list[Prediction]:
    alpha = check_alpha(alpha)
    counts = sample_counts(base, xs, sigma, n, stage=ESTIMATION, **sampling)
    return [Prediction.from_counts(c, alpha) for c in counts.numpy()]


def predict(
    base: Base,
    x: torch.Tensor,
    sigma: float,
    *,
    n: int,
    alpha: float,
    index: int | None = None,
    **kwargs,
) -> Prediction:
    """PREDICT(f, sigma, x, n, alpha): abstains unless the top class wins a binomial test; with
    a ``seed``, ``index`` names the input's noise stream."""
    x = check_inputs(x, batched=False)
    kwargs["indices"] = single_indices(kwargs.get("seed"), index, kwargs.get("indices"))
    return predict_batch(base, x.unsqueeze(0), sigma, n=n, alpha=alpha, **kwargs)[0]
