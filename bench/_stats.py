"""Statistics for side-by-side benchmarks: a ratio with its confidence interval, from paired blocks.

Why paired blocks: on a shared machine the speed drifts by several percent over minutes, more than
the differences the benchmarks look for. Blocks of A and B alternate (ABBA: A B B A B A A B ...), so
each A block has a B neighbour measured under nearly the same load; the log of each pair's ratio
has the drift taken out. Their mean, back-transformed, is the ratio; its 95% interval is Student's t
on the pairs (and, beside it, a bootstrap interval that assumes nothing about their distribution).
A ratio "resolves 1%" when the interval's half-width is under 1%.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

# two-sided 97.5% quantiles of Student's t for small samples; 1.96 beyond
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    if df <= 0:
        return math.inf
    best = min((k for k in _T975 if k >= df), default=None)
    return _T975[best] if best is not None else 1.96


def order(rounds: int) -> list[str]:
    """ABBA over ``rounds`` pairs: every other pair starts with B, so order and drift cancel."""
    out: list[str] = []
    for r in range(rounds):
        out += ["a", "b"] if r % 2 == 0 else ["b", "a"]
    return out


def lag1(xs: list[float]) -> float:
    """Lag-1 autocorrelation of a series (0 for fewer than 3 values)."""
    n = len(xs)
    if n < 3:
        return 0.0
    m = statistics.fmean(xs)
    den = sum((x - m) ** 2 for x in xs)
    return sum((xs[i] - m) * (xs[i + 1] - m) for i in range(n - 1)) / den if den > 0 else 0.0


def paired_ratio(a: list[float], b: list[float], seed: int = 0) -> dict[str, Any]:
    """Ratio b/a of paired block times (a[i] and b[i] measured next to each other), with 95% intervals.

    Student's t on the pairs assumes they are independent; on a shared machine the load drifts over
    minutes, and neighbouring pairs can share it. When the pairs' lag-1 autocorrelation r is positive
    the interval is widened by sqrt((1 + r) / (1 - r)) (the AR(1) effective sample size): ``ci95`` is
    that honest interval, ``ci95_iid`` the plain one, and ``ci95_bootstrap`` (resampling pairs, which
    assumes independence too) is beside them."""
    logs = [math.log(y / x) for x, y in zip(a, b, strict=True)]
    n = len(logs)
    mean = statistics.fmean(logs)
    sd = statistics.stdev(logs) if n > 1 else math.inf
    half_iid = t975(n - 1) * sd / math.sqrt(n)
    r = lag1(logs)
    widen = math.sqrt((1 + r) / (1 - r)) if 0 < r < 1 else 1.0
    half = half_iid * widen
    rng = random.Random(seed)
    boots = sorted(statistics.fmean(rng.choices(logs, k=n)) for _ in range(2000))
    return {"ratio": math.exp(mean), "ci95": [math.exp(mean - half), math.exp(mean + half)],
            "ci95_iid": [math.exp(mean - half_iid), math.exp(mean + half_iid)],
            "ci95_bootstrap": [math.exp(boots[49]), math.exp(boots[1949])],
            "half_width_pct": 100 * (math.exp(half) - 1), "pairs": n, "pair_sd_pct": 100 * sd,
            "lag1_autocorrelation": r, "widened_by": widen,
            "pairs_to_resolve_1pct": math.ceil((1.96 * widen * sd / math.log(1.01)) ** 2) if sd < math.inf else None,
            "median_a": statistics.median(a), "median_b": statistics.median(b)}


def describe(r: dict[str, Any], what: str) -> str:
    lo, hi = r["ci95"]
    serial = (f", widened x{r['widened_by']:.2f} for serial correlation {r['lag1_autocorrelation']:+.2f}"
              if r.get("widened_by", 1.0) > 1.0 else "")
    return (f"{what} {100 * (r['ratio'] - 1):+.2f}% (95% CI {100 * (lo - 1):+.2f}% .. {100 * (hi - 1):+.2f}%, "
            f"+-{r['half_width_pct']:.2f}%, {r['pairs']} paired blocks, pair-to-pair sd {r['pair_sd_pct']:.1f}%"
            f"{serial}; resolving 1% would take ~{r.get('pairs_to_resolve_1pct')} pairs at this noise)")
