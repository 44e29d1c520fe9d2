"""Reference implementations of the KL (entropy) threshold search that ``bench_calibrators.py``
compares ptqkit's vectorized solver with: a straightforward loop over the thresholds (TensorRT's
algorithm as published), and the naive loop of the course chapter (seed-chapter-9.2)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from calibrators_data import KL_BINS

# -- KL search: a straightforward loop over the thresholds (TensorRT, as published) --------------


def kl_loop(hist: np.ndarray, levels: int) -> tuple[int, np.ndarray]:
    """For every threshold bin ``i`` in ``[levels, n]``: ``P`` = first ``i`` bins + the outliers
    in bin ``i-1``; ``Q`` = the first ``i`` bins merged into ``levels`` groups, each group's count
    spread over the bins where ``P > 0``; ``KL(P‖Q)`` (inf where ``Q = 0 < P``). Returns the best
    ``i`` (the first minimum) and the KL of every candidate."""
    n = hist.shape[0]
    best_i, best_kl, curve = n, math.inf, []
    for i in range(levels, n + 1):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        width = i // levels
        q = np.zeros(i)
        for g in range(levels):
            start = g * width
            stop = i if g == levels - 1 else start + width
            nz = p[start:stop] > 0
            k = int(nz.sum())
            if k:
                q[start:stop][nz] = hist[start:stop].sum() / k
        mask = p > 0
        if (q[mask] == 0).any():
            kl = math.inf
        else:
            pn, qn = p[mask] / p.sum(), q[mask] / q.sum()
            kl = float(np.sum(pn * np.log(pn / qn)))
        curve.append(kl)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i, np.array(curve)


# -- KL search: the chapter's naive loop -----------------------------------------------------------


def chapter_kl_step(xt: torch.Tensor, hist: np.ndarray, edges: np.ndarray, i: int) -> float:
    """One threshold of the chapter's loop: quantize all values with ``T = edges[i]``,
    histogram the reconstruction on the same edges, KL against the data histogram (with the
    chapter's ``1e-10`` guards)."""
    threshold = edges[i]
    scale = threshold / 127
    xq = torch.clamp(torch.round(xt / scale), -128, 127)
    recon, _ = np.histogram((xq * scale).numpy(), bins=edges)
    recon = recon / (recon.sum() + 1e-10)
    return float(np.sum(hist * np.log(hist / (recon + 1e-10) + 1e-10)))


def chapter_kl(x: np.ndarray, bins: int = KL_BINS, thresholds: list[int] | None = None):
    """The chapter's ``kl_divergence``: a signed histogram of ``x`` (``bins`` bins over
    ``[min, max]``); every bin edge ``1..bins-2`` is tried as the threshold. Returns
    ``(best threshold, seconds per threshold)``."""
    xt = torch.from_numpy(x)
    hist, edges = np.histogram(x, bins=bins)
    hist = hist / hist.sum()
    idx = thresholds if thresholds is not None else range(1, bins - 1)
    best_t, best_kl, t0 = None, math.inf, time.perf_counter()
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in idx:
            kl = chapter_kl_step(xt, hist, edges, i)
            if kl < best_kl:
                best_kl, best_t = kl, float(edges[i])
    return best_t, (time.perf_counter() - t0) / len(idx)
