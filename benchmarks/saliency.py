"""Whole-UNet saliency: this library's SaliencyCollector against the two anchors.

``PYTHONPATH=. python -m benchmarks.saliency [--config sd15|tiny] [--batch 8] [--reps 3]``

- ``sample_abs`` (Σ_i |g_i|, batch B in one backward) vs ``naive_per_sample`` (B backward passes of
  one sample each, ``.grad`` of every Linear/Conv2d weight, ``abs()`` accumulated);
- ``grad_abs`` (|Σ_i g_i|) vs ``full_grad`` (SPARE's code: weights require grad, one backward,
  ``.grad.abs()`` accumulated per batch), time and peak CPU memory (``measure_peak``, c10 allocator).
Writes ``benchmarks/results/saliency_<config>.json``.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

from spare_kernels import SaliencyCollector
from spare_kernels.bench import time_side_by_side
from spare_kernels.utils import measure_peak
from spare_kernels.utils.io import write_json

from .shapes import build_unet, unet_inputs

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _weights(unet):
    return [(n, m.weight) for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]


def _loss(unet, x, t, e):
    out = unet(x, t, encoder_hidden_states=e).sample
    return F.mse_loss(out, torch.zeros_like(out))


def schemes(unet, inputs, names):
    weights = _weights(unet)
    S = {}

    def collector(stat):
        col = SaliencyCollector(unet, stat=stat)    # kept across batches, as over a forget set

        def go():
            with col:
                _loss(unet, *inputs).backward()
            return col.scores()
        return go

    def grads_on(flag):
        for _, w in weights:
            w.requires_grad_(flag)

    def full_grad():
        grads_on(True)
        _loss(unet, *inputs).backward()
        for n, w in weights:       # SPARE's code: accumulate |grad| per batch, then drop .grad
            S[n] = S[n].add_(w.grad.abs()) if n in S else w.grad.abs()
            w.grad = None
        grads_on(False)
        return S

    def naive_per_sample():
        grads_on(True)
        x, t, e = inputs
        for i in range(x.shape[0]):
            _loss(unet, x[i:i + 1], t[i:i + 1], e[i:i + 1]).backward()
            for n, w in weights:
                S[n] = S[n].add_(w.grad.abs()) if n in S else w.grad.abs()
                w.grad = None
        grads_on(False)
        return S

    make = {"sample_abs": lambda: collector("sample_abs"), "naive_per_sample": lambda: naive_per_sample,
            "grad_abs": lambda: collector("grad_abs"), "full_grad": lambda: full_grad}
    return {n: make[n]() for n in names}, S


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15", choices=["sd15", "tiny"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--latent", type=int, default=None, help="default: 32 (sd15), 8 (tiny)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    latent = a.latent or (32 if a.config == "sd15" else 8)
    unet = build_unet(a.config).requires_grad_(False)
    inputs = unet_inputs(a.config, a.batch, latent)
    t, mem = {}, {}
    # Two groups, each timed side by side, state dropped in between (an SD-1.5 accumulator is 3.4 GB).
    for pair in (("sample_abs", "naive_per_sample"), ("grad_abs", "full_grad")):
        fns, S = schemes(unet, inputs, pair)
        t.update(time_side_by_side(fns, reps=a.reps, warmup=1))
        if pair[0] == "grad_abs":
            # Peak memory in the steady state of a pass over many batches: both schemes already hold
            # their fp32 accumulators (allocated by the timed runs); what differs is the rest.
            mem = {name: measure_peak(fns[name])[1] for name in pair}
        del fns, S
    grad_bytes = sum(w.numel() * 4 for _, w in _weights(unet))
    res = {
        "config": a.config, "batch": a.batch, "latent": latent, "reps": a.reps,
        "seconds": t,
        "sample_abs_speedup_vs_naive_per_sample": t["naive_per_sample"] / t["sample_abs"],
        "grad_abs_time_vs_full_grad": t["grad_abs"] / t["full_grad"],
        "peak_mb": {k: v / 2**20 for k, v in mem.items()},
        "fp32_grad_mb": grad_bytes / 2**20,
        "peak_saving_mb": (mem["full_grad"] - mem["grad_abs"]) / 2**20,
    }
    print(f"whole {a.config} UNet, batch {a.batch}, {latent}x{latent} latent, fp32, medians of {a.reps}")
    for k, v in t.items():
        print(f"  {k:<18}{v:>9.2f} s")
    print(f"  sample_abs is {res['sample_abs_speedup_vs_naive_per_sample']:.2f}x faster than naive_per_sample "
          f"(target >= 4)")
    print(f"  grad_abs time / full_grad time = {res['grad_abs_time_vs_full_grad']:.2f} (target <= 1.0)")
    print(f"  peak MB: grad_abs {res['peak_mb']['grad_abs']:.0f}, full_grad {res['peak_mb']['full_grad']:.0f}; "
          f"saving {res['peak_saving_mb']:.0f} MB vs fp32 grads {res['fp32_grad_mb']:.0f} MB (target: saving >= grads)")
    out = a.out or os.path.join(RESULTS, f"saliency_{a.config}.json")
    write_json(out, res)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
