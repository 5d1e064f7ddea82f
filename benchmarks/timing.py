"""Wall-clock timing shared by the benchmark scripts; standard library only, so that a script can time another
project's code in that project's own virtual environment (benchmarks/lerobot_speed.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def latency_ms(fn: Callable[[], object], repeats: int = 30, warmup: int = 3) -> dict:
    """Median and p90 wall time (ms) of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {"median_ms": statistics.median(times), "p90_ms": times[int(0.9 * (len(times) - 1))]}
