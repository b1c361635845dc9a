"""Wall-clock timing helpers: warm up, repeat, report the median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], *, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def interleaved_seconds(
    fns: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 1
) -> dict[str, list[float]]:
    """Times several functions in rounds (each runs once per round, in the given order) and
    returns every sample per name. A shared host drifts by tens of percent within seconds; taking
    each ratio within a round, instead of between medians measured one after the other, keeps
    that drift out of the ratio."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of numerator / denominator (paired samples)."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))
