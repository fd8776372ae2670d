"""Whole-UNet training step, side by side: fused masked LoRA vs peft LoRA vs SPARE's layers vs the frozen floor.

    PYTHONPATH=. python -m benchmarks.unet_step [--config tiny|sd15] [--reps N] [--rank R] [--threads T]
                                                [--targets attention all] [--delta-rel F] [--flush-denormal]

One step = forward + backward of an MSE loss against a noise target, batch 1, latent 8x8 (tiny)
or 32x32 (sd15), random weights built from a config (no downloads). Schemes, for each target set
(``attention`` = every to_q/to_k/to_v/to_out.0; ``all`` = every nn.Linear and nn.Conv2d), each on the
very same qualified layer names:

- ``floor``          frozen UNet, no adapter; the latent requires grad so dx flows through every
                     layer (what any adapter method pays at least). The baseline of the ratios.
- ``peft``           peft's ``LoraConfig(r=R, lora_alpha=R)`` via ``inject_adapter_in_model`` (dense LoRA,
                     peft's own layers).
- ``ours_dense``     ``spare_kernels.patch_unet`` with no masks (dense adapter, fused op, ``mask=None``).
- ``ours_element50`` ``patch_unet`` with 50% random element masks on every targeted weight.
- ``spare_ref``      SPARE's own layers (``spare_kernels.unlearn.reference.SpareRefLayer``: dense uint8 mask
                     cast to the delta's dtype at use, a second full GEMM/conv), the same masks.

Every scheme holds ONE set of adapter values (``adapter_values``): per targeted layer A ~ N(0, 1/fan_in),
B ~ N(0, 1) rescaled so ``||s*B@A||_F = --delta-rel * ||W||_F`` (3% by default: an adapter some steps
into training; scale s = lora_alpha / r = 1), loaded into peft's factors, the fused layers' and SPARE's,
and one 50% element mask per layer for ours_element50 and spare_ref. (Adapters drawn per scheme at
O(||W||), as this benchmark did before, blow up q/k and put SDPA's CPU backward on subnormal floats: the
table then ranked the random draws, not the kernels.) The measured ratio ``||s*B@A|| / ||W||`` (median,
max) is printed and stored, and a no-grad forward checks ``peft == ours_dense`` and
``spare_ref == ours_element50`` before timing (``agreement``).

Denormals: NOT flushed by default (torch's default, what a user's training gets); ``--flush-denormal``
runs with ``torch.set_flush_denormal(True)`` for comparison. The state is printed and stored, and put
back as found on exit.

Every variant is a copy of one UNet sharing its (frozen) parameter tensors, so sd15 fits in memory
once; all are timed interleaved in one process (``spare_kernels.bench.time_side_by_side``, medians).
Only ratios are meaningful. Writes ``benchmarks/results/unet_step_<config>.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import statistics
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


def target_names(unet: nn.Module, target_set: str) -> list[str]:
    """Qualified names of the targeted layers, in module order (every scheme adapts exactly these)."""
    if target_set not in TARGET_SETS:
        raise ValueError(f"target_set: expected one of {TARGET_SETS}, got {target_set!r}")
    names = [n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)]
    if target_set == "all":
        return names
    return [n for n in names if any(n == a or n.endswith("." + a) for a in ATTN)]


def adapter_values(unet: nn.Module, names, rank: int, delta_rel: float, seed: int = 2) -> dict:
    """``{name: (A, B, Mask)}``: A ``(r, *W.shape[1:])`` ~ N(0, 1/fan_in), B ``(out, r)`` ~ N(0, 1) rescaled so
    ``||B@A||_F = delta_rel * ||W||_F`` (scale 1), and a 50% random element mask (packed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        W = unet.get_submodule(n).weight
        fan_in = W[0].numel()
        A = torch.randn((rank,) + tuple(W.shape[1:]), generator=g) / fan_in ** 0.5
        B = torch.randn(W.shape[0], rank, generator=g)
        B *= delta_rel * W.norm() / (B @ A.reshape(rank, -1)).norm()
        out[n] = (A, B, sk.Mask.from_dense(torch.rand(W.shape, generator=g) < 0.5))
    return out


def _factors(m: nn.Module):
    """``(A, B, scale)`` parameters of an adapted layer: peft's / the fused layers' adapter ``default``, or a
    SpareRefLayer's own."""
    if isinstance(m.lora_A, nn.ModuleDict):
        return m.lora_A["default"].weight, m.lora_B["default"].weight, m.scaling["default"]
    return m.lora_A, m.lora_B, m.scale


def load(model: nn.Module, values: dict) -> nn.Module:
    """Copy each layer's A and B into ``model`` (peft's conv B is ``(out, r, 1, 1)``: same values, viewed)."""
    with torch.no_grad():
        for n, (A, B, _) in values.items():
            a, b, s = _factors(model.get_submodule(n))
            if s != 1.0:
                raise ValueError(f"{n}: expected scale 1 (lora_alpha = rank), got {s}")
            a.copy_(A.view_as(a))
            b.copy_(B.view_as(b))
    return model


def delta_ratios(model: nn.Module, names) -> list[float]:
    """``||s*B@A||_F / ||W||_F`` of each layer, read back from ``model``'s own factors."""
    out = []
    with torch.no_grad():
        for n in names:
            m = model.get_submodule(n)
            a, b, s = _factors(m)
            W = m.get_base_layer().weight if hasattr(m, "get_base_layer") else m.base.weight
            out.append(float(s * (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).norm() / W.norm()))
    return out


def variants(unet: nn.Module, rank: int, delta_rel: float = 0.03, target_sets=TARGET_SETS, schemes=SCHEMES):
    """``(models, info)``: ``models`` maps ``floor`` and ``<scheme>/<target set>`` to a UNet (shared base
    tensors), every adapted one loaded with the same values; ``info[target set]`` the names and the measured
    ``||s*B@A|| / ||W||`` of each layer."""
    from peft import LoraConfig, inject_adapter_in_model
    out, info = {"floor": unet}, {}
    for ts in target_sets:
        names = target_names(unet, ts)
        values = adapter_values(unet, names, rank, delta_rel)
        chosen = set(names)
        pick = lambda n, m: n in chosen   # noqa: E731
        # peft full-matches a string target: exactly these layers, no suffix matches
        spec = "(?:" + "|".join(re.escape(n) for n in names) + ")"

        def peft_model():
            m = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=spec,
                                                   init_lora_weights=False), share_copy(unet))
            assert next(sk.nn.iter_patched(m), None) is None, "peft's variant must run peft's own layers"
            return m

        def element50():
            m = sk.patch_unet(share_copy(unet), rank=rank, target_modules=pick, init="random")
            for n, (_, _, M) in values.items():
                m.get_submodule(n).set_mask("default", M)
            return m

        make = {"peft": peft_model,
                "ours_dense": lambda: sk.patch_unet(share_copy(unet), rank=rank, target_modules=pick, init="random"),
                "ours_element50": element50,
                "spare_ref": lambda: patch_spare_ref(share_copy(unet), {f"{n}.weight": M for n, (_, _, M)
                                                                        in values.items()}, rank)}
        for k in SCHEMES[1:]:
            if k not in schemes:
                continue
            m = load(make[k](), values)
            trained = [n for n, q in m.named_parameters() if q.requires_grad]
            # only the adapters train (2 factors per target); the base tensors are shared and frozen
            assert all("lora_" in n for n in trained) and len(trained) == 2 * len(names), (k, ts, len(trained))
            out[f"{k}/{ts}"] = m
        # the scale as the timed layers hold it (read back from the first adapted scheme's own factors)
        first = next(k for k in SCHEMES[1:] if k in schemes)
        info[ts] = {"names": names, "delta_rel": delta_ratios(out[f"{first}/{ts}"], names)}
    return out, info


