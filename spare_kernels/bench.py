"""Side-by-side timing: medians of interleaved repetitions in one process.

These machines are noisy, so only ratios between schemes timed together are meaningful. The
anchors the benchmarks compare against live in the repository's ``benchmarks/baselines.py``.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def _cuda_seconds(fn, device) -> float:
    """One call timed by CUDA events on the current stream, the GPU idle before it (synchronised)."""
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _wall_seconds(fn, device=None) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_side_by_side(fns: dict[str, Callable[[], object]], reps: int = 7, warmup: int = 2,
                      device: Optional[torch.device] = None) -> dict[str, float]:
    """Median seconds per call of each fn; calls interleaved so drift hits all alike. On a CUDA
    ``device`` each call is timed by CUDA events after a synchronisation (no queued work counted)."""
    if reps < 1:
        raise ValueError(f"reps: expected >= 1, got {reps}")
    cuda = device is not None and torch.device(device).type == "cuda"
    clock = _cuda_seconds if cuda else _wall_seconds
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            samples[k].append(clock(fns[k], device))
    return {k: statistics.median(v) for k, v in samples.items()}
