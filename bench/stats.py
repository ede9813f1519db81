"""Medians with 95% confidence intervals, and the change between two runs.

A median's interval is distribution-free: between the j-th and k-th smallest of n samples,
the narrowest symmetric pair whose binomial coverage is at least 95% (the sample median of n
values lies between x(j) and x(k) with probability P(j <= Bin(n, 1/2) < k)). It needs n >= 6:
with fewer, even (min, max) covers less than 95%, and the interval is NaN.

Ratios to hf are paired per round: round r's engine time over round r's hf time, whose median
and interval come as above. The change of a metric between two runs is the ratio of the two
medians, its interval from a percentile bootstrap (each run's samples resampled on their own,
a fixed seed: the same two runs always get the same verdict).
"""
from __future__ import annotations

import math

import numpy as np

LEVEL = 0.95
BOOTSTRAP = 4000


def _coverage(n: int, j: int) -> float:
    """P(x(j) <= median <= x(n+1-j)) for n samples, j counted from 1."""
    below = sum(math.comb(n, i) for i in range(j)) / 2 ** n
    return 1.0 - 2.0 * below


def order_ranks(n: int, level: float = LEVEL) -> tuple[int, int] | None:
    """(j, k), 1-based, of the narrowest symmetric order-statistic interval for the median of
    n samples that covers at least `level`; None when no interval does (n < 6 at 95%)."""
    best = None
    for j in range(1, n // 2 + 1):
        if _coverage(n, j) >= level:
            best = (j, n + 1 - j)
        else:
            break
    return best


def finite(samples) -> np.ndarray:
    """The samples that are numbers (NaN and infinities left out: a lost measurement)."""
    a = np.asarray(samples, dtype=float)
    return a[np.isfinite(a)]


def median_ci(samples) -> tuple[float, float, float]:
    """(median, low, high) of the finite samples; low and high NaN with fewer than 6."""
    x = np.sort(finite(samples))
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    ranks = order_ranks(len(x))
    if ranks is None:
        return float(np.median(x)), math.nan, math.nan
    return float(np.median(x)), float(x[ranks[0] - 1]), float(x[ranks[1] - 1])


def change_ci(base, new, seed: int = 0) -> tuple[float, float, float]:
    """(median(new) / median(base), low, high): the ratio of the medians with its 95%
    percentile-bootstrap interval; NaN where either side has no positive finite sample, and
    an interval of NaN where either has fewer than 3."""
    b, n = finite(base), finite(new)
    if len(b) == 0 or len(n) == 0 or np.median(b) <= 0:
        return math.nan, math.nan, math.nan
    point = float(np.median(n) / np.median(b))
    if len(b) < 3 or len(n) < 3:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    mb = np.median(rng.choice(b, (BOOTSTRAP, len(b))), axis=1)
    mn = np.median(rng.choice(n, (BOOTSTRAP, len(n))), axis=1)
    ratios = mn / np.where(mb > 0, mb, np.nan)
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.nanpercentile(ratios, [tail, 100 - tail])
    return point, float(lo), float(hi)
