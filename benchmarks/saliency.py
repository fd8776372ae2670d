"""Whole-UNet saliency: this library's SaliencyCollector against the two anchors.

``PYTHONPATH=. python -m benchmarks.saliency [--config sd15|tiny] [--batch 8] [--reps 3]``

The anchors run SPARE's own saliency loop (``vision_unlearning/utils/parameter_attribution.py`` in
the authors' ``vision-unlearning`` package): ``unet.requires_grad_(True)``; per batch: forward,
``unet.zero_grad()``, backward, ``saliency[name] += param.grad.abs()`` for every parameter. Its
``.grad`` tensors therefore live from one backward through the next forward.

- ``sample_abs`` (Σ_i |g_i|, batch B in one backward) vs ``naive_per_sample`` (that loop at
  batch 1, its default, over the B samples);
- ``grad_abs`` (|Σ_i g_i|) vs ``full_grad`` (that loop at batch B): time and steady-state peak
  memory (``measure_peak``, c10 allocator, over two consecutive batches);
- ``floor``: forward + backward at batch B with no weight gradient at all (input gradient only),
  the lower bound of any saliency method on this CPU.
Writes ``benchmarks/results/saliency_<config>.json``.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from spare_kernels import SaliencyCollector
from spare_kernels.bench import time_side_by_side
from spare_kernels.utils import measure_peak
from spare_kernels.utils.io import write_json

from .shapes import build_unet, unet_inputs

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def _loss(unet, x, t, e):
    out = unet(x, t, encoder_hidden_states=e).sample
    return F.mse_loss(out, torch.zeros_like(out))


def schemes(unet, inputs, names):
    S = {}

    def collector(stat):
        col = SaliencyCollector(unet, stat=stat)    # kept across batches, as over a forget set

        def go():
            with col:
                _loss(unet, *inputs).backward()
            return col.scores()
        return go

    def spare_batch(x, t, e):
        """One batch of SPARE's loop: forward, zero_grad (set_to_none), backward, += |grad|."""
        loss = _loss(unet, x, t, e)
        unet.zero_grad()
        loss.backward()
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if p.grad is not None:
                    S[n] = S[n].add_(p.grad.abs()) if n in S else p.grad.abs()

    def full_grad():
        spare_batch(*inputs)
        return S

    def naive_per_sample():
        x, t, e = inputs
        for i in range(x.shape[0]):
            spare_batch(x[i:i + 1], t[i:i + 1], e[i:i + 1])
        return S

    def floor():
        x, t, e = inputs
        _loss(unet, x.detach().requires_grad_(), t, e).backward()

    make = {"sample_abs": lambda: collector("sample_abs"), "naive_per_sample": lambda: naive_per_sample,
            "grad_abs": lambda: collector("grad_abs"), "full_grad": lambda: full_grad, "floor": lambda: floor}
    return {n: make[n]() for n in names}, S


def _with_grads(unet, fn):
    def go():
        unet.requires_grad_(True)
        try:
            return fn()
        finally:
            unet.requires_grad_(False)
    return go


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
    # Groups timed side by side, state dropped in between (an SD-1.5 accumulator is 3.4 GB).
    for group in (("sample_abs", "naive_per_sample", "floor"), ("grad_abs", "full_grad")):
        anchors = [n for n in group if n in ("naive_per_sample", "full_grad")]
        unet.requires_grad_(False)
        fns, S = schemes(unet, inputs, group)
        # SPARE's loop needs requires_grad on every parameter; the collector must not see it.
        wrapped = {n: (_with_grads(unet, f) if n in anchors else f) for n, f in fns.items()}
        t.update(time_side_by_side(wrapped, reps=a.reps, warmup=1))
        if group[0] == "grad_abs":
            # Steady state of a pass over many batches: two batches inside one measurement, so the
            # .grad tensors full_grad keeps from batch 1 through batch 2's forward are seen (c10
            # reports no sizes for frees of memory allocated before a measurement). Both already
            # hold their fp32 accumulators, made by the timed runs.
            unet.zero_grad()
            mem = {name: measure_peak(lambda f=wrapped[name]: (f(), f()))[1] for name in group}
        unet.zero_grad()
        del fns, wrapped, S
    grad_bytes = sum(p.numel() * 4 for p in unet.parameters())
    res = {
        "config": a.config, "batch": a.batch, "latent": latent, "reps": a.reps,
        "threads": torch.get_num_threads(),
        "seconds": t,
        "sample_abs_speedup_vs_naive_per_sample": t["naive_per_sample"] / t["sample_abs"],
        "bound_speedup_naive_per_sample_over_floor": t["naive_per_sample"] / t["floor"],
        "grad_abs_time_vs_full_grad": t["grad_abs"] / t["full_grad"],
        "peak_mb": {k: v / 2**20 for k, v in mem.items()},
        "fp32_grad_mb": grad_bytes / 2**20,
        "peak_saving_mb": (mem["full_grad"] - mem["grad_abs"]) / 2**20,
    }
    print(f"whole {a.config} UNet, batch {a.batch}, {latent}x{latent} latent, fp32, medians of {a.reps}")
    for k, v in t.items():
        print(f"  {k:<18}{v:>9.2f} s")
    print(f"  sample_abs is {res['sample_abs_speedup_vs_naive_per_sample']:.2f}x faster than naive_per_sample "
          f"(target >= 4; bound naive_per_sample/floor = {res['bound_speedup_naive_per_sample_over_floor']:.2f}x)")
    print(f"  grad_abs time / full_grad time = {res['grad_abs_time_vs_full_grad']:.2f} (target <= 1.0)")
    print(f"  peak MB: grad_abs {res['peak_mb']['grad_abs']:.0f}, full_grad {res['peak_mb']['full_grad']:.0f}; "
          f"saving {res['peak_saving_mb']:.0f} MB vs fp32 grads {res['fp32_grad_mb']:.0f} MB (target: saving >= grads)")
    out = a.out or os.path.join(RESULTS, f"saliency_{a.config}.json")
    write_json(out, res)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    main()
