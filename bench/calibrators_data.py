"""What ``bench_calibrators.py`` measures on: its settings and its tensors (the four
distributions, and the growing batches of the memory rows)."""

from __future__ import annotations

import numpy as np

KL_BINS, KL_LEVELS = 2048, 128  # the TensorRT setting: 2048 |x| bins, 128 levels
N_BATCHES = 10
SEED = 20240601
NAIVE_SUBSET = 16  # thresholds timed on all N values by the chapter's loop
NAIVE_SUBSAMPLE = 50_000  # values on which the chapter's loop runs over every threshold


def make_data(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    heavy = rng.standard_t(2, n)
    heavy[rng.choice(n, 8, replace=False)] = [1e3, -1e3, 1e3, -1e3, 1e3, -1e3, 1e3, 1e3]
    return {
        "gaussian": rng.standard_normal(n).astype(np.float32),
        "relu": np.maximum(rng.standard_normal(n), 0).astype(np.float32),
        "laplace": rng.laplace(size=n).astype(np.float32),
        "heavy (t2 + 1e3 outliers)": heavy.astype(np.float32),
    }


def memory_batches(n_batches: int, size: int) -> list[np.ndarray]:
    """Heavy-tailed batches whose range keeps growing (as the max of a growing sample does)."""
    rng = np.random.default_rng(SEED + 1)
    return [(rng.standard_t(2, size) * (1 + k / 50)).astype(np.float32) for k in range(n_batches)]
