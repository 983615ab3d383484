"""Shared by the disk store and the streaming source: normalisation scales, the train/val split, shuffled batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import numpy as np
import torch
from torch import Tensor

from ..sources import ActivationBatch


def _scale(mean_sq_norm: Sequence[float], d_model: int) -> Tensor:
    return torch.tensor([(d_model / max(m, 1e-12)) ** 0.5 for m in mean_sq_norm], dtype=torch.float32)


def _val_samples(n_samples: int, val_fraction: float) -> np.ndarray:
    """Bool [n_samples]: the round(fraction * n) samples with the smallest hash (>= 1 when n >= 2 and fraction > 0)."""
    n_val = round(val_fraction * n_samples)
    if val_fraction > 0 and n_samples >= 2:
        n_val = min(max(n_val, 1), n_samples - 1)
    is_val = np.zeros(n_samples, dtype=bool)
    is_val[np.argsort(_hash(np.arange(n_samples)), kind="stable")[:n_val]] = True
    return is_val


def _hash(index: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed pseudo-random uint64 per sample index."""
    z = index.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _check_split(split: str, batch_size: int) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _default_buffer(batch_size: int, n_layers: int, d_model: int, budget_bytes: int) -> int:
    """Shuffle-buffer tokens: as many float32 (input, target) rows as fit the budget, at least 4 batches."""
    return max(4 * batch_size, budget_bytes // (2 * n_layers * d_model * 4))


def _shuffled_batches(chunks: Iterator[tuple[Tensor, Tensor]], batch_size: int, buffer: int, rng: np.random.Generator,
                      keep_last: bool) -> Iterator[ActivationBatch]:
    """Pool chunks until `buffer` tokens, shuffle the pool, emit full batches; leftovers join the next pool."""
    xs, ys, size = [], [], 0
    for x, y in chunks:
        xs.append(x)
        ys.append(y)
        size += len(x)
        if size >= buffer:
            x, y = _permuted(xs, ys, rng)
            full = len(x) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield ActivationBatch(x[start:start + batch_size], y[start:start + batch_size])
            xs, ys, size = [x[full:]], [y[full:]], len(x) - full
    if size:
        x, y = _permuted(xs, ys, rng)
        stop = len(x) if keep_last else len(x) // batch_size * batch_size
        for start in range(0, stop, batch_size):
            yield ActivationBatch(x[start:start + batch_size], y[start:start + batch_size])


def _permuted(xs: list[Tensor], ys: list[Tensor], rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """The pooled rows shuffled; empties the pool lists first, so at most two copies of the pool exist at once."""
    x, y = torch.cat(xs), torch.cat(ys)
    xs.clear(), ys.clear()
    order = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    return x[order], y[order]


def _batched(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter)."""
    items = iter(items)
    while batch := list(islice(items, size)):
        yield batch