def agreement(models: dict, inputs, target_sets=TARGET_SETS) -> dict:
    """Max |difference| / max |output| of a no-grad forward, for the pairs that must compute the same
    function (and ``ours_dense~floor``: what the adapters change, not ~0)."""
    x, t, ehs, _ = inputs
    with torch.no_grad():
        floor = models["floor"](x, t, encoder_hidden_states=ehs).sample
        res = {}
        for ts in target_sets:
            y = {k: models[f"{k}/{ts}"](x, t, encoder_hidden_states=ehs).sample for k in SCHEMES[1:]
                 if f"{k}/{ts}" in models}
            y["floor"] = floor
            rel = lambda a, b: float((y[a] - y[b]).abs().max() / y[b].abs().max())   # noqa: E731
            res[ts] = {f"{a}~{b}": rel(a, b) for a, b in (("peft", "ours_dense"), ("spare_ref", "ours_element50"),
                                                         ("ours_dense", "floor")) if a in y and b in y}
    return res


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


def denormals_flushed() -> bool:
    """Whether denormals are flushed now (torch has no getter): the smallest one survives a multiply by 1 unless they are."""
    return float(torch.tensor([1e-45]) * 1.0) == 0.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds of every scheme first")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--delta-rel", type=float, default=0.03, help="||s*B@A||_F / ||W||_F of every adapter (0.03)")
    ap.add_argument("--targets", nargs="+", choices=TARGET_SETS, default=list(TARGET_SETS))
    ap.add_argument("--schemes", nargs="+", choices=SCHEMES[1:], default=list(SCHEMES[1:]),
                    help="the adapted schemes to time (the floor always is)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True) while timing (default: off, torch's default, what users get)")
    ap.add_argument("--memory", action="store_true",
                    help="also the peak CPU memory of one step of ours_element50 and spare_ref (measure_peak)")
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/unet_step_<config>.json)")
    a = ap.parse_args(argv)
    if a.reps < 1 or a.warmup < 0 or a.rank < 1 or not 0 < a.delta_rel < 1:
        ap.error("--reps and --rank: expected >= 1; --warmup: expected >= 0; --delta-rel: expected in (0, 1)")
    if a.threads:
        torch.set_num_threads(a.threads)
    target_sets = [ts for ts in TARGET_SETS if ts in a.targets]
    was = denormals_flushed()   # a process-wide CPU setting: put back as found (tests run after main)
    torch.set_flush_denormal(a.flush_denormal)
    flush = denormals_flushed()
    try:
        return _run(a, target_sets, flush)
    finally:
        torch.set_flush_denormal(was)


