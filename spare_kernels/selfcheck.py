"""``python -m spare_kernels.selfcheck``: every op on every backend of a device against the reference.

First it says which backends are live on which device and why the others are not (with what the build
recorded: the extensions built, skipped or failed, and the torch they were built against); ``--info``
stops there. Then, on the GPU at hand (or ``--device cpu``): each backend the registry runs there (the reference included,
as a check of the harness) runs the public ops on a fixed grid (odd linear and conv shapes, ranks, every
mask kind, fp32 and bf16, forward and every gradient, every saliency statistic); each result is held to
the reference run in float64 on the same inputs with a flash-attention style bound,
``|ours - ref64| <= C·|ref_lowp - ref64| + eps·max(|ref64|, 1)``, ``ref_lowp`` the reference in the
case's own dtype. Prints one pass/fail row per (backend, case) and exits 1 on any failure.

The same comparison drives ``tests/test_property.py`` (:func:`check_layer`, :func:`check_saliency`).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from . import _version
from .backends import registry
from .masks import Mask
from .ops import STATS, masked_lora_conv2d, masked_lora_linear, saliency_conv2d, saliency_linear

# (C, eps) of the bound per dtype: C times the low-precision reference's own error, plus eps of the
# largest magnitude. fp32 allows 10x: the kernels block their sums differently from the reference's GEMM.
BOUNDS = {torch.float64: (4.0, 1e-12), torch.float32: (10.0, 2e-6), torch.bfloat16: (4.0, 8e-3),
          torch.float16: (4.0, 2e-3)}


def bound(ours, lowp, ref64, dtype, widen=1.0):
    """``(error, bound)`` of ``ours`` against ``ref64``, with ``lowp`` the reference in ``dtype``."""
    C, eps = BOUNDS[dtype]
    o, lp, r = ours.double(), lowp.double(), ref64.double()
    if not bool(torch.isfinite(o).all()):
        return float("inf"), 0.0
    big = max(r.abs().max().item(), 1.0) if r.numel() else 1.0
    err = (o - r).abs().max().item() if r.numel() else 0.0
    return err, widen * (C * ((lp - r).abs().max().item() if r.numel() else 0.0) + eps * big)


# ------------------------------------------------------------------------------------------- layers
def layer_tensors(case: dict, device):
    """``x, W, b, A, B`` of a layer case, drawn in fp32 and rounded to the case's dtypes, so every
    precision sees exactly the same values."""
    g = torch.Generator().manual_seed(case["seed"])
    act, ad = case["dt"]
    wshape = tuple(case["wshape"])
    fan = max(1, int(torch.tensor(wshape[1:]).prod()))
    x = torch.randn(case["shape"], generator=g)
    W = torch.randn(wshape, generator=g) / fan ** 0.5
    b = torch.randn(wshape[0], generator=g) if case["bias"] else None
    A = torch.randn((case["r"],) + wshape[1:], generator=g) / fan ** 0.5
    B = torch.randn(wshape[0], case["r"], generator=g)
    x, W, b = (None if t is None else t.to(act).to(device) for t in (x, W, b))
    A, B = (t.to(ad).to(device) for t in (A, B))
    return x, W, b, A, B


def _layer_call(case, x, W, b, A, B, mask):
    if case["layer"] == "linear":
        return masked_lora_linear(x, W, b, A, B, mask, case["scale"])
    return masked_lora_conv2d(x, W, b, A, B, mask, case["scale"], **case["geo"])


def run_layer(case, x, W, b, A, B, mask, double=False):
    """``[y, dx, dA, dB]``: the output and the gradients of a fixed weighted sum of it; with ``double``,
    the gradients of a penalty on ``dL/dx`` (a create_graph backward) instead."""
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = _layer_call(case, x, W, b, A, B, mask)
    wts = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view(y.shape).to(y.device, y.dtype)
    if double:
        gx, = torch.autograd.grad((y * wts).pow(2).sum(), x, create_graph=True)
        gx.pow(2).sum().backward()
    else:
        y.backward(wts)
    return [y.detach()] + [t.grad for t in (x, A, B)]


def check_layer(case: dict, backend: str, device, double: bool = False) -> list[tuple[str, float, float]]:
    """``[(output name, error, bound)]`` of ``backend`` against the reference on one layer case:
    ``case`` has ``layer`` (linear/conv), ``shape`` (of x), ``wshape``, ``r``, ``bias``, ``mask`` (a
    ``Mask`` or None), ``dt`` ((activation, adapter) dtypes), ``seed``, ``scale`` and, for conv, ``geo``."""
    mask = None if case["mask"] is None else case["mask"].to(device)
    x, W, b, A, B = layer_tensors(case, device)
    with registry.use_backend(backend):
        got = run_layer(case, x, W, b, A, B, mask, double)
    with registry.use_backend("reference"):
        lowp = run_layer(case, x, W, b, A, B, mask, double)
        ref = run_layer(case, *(None if t is None else t.double() for t in (x, W, b, A, B)), mask, double)
    out = []
    for what, o, lp, r in zip(("y", "dx", "dA", "dB"), got, lowp, ref):
        if o is None or o.shape != r.shape or o.dtype != lp.dtype:
            out.append((what, float("inf"), 0.0))
            continue
        # a penalty squares the values: widen the bound for the product of the two passes' errors
        out.append((what, *bound(o, lp, r, case["dt"][0], widen=8.0 if double else 1.0)))
    return out


# ----------------------------------------------------------------------------------------- saliency
def check_saliency(case: dict, backend: str, device) -> list[tuple[str, float, float]]:
    """``[("S", error, bound)]`` of ``backend``'s saliency against the reference: ``case`` has ``conv``,
    ``x`` (shape), ``stat``, ``dt``, ``seed`` and ``dy`` (linear) or ``wshape`` and ``geo`` (conv)."""
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(case["x"], generator=g).to(case["dt"]).to(device)
    if case["conv"]:
        geo = case["geo"]
        hw = [(case["x"][2 + d] + 2 * geo["padding"][d] - geo["dilation"][d] * (case["wshape"][2 + d] - 1) - 1)
              // geo["stride"][d] + 1 for d in range(2)]
        dy = torch.randn(case["x"][0], case["wshape"][0], *hw, generator=g).to(case["dt"]).to(device)

        def run(a, b):
            return saliency_conv2d(a, b, case["wshape"], case["stat"], **geo)
    else:
        dy = torch.randn(case["dy"], generator=g).to(case["dt"]).to(device)

        def run(a, b):
            return saliency_linear(a, b, case["stat"])
    with registry.use_backend(backend):
        got = run(x, dy)
    with registry.use_backend("reference"):
        lowp, ref = run(x, dy), run(x.double(), dy.double())
    if got.dtype != torch.float32 or got.shape != ref.shape:
        return [("S", float("inf"), 0.0)]
    return [("S", *bound(got, lowp, ref, case["dt"]))]


# ------------------------------------------------------------------------------------------ the grid
def _mask(kind, wshape, seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = wshape[0], int(torch.tensor(wshape[1:]).prod())
    if kind == "none":
        return None
    if kind == "element":
        return Mask.from_dense(torch.rand(wshape, generator=g) < 0.5)
    if kind == "block":
        return Mask("block", wshape, torch.rand(-(-rows // 32), -(-cols // 32), generator=g) < 0.3, (32, 32))
    return Mask("row", wshape, torch.rand(rows, generator=g) < 0.5)


def grid(quick: bool = False):
    """``(name, kind, case)``: the layer and saliency cases the self-check runs."""
    dts = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.float32)}
    kinds = ("none", "element", "block", "row")
    lin = [((7, 333), (321, 333), 4), ((256, 320), (1280, 320), 16)] if not quick else [((7, 333), (321, 333), 4)]
    conv = [((2, 32, 17, 17), (48, 32, 3, 3), dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)),
            ((1, 64, 16, 16), (64, 32, 3, 3), dict(stride=[2, 2], padding=[1, 1], dilation=[1, 1], groups=2)),
            ((2, 40, 9, 9), (24, 40, 1, 1), dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1], groups=1))]
    if quick:
        conv = conv[:1]
    seed = 0
    for dname, dt in dts.items():
        for kind in kinds:
            for shape, wshape, r in lin:
                seed += 1
                yield (f"linear {shape[0]}x{wshape[1]}->{wshape[0]} r{r} {kind} {dname}", "layer",
                       dict(layer="linear", shape=shape, wshape=wshape, r=r, bias=True, mask=_mask(kind, wshape, seed),
                            dt=dt, seed=seed, scale=0.7))
            for shape, wshape, geo in conv:
                seed += 1
                yield (f"conv {shape}->{wshape[0]} k{wshape[2]} s{geo['stride'][0]} g{geo['groups']} {kind} {dname}",
                       "layer", dict(layer="conv", shape=shape, wshape=wshape, r=4, bias=True,
                                     mask=_mask(kind, wshape, seed), dt=dt, seed=seed, scale=0.7, geo=geo))
        for stat in STATS:
            seed += 1
            yield (f"saliency_linear 4x9x96->80 {stat} {dname}", "saliency",
                   dict(conv=False, x=(4, 9, 96), dy=(4, 9, 80), stat=stat, dt=dt[0], seed=seed))
            yield (f"saliency_conv2d 4x16x9x9 k3 {stat} {dname}", "saliency",
                   dict(conv=True, x=(4, 16, 9, 9), wshape=(24, 16, 3, 3), stat=stat, dt=dt[0], seed=seed,
                        geo=dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)))


def run(device: str, backends=None, quick: bool = False, out=None) -> int:
    """Run the grid on ``device`` for ``backends`` (default: every backend the registry runs there);
    print the table (to ``out``, default stdout); return the number of failures."""
    out = out or sys.stdout
    dev = torch.device(device)
    backends = backends or registry.runnable(dev.type)
    failures, rows = 0, 0
    t0 = time.perf_counter()
    name_w = 56
    print(f"spare_kernels selfcheck on {_device_name(dev)}; backends {', '.join(backends)}", file=out)
    print(f"{'backend':<10} {'case':<{name_w}} {'worst err/bound':>16}  result", file=out)
    for backend in backends:
        for name, kind, case in grid(quick):
            try:
                res = check_layer(case, backend, dev) if kind == "layer" else check_saliency(case, backend, dev)
                worst = max(res, key=lambda t: t[1] / t[2] if t[2] else (0.0 if t[1] == 0 else float("inf")))
                ok = all(e <= b for _, e, b in res)
                ratio = worst[1] / worst[2] if worst[2] else (0.0 if worst[1] == 0 else float("inf"))
                detail = f"{ratio:16.3f}"
            except Exception as e:  # noqa: BLE001  (a crash is a failure of that case, reported)
                ok, detail = False, f"{type(e).__name__}: {e}"[:80]
            rows += 1
            failures += not ok
            print(f"{backend:<10} {name:<{name_w}} {detail}  {'pass' if ok else 'FAIL'}", file=out)
    print(f"{rows - failures} passed, {failures} failed in {time.perf_counter() - t0:.1f} s", file=out)
    return failures


# the native extension behind each compiled backend (triton compiles at run time, reference is PyTorch)
_EXTENSIONS = {"cpu": "_C", "cuda": "_C_cuda"}


def backend_report() -> list[str]:
    """Lines saying which backends are live on which device (the default one per device marked) and why
    each other backend is not, with the build's record of the native extensions."""
    info = registry.backend_info()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    built = _version.build_info()
    record = (f"extensions built against torch {built['torch']}" if built.get("torch") else
              "no build record (extensions built before the record existed, or SPARE_KERNELS_BUILD_EXT=0)")
    lines = [f"spare_kernels {_version.__version__}, torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
             f"{torch.cuda.device_count()} GPU(s) visible); {record}"]
    for b in registry.BACKENDS:
        live = [d for d in devices if b in registry.runnable(d)]
        default = [d for d in live if all(info["ops"][op].get(d) == b for op in registry.OPS)]
        ext = _EXTENSIONS.get(b)
        state = built.get("extensions", {}).get(ext) if ext else None
        if live:
            where = ", ".join(d + (" (default)" if d in default else "") for d in live)
            lines.append(f"  {b:<10} live on {where}" + (f"; spare_kernels.{ext} loaded" if ext else ""))
        else:
            why = info["unavailable"].get(b, "no implementation for the devices here")
            lines.append(f"  {b:<10} not live: {why}" + (f"; spare_kernels.{ext}: {state}" if state else ""))
        problem = _version.extension_problem(ext) if ext and live else None
        if problem:   # loaded, but built against another torch
            lines.append(f"  {'':<10} warning: {problem}")
    return lines


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"CPU (torch {torch.__version__})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spare_kernels.selfcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda[:N] or cpu (default: cuda if torch sees a GPU, else cpu)")
    p.add_argument("--backend", nargs="+", choices=registry.BACKENDS, default=None,
                   help="backends to check (default: every backend the registry runs on the device)")
    p.add_argument("--quick", action="store_true", help="one shape per layer kind (~10 s on one CPU thread)")
    p.add_argument("--info", action="store_true", help="only say which backends are live, and why not the others")
    args = p.parse_args(argv)
    print("\n".join(backend_report()), flush=True)
    if args.info:
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"selfcheck: error: --device {device}: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    missing = [b for b in (args.backend or []) if b not in registry.runnable(torch.device(device).type)]
    if missing:
        info = registry.backend_info()["unavailable"]
        print(f"selfcheck: error: --backend {missing} cannot run on {device}: "
              + "; ".join(f"{b}: {info.get(b, 'no implementation for this device')}" for b in missing), file=sys.stderr)
        return 2
    return 1 if run(device, args.backend, args.quick) else 0


if __name__ == "__main__":
    sys.exit(main())
