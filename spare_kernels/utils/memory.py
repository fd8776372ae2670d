"""CPU peak-memory measurement: :func:`measure_peak`.

torch (as of 2.13) keeps no statistics for its CPU allocator (``torch.cpu`` has no
``memory_allocated``/``max_memory_allocated``, ``torch._C`` no CPU allocator stats), but the c10
CPU allocator reports every allocation and free to the profiler when memory profiling is on
(``ProfiledCPUMemoryReporter``). So :func:`measure_peak` runs ``fn`` under
``torch.profiler.profile(profile_memory=True)``, collects the allocation records (``+bytes`` /
``-bytes``, with timestamps) of the CPU device, and takes the running maximum of their sum in time
order. This sees allocations made anywhere through the c10 CPU allocator on the calling thread:
ATen ops, tensors created in Python, and C++ extension kernels.

Limits (all make the figure an undercount or overcount by only what they name):

- Frees of memory allocated *before* the measurement started are not reported by c10 (it does not
  know their size), so they do not lower the running sum: the figure is then an upper bound.
- Allocations made on OpenMP worker threads inside a ``parallel_for`` region are most likely not
  seen (the profiler's thread-local state is not propagated to them by torch's OpenMP backend);
  ATen kernels allocate their outputs and workspaces before entering parallel regions, so this can
  miss at most per-thread scratch. Allocations on the calling thread (including in a parallel
  region's master thread) are seen.
- Memory not obtained through the c10 allocator (e.g. a library's own ``malloc``, oneDNN/MKL
  internal scratch) is not counted.
- Profiling adds a per-op overhead: do not time code inside ``measure_peak``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings


__all__ = ["measure_peak"]


def _allocation_events(prof):
    """``(time_ns, bytes)`` of every CPU allocation (+) / free (-) record, in time order."""
    from torch._C._profiler import _EventType

    out = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if f.device.type == "cpu" and f.alloc_size != 0:
                out.append((e.start_time_ns, f.alloc_size))
        stack.extend(e.children)
    out.sort(key=lambda t: t[0])      # stable: records with equal time keep their tree order
    return out


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto prints 'profiler_start' / 'profiler_stop' lines to file descriptor 2 from C++; they
    would land in every CLI run's output. Only the start and stop calls are silenced, not ``fn``."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):   # no real stderr (captured, embedded)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def measure_peak(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` and return ``(result, peak_extra_bytes)``.

    ``peak_extra_bytes`` is the highest amount of CPU memory held through the c10 allocator at any
    moment during ``fn``, above what was live when it started (so 0 for a function that allocates
    nothing; memory still held by the result counts). See the module docstring for what is seen.

    Cannot be nested, nor used while another ``torch.profiler`` session is active.
    """
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _native_stderr_silenced():
            prof.start()
        try:
            result = fn(*args, **kwargs)
        finally:
            with _native_stderr_silenced():
                prof.stop()
    running = peak = 0
    for _, nbytes in _allocation_events(prof):
        running += nbytes
        peak = max(peak, running)
    return result, int(peak)
