"""Exact top-k element masks on the CPU: ``topk_masks`` (native engine) against SPARE's anchor (issue 29).

``PYTHONPATH=. python -m benchmarks.topk [--set sd15|large|both] [--densities 0.01 0.1 0.5] [--load]
[--quick] [--reps 3] [--out PATH]``

Methods, all on the same random fp32 scores (``torch.rand``), global scope:

- ``native``: ``topk_masks(scores, density)`` (csrc/cpu/topk.cpp; packed masks);
- ``cat_kthvalue``: SPARE's anchor as the issue describes it: ``torch.cat`` of the flattened scores,
  ``torch.kthvalue`` of the ``n - k + 1``-th smallest (the k-th largest), masks ``s >= thr`` (bool;
  every tie of the threshold is on, so it may keep a few more than k: ``anchor_selected``);
- ``cat_topk``: ``torch.topk`` of the concatenation, its indices scattered into a bool mask;
- ``generic``: ``topk_masks`` with the native engine switched off (this library's torch engine).

Sets: ``sd15``: one tensor per parameter of SD-1.5's UNet2DConditionModel (shapes read off a meta-device
model: 686 tensors, 859.5 M scores, 3.4 GB); ``large``: one tensor of 2^26 scores; ``--quick``: a
small set (5 tensors, 0.5 M scores, for the smoke test).

Times: median seconds of ``--reps`` interleaved calls (``spare_kernels.bench.time_side_by_side``);
ratios ``cat_kthvalue / native`` etc. are from the same run (the first call of a set above 2^27 scores
is not a warm-up: every call allocates afresh anyway). Peak memory, two ways, output masks included:
the c10 allocator's (``spare_kernels.utils.measure_peak``; the native engine allocates its histograms
and candidates through ATen, so they are seen) and the resident set's high-water mark above the start
(``VmHWM``; it also sees the std::vector of (value, index) pairs in ATen's ``torch.topk``).
``--load``: the times again with two busy Python processes (pure spin, same priority) beside it. The
generic engine runs on sets up to 2^27 scores only (at 860 M: ~20 s a call quiet, minutes under load).
Writes ``benchmarks/results/topk.json`` (atomic).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time

import torch

from spare_kernels import topk as _topk
from spare_kernels.bench import time_side_by_side
from spare_kernels.topk import topk_masks
from spare_kernels.utils import measure_peak
from spare_kernels.utils.io import write_json

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MB = 1 << 20


def score_shapes(name: str) -> list[tuple]:
    if name == "large":
        return [(1 << 26,)]
    if name == "quick":
        return [(320, 4, 3, 3), (320,), (640, 320), (77, 13), (512, 512)]
    from .shapes import build_unet
    return [tuple(p.shape) for p in build_unet("sd15", device="meta").parameters()]


def make_scores(shapes, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.rand(s, generator=g) for i, s in enumerate(shapes)}


def cat_kthvalue(scores: dict, density: float) -> dict:
    flat = torch.cat([s.flatten() for s in scores.values()])
    n = flat.numel()
    k = round(density * n)
    thr = torch.kthvalue(flat, n - k + 1).values
    return {name: s >= thr for name, s in scores.items()}


def cat_topk(scores: dict, density: float) -> dict:
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = round(density * flat.numel())
    idx = flat.topk(k, sorted=False).indices
    del flat
    m = torch.zeros(sum(s.numel() for s in scores.values()), dtype=torch.bool)
    m[idx] = True
    out, o = {}, 0
    for name, s in scores.items():
        out[name] = m[o:o + s.numel()].view(s.shape)
        o += s.numel()
    return out


def generic(scores: dict, density: float) -> dict:
    old, _topk._NATIVE = _topk._NATIVE, False
    try:
        return topk_masks(scores, density)
    finally:
        _topk._NATIVE = old


def methods(n: int, density: float, skip_topk: bool):
    fns = {"native": lambda s, d: topk_masks(s, d), "cat_kthvalue": cat_kthvalue}
    if n <= GIANT:        # the generic engine at 860 M scores: ~20 s a call quiet, minutes under load
        fns["generic"] = generic
    if not skip_topk:
        fns["cat_topk"] = cat_topk
    return fns


GIANT = 1 << 27


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_peak(fn, *args):
    """``(fn(*args), peak resident memory above the start during it)`` (Linux: VmHWM after resetting it
    through /proc/self/clear_refs; sees what the c10 allocator does not, e.g. ATen's topk queue)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return fn(*args), None
    base = _status("VmRSS")
    out = fn(*args)
    return out, _status("VmHWM") - base


class Load:
    """Two busy Python processes (pure spin) of this process's priority, while in the block."""

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def run_set(name, scores, densities, reps, load, max_topk_bytes):
    n = sum(s.numel() for s in scores.values())
    packed = sum(s.shape[0] * ((s.numel() // max(s.shape[0], 1) + 7) // 8) for s in scores.values())
    rows = []
    for d in densities:
        k = round(d * n)
        # torch.topk on the CPU: the 4n-byte concatenation and a (value, int64 index) pair per entry
        # (16 bytes each, ATen's topk queue), then k values and k indices
        need_topk = 20 * n + 12 * k
        skip = need_topk > max_topk_bytes
        fns = methods(n, d, skip)
        ref = fns["native"](scores, d)
        got = fns["cat_kthvalue"](scores, d)    # s >= thr: every tie of the threshold (k or a few more)
        anchor_selected = sum(int(m.sum()) for m in got.values())
        assert anchor_selected >= k == sum(int(m.to_dense().sum()) for m in ref.values())
        del got
        calls = {m: (lambda f=f: f(scores, d)) for m, f in fns.items()}
        warm = 0 if n > GIANT else 1          # every call of the big set allocates afresh anyway
        quiet = time_side_by_side(calls, reps=reps, warmup=warm)
        loaded = None
        if load:
            with Load():
                loaded = time_side_by_side(calls, reps=reps, warmup=warm)
        peak, rss = {}, {}
        for m, f in fns.items():
            (_, peak[m]), rss[m] = rss_peak(measure_peak, f, scores, d)
        del ref
        row = dict(set=name, tensors=len(scores), n=n, density=d, k=k, anchor_selected=anchor_selected,
                   packed_mask_bytes=packed,
                   quiet_s=quiet, load_s=loaded, peak_extra_bytes=peak, rss_peak_extra_bytes=rss,
                   skipped=([] if not skip else [f"cat_topk: needs ~{need_topk / 2**30:.1f} GiB beside the "
                                                 f"scores (--max-topk-gb)"]))
        rows.append(row)
        print_row(row)
    return rows


def print_row(r):
    q, l, p, rs = r["quiet_s"], r["load_s"], r["peak_extra_bytes"], r["rss_peak_extra_bytes"]

    def ratio(t, m):
        return f"{t[m] / t['native']:.2f}x" if t and m in t else "-"
    print(f"{r['set']:>5} {r['n'] / 1e6:7.1f}M d={r['density']:<5} "
          f"native {q['native']:.3f}s | cat+kthvalue/native {ratio(q, 'cat_kthvalue'):>6} "
          f"| cat+topk/native {ratio(q, 'cat_topk'):>6} | generic/native {ratio(q, 'generic'):>6}"
          + (f" || load: native {l['native']:.3f}s, cat+kthvalue/native {ratio(l, 'cat_kthvalue')}, "
             f"generic/native {ratio(l, 'generic')}" if l else "")
          + f" || peak extra MB: native {p['native'] / MB:.0f} (packed masks {r['packed_mask_bytes'] / MB:.0f}), "
          f"cat+kthvalue {p['cat_kthvalue'] / MB:.0f}"
          + (f", cat+topk {p['cat_topk'] / MB:.0f}" if "cat_topk" in p else "")
          + " | RSS peak extra MB: " + ", ".join(f"{m} {v / MB:.0f}" for m, v in rs.items() if v is not None), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", choices=("sd15", "large", "both"), default="both")
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.1, 0.5])
    p.add_argument("--load", action="store_true", help="also time with two busy processes beside it")
    p.add_argument("--quick", action="store_true", help="a small set, 1 rep (smoke test)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-topk-gb", type=float, default=6.0,
                   help="skip cat_topk where its concatenation + values + indices exceed this")
    p.add_argument("--out", default=os.path.join(RESULTS, "topk.json"))
    a = p.parse_args(argv)
    if _topk._native_ops({"x": torch.empty(1)}) is None:
        raise SystemExit("benchmarks.topk: the native engine (spare_kernels._C with topk_select) is not built")
    names = ["quick"] if a.quick else (["sd15", "large"] if a.set == "both" else [a.set])
    reps = 1 if a.quick else a.reps
    rows = []
    for name in names:
        scores = make_scores(score_shapes(name))
        t0 = time.perf_counter()
        rows += run_set(name, scores, a.densities, reps, a.load, a.max_topk_gb * 2**30)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        del scores
    res = dict(threads=torch.get_num_threads(), torch=torch.__version__, reps=reps, load=a.load,
               peak="spare_kernels.utils.measure_peak (c10 allocator, outputs included)", rows=rows)
    write_json(a.out, res)
    print(f"wrote {a.out}")
    return res


if __name__ == "__main__":
    main()
