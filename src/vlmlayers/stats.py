"""Shared statistics for the tidy result tables."""

from __future__ import annotations

import numpy as np

TABLE_COLUMNS = ("value", "ci_low", "ci_high", "n", "seed")


def bootstrap_ci(
    per_sample: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    statistic=np.mean,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (or ``statistic``, e.g. ``np.median``) of
    ``per_sample`` (Efron & Tibshirani 1993).

    ``per_sample`` may be 2-D (rows = samples, columns = independent statistics, e.g. layers);
    then the bounds are arrays, one per column, from shared resamples.
    """
    values = np.asarray(per_sample, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = statistic(values[idx], axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    return low, high


def relative_depth(layer: int | np.ndarray, n_layers: int) -> float | np.ndarray:
    """Layer index over the number of decoder blocks (layer 0 = embeddings -> 0.0, last -> 1.0)."""
    return np.asarray(layer) / n_layers
