"""Side-by-side timing: medians of interleaved repetitions in one process.

These machines are noisy, so only ratios between schemes timed together are meaningful. The
anchors the benchmarks compare against live in the repository's ``benchmarks/baselines.py``.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable



def time_side_by_side(fns: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn; calls interleaved so drift hits all alike."""
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[k]()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}
