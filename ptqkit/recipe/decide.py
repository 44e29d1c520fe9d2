"""How :func:`ptqkit.tune` decides that one recipe beats another on the held-out samples.

Every candidate is compared, *paired* on the same held-out samples, with the incumbent (the best
recipe so far) and with the base recipe. The comparison reads one continuous loss per sample,
``ℓ_i`` (:attr:`~ptqkit.recipe.holdout.Score.losses`): the KL divergence of the quantized
softmax from the float one for class scores, the squared output error for other float outputs,
``1`` for a changed prediction of an integer output. A count of flipped top-1 predictions is too
coarse on the few samples a calibration set can spare (32 of 128: a lead of 4 or fewer is never
significant), and taking the lower *mean* KL on a tie walked the demo from the base recipe
(100 %) through two ties to one 6 points worse (93.75 %) on those 32 samples.

The rule. With ``d_i = ℓ_i(new) - ℓ_i(old)`` over the ``n`` samples where they differ, the
Wilcoxon signed-rank statistic ``W⁺ = Σ_{d_i > 0} rank(|d_i|)`` (ties in ``|d|`` get their mean
rank) has, when neither is better, mean ``μ = n(n+1)/4`` and variance
``σ² = n(n+1)(2n+1)/24 - Σ_t (t³ - t)/48`` (``t``: sizes of tied groups); ``z = (W⁺ - μ)/σ``.
``new`` is *better* when ``z < -Z`` and *worse* when ``z > Z``, with ``Z = 1.645`` (one-sided
95 %); anything between is a tie, and **a tie keeps the incumbent**. A candidate replaces the
incumbent only if it is better than the incumbent and not worse than the base, and its top-1
agreement is not significantly lower than either's (the paired sign test,
:func:`~ptqkit.recipe.holdout.decisive`). Chains of ties therefore cannot move the choice: every
step away from the base is a significant improvement, checked against the base too.

The signed-rank test uses each sample's loss magnitude (unlike the sign test) but not the
magnitude of its outliers (unlike a t-test on the mean, which one sample with a huge KL
decides). The normal approximation is used from :data:`MIN_PAIRS` differing samples on; with
fewer (where it would call 4 samples out of 4 significant, the exact test not) ``z`` is 0: too
few samples to tell, and the incumbent stays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: one-sided 95 % normal quantile: the evidence a change of recipe needs
Z_95 = 1.645
#: fewest samples whose losses differ for the test to say anything
MIN_PAIRS = 10


def signed_rank_z(diff: torch.Tensor) -> float:
    """The Wilcoxon signed-rank ``z`` of the paired differences ``diff`` (negative: the first
    of the pair has the lower losses); ``0.0`` when fewer than :data:`MIN_PAIRS` differ."""
    d = diff.double().reshape(-1)
    # an infinite loss on one side (a non-finite quantized output) is the largest difference;
    # infinite on both (NaN) is no difference
    finite = d[torch.isfinite(d)]
    big = 2.0 * float(finite.abs().max()) + 1.0 if finite.numel() else 1.0
    d = d.nan_to_num(nan=0.0, posinf=big, neginf=-big)
    d = d[d != 0]
    n = d.numel()
    if n < MIN_PAIRS:
        return 0.0
    a = d.abs()
    order = torch.argsort(a)
    sorted_a = a[order]
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(1, n + 1, dtype=torch.float64)
    # ties in |d|: every member of a group gets the group's mean rank
    _, inverse, counts = torch.unique_consecutive(sorted_a, return_inverse=True, return_counts=True)
    if bool((counts > 1).any()):
        first = torch.cumsum(counts, 0) - counts + 1  # rank of each group's first member
        mean_rank = (first + (counts - 1) / 2.0).double()
        ranks[order] = mean_rank[inverse]
    w_plus = float(ranks[d > 0].sum())
    mu = n * (n + 1) / 4.0
    ties = float(((counts.double() ** 3) - counts.double()).sum()) / 48.0
    var = n * (n + 1) * (2 * n + 1) / 24.0 - ties
    if var <= 0:
        return 0.0
    return (w_plus - mu) / math.sqrt(var)


@dataclass(frozen=True)
class Verdict:
    """How a candidate compares with the incumbent and the base, and whether it is taken."""

    z_incumbent: float  # signed-rank z of the candidate's losses vs the incumbent's
    z_base: float  # ... vs the base recipe's
    agreement_ok: bool  # top-1 agreement not significantly below either's
    taken: bool

    def reason(self) -> str:
        """Why the candidate was (not) taken, in words, for the trial's record."""
        if self.taken:
            return f"better than the best so far (z {self.z_incumbent:+.2f} < -{Z_95})"
        if self.z_incumbent >= -Z_95:
            return f"not significantly better than the best so far (z {self.z_incumbent:+.2f})"
        if self.z_base > Z_95:
            return f"significantly worse than the base recipe (z {self.z_base:+.2f})"
        return "its top-1 agreement is significantly lower"


def judge(
    new: torch.Tensor, incumbent: torch.Tensor, base: torch.Tensor, agreement_ok: bool
) -> Verdict:
    """The verdict on a candidate's per-sample ``new`` losses against the ``incumbent``'s and
    the ``base``'s (same samples, same order), see the module docstring."""
    z_inc = signed_rank_z(new - incumbent)
    z_base = signed_rank_z(new - base)
    taken = z_inc < -Z_95 and z_base <= Z_95 and agreement_ok
    return Verdict(z_inc, z_base, agreement_ok, taken)


__all__ = ["MIN_PAIRS", "Z_95", "Verdict", "judge", "signed_rank_z"]
