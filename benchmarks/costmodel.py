"""The cost model's tables and its validation on the hardware there is (``spare_kernels/costmodel.py``).

``python -m benchmarks.costmodel validate --device cpu [--shapes TOKENS:IN:OUT ...] [--reps 7]``
  times, on each Linear shape (default: SD-1.5's at a 32×32 latent, batch 1), the ``cpu`` backend's
  element-mask layer (density 0.5) forward + backward, SPARE's dense-delta scheme (``spare_ref``) and
  factored LoRA (``peft``), side by side in this process (``benchmarks/baselines.py``: fp32, rank 4), and
  prints the model's prediction from this machine's measured profile (``costmodel.cpu_profile``), the
  measured median and their ratio for each; exits 1 when a ratio falls outside [0.65, 1.35].
``python -m benchmarks.costmodel table [--device h100|h200] [--latent 64] [--batch 1] [--rank 4]``
  prints the bound of every scheme on every SD-1.5 Linear shape (bf16) and the ratios the GPU targets
  are stated in (docs/backends.md's table); ``--json PATH`` writes it.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from spare_kernels import costmodel as cm

VALIDATE = ("ours_element", "spare_ref", "peft")
TOLERANCE = (0.65, 1.35)


def parse_shape(s: str) -> dict:
    try:
        n, i, o = (int(v) for v in s.split(":"))
        if min(n, i, o) <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected TOKENS:IN:OUT with positive integers, got {s!r}")
    return {"kind": "linear", "n": n, "in": i, "out": o, "count": 1}


def sd15_linear(latent: int = 32, batch: int = 1) -> list[dict]:
    from .shapes import layer_shapes
    return [s for s in layer_shapes("sd15", batch=batch, latent=latent) if s["kind"] == "linear"]


def predicted(scheme: str, spec: dict, dev: cm.Device, rank: int = 4) -> float:
    # The layer benchmark's closures: fp32, the backward seeded with ones_like(y); the cpu engine keeps
    # W_eff and G tiles in cache (resident).
    return cm.predict(scheme, spec["n"], spec["out"], spec["in"], rank, device=dev, e=4, density=0.5,
                      resident=scheme == "ours_element", threads=dev.threads, dy_fill=True)


def validate(shapes, reps: int = 7, rank: int = 4, quiet: bool = False) -> dict:
    from spare_kernels.backends import registry
    from spare_kernels.bench import time_side_by_side

    from .baselines import layer_schemes, make_layer_case
    backend = registry.backend_for("masked_lora_linear", "cpu")
    if backend != "cpu":   # the model's element passes are the cpu engine's: validating another is meaningless
        raise RuntimeError(f"validate --device cpu: the cpu backend must run masked_lora_linear here, "
                           f"got {backend!r} ({registry.backend_info()['unavailable'].get('cpu', 'forced?')})")
    threads = torch.get_num_threads()
    probes = cm.cpu_probes()
    if not quiet:
        print(f"{threads} thread(s); backend {backend!r}; fp32, rank {rank}, element density 0.5; medians of "
              f"{reps} (3x for sub-millisecond layers); the machine's profile: per probe, the median of its "
              "timings taken before every shape")
    measured, probe_times = [], {k: [] for k in probes}
    for spec in shapes:
        case = make_layer_case(spec, rank=rank)
        # probes before each shape (never interleaved with the layers: their 200 MB of streaming would leave
        # every scheme a cold cache that the layer benchmark does not see); their median over the whole run
        # is the profile, so one noisy probe does not skew one shape
        for k, v in time_side_by_side(probes, reps=max(3, reps // 2)).items():
            probe_times[k].append(v)
        small = spec["n"] * spec["in"] * spec["out"] < 2e7   # sub-millisecond layers: the noisiest medians
        measured.append(time_side_by_side(layer_schemes(case, list(VALIDATE)), reps=3 * reps if small else reps))
    dev = cm.profile_from({k: statistics.median(v) for k, v in probe_times.items()}, threads)
    rows = []
    if not quiet:
        print(f"profile: sgemm {dev.gemm32 / 1e9:.1f} GFLOP/s (d=16: {dev.gemm_curve[0][1] / 1e9:.1f}), stream "
              f"{dev.bandwidth / 1e9:.1f} GB/s, fresh 64 MiB {dev.fault_rate / 1e9:.1f} GB/s, rank-4 build "
              f"{dev.vector / 1e9:.1f} GFLOP/s, {dev.overhead * 1e6:.1f} µs per autograd op")
        print(f"{'layer (tokens:in:out)':<24}" + "".join(f"{s + ' pred/meas ms':>28}" for s in VALIDATE) + "  ratios")
    for spec, t in zip(shapes, measured):
        row = {"shape": f"{spec['n']}:{spec['in']}:{spec['out']}", "schemes": {}}
        for s in VALIDATE:
            p = predicted(s, spec, dev, rank)
            row["schemes"][s] = {"predicted_ms": 1e3 * p, "measured_ms": 1e3 * t[s], "ratio": p / t[s]}
        rows.append(row)
        if not quiet:
            cells = "".join(f"{v['predicted_ms']:>13.3f} /{v['measured_ms']:>11.3f}  " for v in row["schemes"].values())
            ratios = " ".join(f"{v['ratio']:.2f}" for v in row["schemes"].values())
            print(f"{row['shape']:<24}{cells}  {ratios}", flush=True)
    bad = [(r["shape"], s, v["ratio"]) for r in rows for s, v in r["schemes"].items()
           if not TOLERANCE[0] <= v["ratio"] <= TOLERANCE[1]]
    return {"device": dev.name, "backend": backend, "threads": threads, "reps": reps,
            "profile": {"gemm32": dev.gemm32, "gemm_curve": dev.gemm_curve, "bandwidth": dev.bandwidth,
                        "fault_rate": dev.fault_rate, "vector": dev.vector, "overhead": dev.overhead},
            "rows": rows, "outside": bad}


# ---------------------------------------------------------------------------------------- the table
TABLE_SCHEMES = ("floor", "peft", "spare_ref", "ours_element", "ours_block", "ours_dense")


def table(device="h100", latent: int = 64, batch: int = 1, rank: int = 4) -> dict:
    """Per SD-1.5 Linear shape: every scheme's bound (µs; ours at their fastest path), the element mask's
    composite and fused paths apart, the path the model picks, and the ratios the GPU targets use."""
    dev = cm.DEVICES[device] if isinstance(device, str) else device
    rows = []
    for spec in sd15_linear(latent, batch):
        n, o, i = spec["n"], spec["out"], spec["in"]
        b = {s: cm.bound(s, n, o, i, rank, device=dev, e=2, density=0.5, block_density=0.1) for s in TABLE_SCHEMES}
        paths = {p: 1e6 * cm.bound("ours_element", n, o, i, rank, device=dev, e=2, path=p) for p in cm.PATHS}
        rows.append({"shape": f"{n}:{i}:{o}", "count": spec["count"], "bound_us": {k: 1e6 * v for k, v in b.items()},
                     "element_paths_us": paths, "path": cm.choose_path("linear", 1, n, o, i, rank, device=dev),
                     "elem/floor": b["ours_element"] / b["floor"], "elem/spare_ref": b["ours_element"] / b["spare_ref"],
                     "block/floor": b["ours_block"] / b["floor"], "dense/peft": b["ours_dense"] / b["peft"]})
    return {"device": dev.name, "source": dev.source, "latent": latent, "batch": batch, "rank": rank, "rows": rows}


def table_markdown(doc: dict) -> str:
    lines = [f"Bounds on an {doc['device']} ({doc['source']}): SD-1.5 Linear layers at a {doc['latent']}×"
             f"{doc['latent']} latent, batch {doc['batch']}, bf16, rank {doc['rank']}, forward + backward (dx, dA, "
             "dB); element density 0.5, block 64×64 density 0.1. Predicted, not measured.", "",
             "| tokens:in:out | × | floor µs | peft µs | SPARE scheme µs | element µs: composite / fused | "
             "picks | elem/floor | elem/SPARE | block/floor | dense/peft |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        b, p = r["bound_us"], r["element_paths_us"]
        lines.append(f"| {r['shape']} | {r['count']} | {b['floor']:.1f} | {b['peft']:.1f} | {b['spare_ref']:.1f} | "
                     f"{p['composite']:.1f} / {p['fused']:.1f} | {r['path']} | {r['elem/floor']:.2f} | "
                     f"{r['elem/spare_ref']:.2f} | {r['block/floor']:.2f} | {r['dense/peft']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="the model against this machine's measured layer times")
    v.add_argument("--device", default="cpu", choices=["cpu"],
                   help="the hardware to validate on (only this machine's CPU can be timed here)")
    v.add_argument("--shapes", nargs="+", type=parse_shape, default=None, metavar="TOKENS:IN:OUT")
    v.add_argument("--reps", type=int, default=7)
    v.add_argument("--json", default=None, help="write the figures to this path")
    t = sub.add_parser("table", help="the bound of every scheme on SD-1.5's Linear layers on a GPU")
    t.add_argument("--device", default="h100", choices=sorted(cm.DEVICES))
    t.add_argument("--latent", type=int, default=64)
    t.add_argument("--batch", type=int, default=1)
    t.add_argument("--rank", type=int, default=4)
    t.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.cmd == "table":
        doc = table(a.device, a.latent, a.batch, a.rank)
        print(table_markdown(doc))
    else:
        if a.reps < 1:
            p.error("--reps: expected a positive integer")
        doc = validate(a.shapes or sd15_linear(), a.reps)
        lo, hi = TOLERANCE
        if doc["outside"]:
            print(f"outside [{lo}, {hi}]: " + ", ".join(f"{s} {k} {r:.2f}" for s, k, r in doc["outside"]))
        else:
            print(f"every ratio within [{lo}, {hi}]")
    if a.json:
        from spare_kernels.utils.io import write_json
        write_json(a.json, doc)
    return 1 if a.cmd == "validate" and doc["outside"] else 0


if __name__ == "__main__":
    sys.exit(main())
