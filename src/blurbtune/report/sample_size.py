"""The smallest sample each test or interval of the report needs, and why.

Below its minimum a test gives no p-value and an interval no bounds: the table says
`n too small: ...` instead, and a verdict never rests on it. Each minimum follows from the
test's own mathematics (see each function); none is a rule of thumb.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from scipy import integrate
from scipy.special import ndtr

# Scores are fractions (0-1): two differences or deviations closer than this are equal, and
# what separates them is float rounding (0.80 - 0.75 != 0.75 - 0.70 in binary).
EQUAL = 1e-12

# Paired t-test: t = mean / (sd / sqrt(n)) has n - 1 degrees of freedom; one pair has none.
TTEST_PAIRS = 2
# Brown-Forsythe (Levene about the median): with two values a group, both lie |x1 - x2| / 2
# from their median, so every group's absolute deviations are equal, the within-group variance
# of the deviations is 0 and the statistic is infinite (p = 0) whatever the data.
BROWN_FORSYTHE_GROUP = 3
# Fisher's exact test and the Wilson interval are exact or well defined from one observation;
# with none there is no proportion.
FISHER_GROUP = 1
WILSON_N = 1


TOO_SMALL = "n too small"


def too_small(sizes: str, need: str) -> str:
    """The note a table shows instead of a p-value or an interval.

    >>> too_small("2 vs 2", "≥3 a group")
    'n too small: 2 vs 2, needs ≥3 a group'
    """
    return f"{TOO_SMALL}: {sizes}, needs {need}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def wilcoxon_min(alpha: float) -> int:
    """Non-zero differences the exact two-sided signed-rank test needs to reach p < alpha.

    Its smallest p is 2 / 2^n (every difference of one sign); with fewer differences no data
    can be significant, and a printed p only reads as "nearly". 6 at alpha 0.05.
    """
    n = 1
    while 2.0 / 2**n >= alpha:
        n += 1
    return n


def bootstrap_mean_min(confidence: float) -> int:
    """Values a percentile bootstrap interval of the mean needs to be able to cover.

    The interval lies within [min, max] of the sample (every resampled mean does), and for a
    symmetric distribution [min, max] misses the centre when all n values fall on one side of
    it: probability 2 / 2^n. Smallest n with 1 - 2 / 2^n >= confidence: 6 at 95%.
    """
    n = 1
    while 1 - 2.0 / 2**n < confidence:
        n += 1
    return n


@cache
def bootstrap_std_min(confidence: float) -> int:
    """Values a percentile bootstrap interval of the std needs to be able to cover sigma.

    The interval lies within [0, s_max], s_max the largest std a resample can have: half its
    draws at the sample's min, half at its max, s_max = R * sqrt(k (n - k) / (n (n - 1))),
    k = n // 2, R the sample's range. For normal scores it can cover sigma only when
    R >= sigma / sqrt(...), an event of the range of n standard normals. Smallest n where that
    event reaches `confidence`: 11 at 95% (at n = 10 even the widest interval misses 5.6%).
    A necessary condition: above it the interval is still approximate.
    """
    n = 2
    while _range_at_least(_widest_std_factor(n) ** -1, n) < confidence:
        n += 1
    return n


def _widest_std_factor(n: int) -> float:
    k = n // 2
    return math.sqrt(k * (n - k) / (n * (n - 1)))


SQRT_2PI = math.sqrt(2 * math.pi)


def _range_at_least(r: float, n: int) -> float:
    """P(range of n standard normals >= r) = 1 - n * ∫ φ(x) (Φ(x + r) - Φ(x))^(n-1) dx."""
    def density(x: float) -> float:  # scipy.special's ndtr: stats.norm's cdf, a tenth the cost
        return math.exp(-x * x / 2) / SQRT_2PI * (ndtr(x + r) - ndtr(x)) ** (n - 1)

    return 1 - n * integrate.quad(density, -np.inf, np.inf)[0]
