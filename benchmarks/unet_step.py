"""Whole-UNet training step, side by side: fused masked LoRA vs peft LoRA vs the frozen floor.

    PYTHONPATH=. python -m benchmarks.unet_step [--config tiny|sd15] [--reps N] [--rank R] [--threads T]

One step = forward + backward of an MSE loss against a noise target, batch 1, latent 8x8 (tiny)
or 32x32 (sd15), random weights built from a config (no downloads). Schemes, for each target set
(``attention`` = to_q/to_k/to_v/to_out.0; ``all`` = every nn.Linear and nn.Conv2d):

- ``floor``          frozen UNet, no adapter; the latent requires grad so dx flows through every
                     layer (what any adapter method pays at least). The baseline of the ratios.
- ``peft``           a real peft ``LoraConfig(r=R, target_modules=...)`` via ``unet.add_adapter``
                     (dense LoRA; for ``all`` the list of every Linear/Conv2d module name).
- ``ours_dense``     ``spare_kernels.patch_unet`` with no masks (dense adapter, fused op).
- ``ours_element50`` ``patch_unet`` with 50% random element masks on every targeted weight.
- ``spare_ref``      SPARE's own layers (``spare_kernels.unlearn.reference.SpareRefLayer``: dense uint8 mask
                     cast to the delta's dtype at use, a second full GEMM/conv) on the same targets with
                     the same masks.

Every variant is a copy of one UNet sharing its (frozen) parameter tensors, so sd15 fits in memory
once; all are timed interleaved in one process (``spare_kernels.bench.time_side_by_side``,
median). Only ratios are meaningful. Writes ``benchmarks/results/unet_step_<config>.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time

import torch
from torch import nn

import spare_kernels as sk
from spare_kernels.bench import time_side_by_side
from spare_kernels.utils import measure_peak
from spare_kernels.utils.io import write_json

from .baselines import patch_spare_ref
from .shapes import SD15, TINY

CONFIGS = {"tiny": (TINY, 8), "sd15": (SD15, 32)}   # (config, latent size)
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
SCHEMES = ("floor", "peft", "ours_dense", "ours_element50", "spare_ref")
TARGET_SETS = ("attention", "all")


def build(config: str):
    from diffusers import UNet2DConditionModel
    cfg, hw = CONFIGS[config]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, hw, hw, generator=g), torch.tensor([500]),
              torch.randn(1, 77, cfg["cross_attention_dim"], generator=g), torch.randn(1, 4, hw, hw, generator=g))
    return unet, inputs


def share_copy(unet: nn.Module) -> nn.Module:
    """A new module tree holding the very same parameter tensors (no weight memory)."""
    return copy.deepcopy(unet, memo={id(p): p for p in unet.parameters()})


def variants(unet: nn.Module, rank: int) -> dict[str, nn.Module]:
    from peft import LoraConfig
    all_names = [n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    out = {"floor": unet}
    for ts in TARGET_SETS:
        peft_targets = ATTN if ts == "attention" else all_names
        p = share_copy(unet)
        p.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=peft_targets, init_lora_weights=False))
        out[f"peft/{ts}"] = p
        out[f"ours_dense/{ts}"] = sk.patch_unet(share_copy(unet), rank=rank, target_modules=ts, init="random")
        e = sk.patch_unet(share_copy(unet), rank=rank, target_modules=ts, init="random")
        g = torch.Generator().manual_seed(2)
        for name, m in sk.nn.iter_patched(e):
            m.set_mask("default", sk.Mask.from_dense(torch.rand(m.weight.shape, generator=g) < 0.5))
        out[f"ours_element50/{ts}"] = e
        # SPARE's own scheme on the same targets and the same masks (dense float mask, second GEMM)
        out[f"spare_ref/{ts}"] = patch_spare_ref(share_copy(unet), {f"{n}.weight": m.masks["default"]
                                                                      for n, m in sk.nn.iter_patched(e)}, rank)
    for m in out.values():   # only the adapters train; the base tensors are shared and frozen
        assert all("lora_" in n for n, p in m.named_parameters() if p.requires_grad)
    return out


def step_fn(model: nn.Module, inputs, needs_dx: bool):
    x, t, ehs, target = inputs
    x = x.clone().requires_grad_(needs_dx)
    params = [p for p in model.parameters() if p.requires_grad]

    def go():
        loss = nn.functional.mse_loss(model(x, t, encoder_hidden_states=ehs).sample, target)
        loss.backward()
        x.grad = None
        for p in params:
            p.grad = None
    return go


def with_progress(fns: dict, rounds: int) -> dict:
    """The same closures; one line on stderr per round of all of them (sd15 rounds take minutes)."""
    done = [0]
    t0 = time.perf_counter()

    def wrap(fn):
        def go():
            fn()
            done[0] += 1
            if done[0] % len(fns) == 0:
                print(f"  round {done[0] // len(fns)}/{rounds} done, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
        return go
    return {k: wrap(f) for k, f in fns.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--memory", action="store_true",
                    help="also the peak CPU memory of one step of ours_element50 and spare_ref (measure_peak)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/unet_step_<config>.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unet, inputs = build(args.config)
    models = variants(unet, args.rank)
    fns = {k: step_fn(m, inputs, needs_dx=(k == "floor")) for k, m in models.items()}
    t = time_side_by_side(with_progress(fns, args.reps + 2), reps=args.reps, warmup=2)
    floor = t["floor"]
    hw = CONFIGS[args.config][1]
    print(f"unet_step --config {args.config}: forward+backward of an MSE loss, batch 1, {hw}x{hw} latent, rank "
          f"{args.rank}, median of {args.reps} interleaved reps, {torch.get_num_threads()} threads, "
          f"backend {sk.backend_info()['ops']['masked_lora_linear']['cpu']}")
    print(f"ratio = time / floor (frozen UNet, dx flows, no adapter) = {1e3 * floor:.1f} ms")
    print(f"{'scheme':<16}" + "".join(f"{ts:>12}{'ms':>10}" for ts in TARGET_SETS))
    rows = {}
    for s in SCHEMES:
        keys = {ts: "floor" if s == "floor" else f"{s}/{ts}" for ts in TARGET_SETS}
        rows[s] = {ts: {"ms": 1e3 * t[k], "ratio": t[k] / floor} for ts, k in keys.items()}
        print(f"{s:<16}" + "".join(f"{rows[s][ts]['ratio']:>12.2f}{rows[s][ts]['ms']:>10.1f}" for ts in TARGET_SETS))
    peaks = {}
    if args.memory:
        for ts in TARGET_SETS:
            for sch in ("ours_element50", "spare_ref"):
                peaks[f"{sch}/{ts}"] = measure_peak(fns[f"{sch}/{ts}"])[1] / 2**20
            print(f"peak MB, {ts}: ours_element50 {peaks[f'ours_element50/{ts}']:.0f}, spare_ref "
                  f"{peaks[f'spare_ref/{ts}']:.0f} (ratio {peaks[f'ours_element50/{ts}'] / peaks[f'spare_ref/{ts}']:.2f})")
    res = {"peak_mb": peaks, "config": args.config, "latent": hw, "batch": 1, "rank": args.rank, "reps": args.reps,
           "baseline": "floor", "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine(), "backend": sk.backend_info()["ops"],
           "rows": rows, "seconds": t}
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    path = write_json(args.out or os.path.join(folder, f"unet_step_{args.config}.json"), res)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