def _run(a, target_sets, flush):
    unet, inputs = build(a.config)
    schemes = ("floor",) + tuple(s for s in SCHEMES[1:] if s in a.schemes)
    models, info = variants(unet, a.rank, a.delta_rel, target_sets, schemes)
    agree = agreement(models, inputs, target_sets)
    fns = {k: step_fn(m, inputs, needs_dx=(k == "floor")) for k, m in models.items()}
    t = time_side_by_side(with_progress(fns, a.reps + a.warmup), reps=a.reps, warmup=a.warmup)
    floor = t["floor"]
    hw = CONFIGS[a.config][1]
    print(f"unet_step --config {a.config}: forward+backward of an MSE loss, batch 1, {hw}x{hw} latent, rank "
          f"{a.rank}, median of {a.reps} interleaved reps, {torch.get_num_threads()} threads, "
          f"backend {sk.backend_info()['ops']['masked_lora_linear']['cpu']}")
    print(f"denormals flushed: {flush} ({'--flush-denormal' if flush else 'torch default, what users get'})")
    res = {"config": a.config, "latent": hw, "batch": 1, "rank": a.rank, "scale": 1.0, "reps": a.reps,
           "warmup": a.warmup, "baseline": "floor", "threads": torch.get_num_threads(), "flush_denormal": flush,
           "schemes": list(schemes), "delta_rel_target": a.delta_rel,
           "adapters": "one set of A, B (and 50% element masks) shared by every scheme",
           "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "loadavg_1min": os.getloadavg()[0], "backend": sk.backend_info()["ops"], "floor_ms": 1e3 * floor,
           "targets": {}, "rows": {}, "ratios": {}, "agreement": agree, "seconds": t}
    for ts in target_sets:
        d = info[ts]["delta_rel"]
        res["targets"][ts] = {"count": len(d), "delta_rel_median": statistics.median(d), "delta_rel_max": max(d),
                              "delta_rel_min": min(d)}
        print(f"\ntargets {ts}: {len(d)} layers; ||s*B@A||_F / ||W||_F per layer: median "
              f"{100 * statistics.median(d):.2f}%, max {100 * max(d):.2f}%; agreement (max rel diff, no-grad forward): "
              + "  ".join(f"{k} {v:.1e}" for k, v in agree[ts].items()))
        print(f"  {'scheme':<16}{'ms':>10}{'/ floor':>10}{'overhead ms':>13}")
        for s in schemes:
            k = "floor" if s == "floor" else f"{s}/{ts}"
            row = {"ms": 1e3 * t[k], "ratio": t[k] / floor, "overhead_ms": 1e3 * (t[k] - floor)}
            res["rows"].setdefault(s, {})[ts] = row
            print(f"  {s:<16}{row['ms']:>10.1f}{row['ratio']:>10.3f}{row['overhead_ms']:>13.1f}")
        r = {f"{a}/{b}": t[f"{a}/{ts}"] / t[f"{b}/{ts}"] for a, b in (("ours_dense", "peft"),
                                                                       ("ours_element50", "spare_ref"))
             if a in schemes and b in schemes}
        res["ratios"][ts] = r
        print("  " + "   ".join(f"{k} {v:.3f}" for k, v in r.items()))
    peaks = {}
    if a.memory:
        for ts in target_sets:
            if not {"ours_element50", "spare_ref"} <= set(schemes):
                continue
            for sch in ("ours_element50", "spare_ref"):
                peaks[f"{sch}/{ts}"] = measure_peak(fns[f"{sch}/{ts}"])[1] / 2**20
            e, r = peaks[f"ours_element50/{ts}"], peaks[f"spare_ref/{ts}"]
            print(f"peak MB, {ts}: ours_element50 {e:.0f}, spare_ref {r:.0f} (ratio {e / r:.2f})")
    res["peak_mb"] = peaks
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(folder, exist_ok=True)
    path = write_json(a.out or os.path.join(folder, f"unet_step_{a.config}.json"), res)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
