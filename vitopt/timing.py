"""Latency measurement: warm-up, repeated timed runs, median and spread.

Used by the compile report, `vitopt bench` and the benchmarks, so every number vitopt
prints is measured the same way. Never used inside unit tests to assert speed.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, List


@dataclass
class Timing:
    """Milliseconds per call over `runs` timed calls after `warmup` untimed ones."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    warmup: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median_ms:.2f} ms (p10 {self.p10_ms:.2f}, p90 {self.p90_ms:.2f}, n={self.runs})"


def _quantile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(fn: Callable[[], object], *, warmup: int = 3, runs: int = 10,
            min_seconds: float = 0.0) -> Timing:
    """Time `fn()`; keeps running past `runs` until `min_seconds` of timed calls have passed."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    started = time.perf_counter()
    while len(samples) < runs or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(samples), _quantile(samples, 0.1), _quantile(samples, 0.9),
                  min(samples), len(samples), warmup)


def summarize(samples: List[float], warmup: int) -> Timing:
    """The Timing of `samples` (ms per call)."""
    return Timing(statistics.median(samples), _quantile(samples, 0.1), _quantile(samples, 0.9),
                  min(samples), len(samples), warmup)


def measure_rounds(fns: dict, *, warmup: int = 3, runs: int = 10, rounds: int = 3) -> dict:
    """Run several callables in alternating rounds (`runs` calls of each per round) so machine
    drift hits each equally. Returns {name: [[ms of each call] per round]}."""
    samples = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            this_round = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                this_round.append((time.perf_counter() - t0) * 1e3)
            samples[name].append(this_round)
    return samples


def measure_interleaved(fns: dict, *, warmup: int = 3, runs: int = 10, rounds: int = 3) -> dict:
    """Time several callables in alternating rounds (`measure_rounds`).

    Returns {name: Timing} built from all `runs * rounds` samples of each callable.
    """
    return summarize_rounds(measure_rounds(fns, warmup=warmup, runs=runs, rounds=rounds), warmup)


def summarize_rounds(by_round: dict, warmup: int) -> dict:
    """{name: Timing} over all rounds of `measure_rounds`' result."""
    return {name: summarize([ms for r in rounds for ms in r], warmup)
            for name, rounds in by_round.items()}


def paired_ratio(numerator: List[List[float]], denominator: List[List[float]]) -> dict:
    """Speed ratio of two callables timed in the same rounds (`measure_rounds`), paired by
    round: the median over rounds of (median of `numerator`'s calls / median of
    `denominator`'s), with its 10th and 90th percentiles. Pairing cancels drift that lasts
    longer than a round, which the ratio of the overall medians does not."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired_ratio needs the same rounds for both callables, got "
                         f"{len(numerator)} and {len(denominator)}")
    ratios = [statistics.median(a) / statistics.median(b) for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(ratios), "p10": _quantile(ratios, 0.1),
            "p90": _quantile(ratios, 0.9), "rounds": len(ratios)}
