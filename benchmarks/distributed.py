"""What the distributed recipe communicates, and how it scales here.

``python -m benchmarks.distributed bytes``: per step and per run, the bytes that cross the network for
SD-1.5 (built on the meta device from its config) with all-layer element masks: the adapter gradient
all-reduce per step, and the saliency reduction per run, reduce-scatter (what the library does)
against an all-reduce of every score, per rank, for N = 2 and 8 (ring algorithms: a reduce-scatter
sends (N-1)/N of the buffer per rank, an all-reduce 2(N-1)/N). Also the per-rank memory of the
reduced scores.

``python -m benchmarks.distributed allreduce``: the time of one gloo all-reduce of the MiniCanvas and
SD-1.5 adapter gradients between 2 processes on this machine (localhost), medians.

``python -m benchmarks.distributed scaling --steps N``: the MiniCanvas demo (style:dots) as 1 process
x 2 threads and as ``torchrun --nproc_per_node 2`` x 1 thread, one after the other; their seconds
(localise + train), metrics against the quality bar, and whether the masks are identical (from the
adapters' saved masks). Writes ``benchmarks/results/distributed_scaling.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6


def adapter_and_weight_entries(unet, rank=4):
    """(adapter entries of rank-``rank`` adapters on every Linear / Conv2d, their weight entries)."""
    ad = w = 0
    for m in unet.modules():
        if type(m) is nn.Linear:
            ad += rank * (m.in_features + m.out_features)
            w += m.weight.numel()
        elif type(m) is nn.Conv2d:
            kh, kw = m.kernel_size
            ad += rank * (m.in_channels // m.groups) * kh * kw + m.out_channels * rank
            w += m.weight.numel()
    return ad, w


def plan_traffic(shapes, n):
    """Per rank, from the library's own ``shard_plan``: bytes sent by the saliency reduction (a bucket's
    reduce-scatter sends ``(n-1)`` padded pieces, ring; a one-tensor bucket is a reduce to its owner,
    counted as the whole tensor from every other rank), the largest transient bucket buffer, and the
    reduced scores the busiest rank holds. fp32."""
    from spare_kernels.distributed import shard_plan
    plan = shard_plan(shapes, n)
    sent, transient = [0] * n, 0
    for b in plan.buckets:
        if len(b) == 1:
            for r in range(n):
                if r != plan.owner[b[0]]:
                    sent[r] += 4 * plan.numel(b[0])
            transient = max(transient, 4 * plan.numel(b[0]))
            continue
        length = max(sum(plan.numel(i) for i in b if plan.owner[i] == r) for r in range(n))
        for r in range(n):
            sent[r] += 4 * (n - 1) * length
        transient = max(transient, 4 * (n + 1) * length)
    held = max(4 * plan.owned_numel(r) for r in range(n))
    return {"sent_max_mb": max(sent) / MB, "transient_mb": transient / MB, "held_max_mb": held / MB,
            "buckets": len(plan.buckets)}


def cmd_bytes(args):
    from benchmarks.shapes import build_unet
    from spare_kernels import canvas
    rows, shapes = {}, {}
    for name, unet in (("SD-1.5", build_unet("sd15", device="meta")), ("MiniCanvas", canvas.load_model())):
        ad, w = adapter_and_weight_entries(unet, args.rank)
        rows[name] = {"adapter_entries": ad, "weight_entries": w}
        shapes[name] = {f"{n}.weight": tuple(m.weight.shape) for n, m in unet.named_modules()
                        if type(m) in (nn.Linear, nn.Conv2d)}
    out = {"rank": args.rank, "saliency_batches": args.saliency_batches, "models": rows, "per_world": {}}
    print(f"rank-{args.rank} adapters on every Linear/Conv2d, element masks; fp32 gradients and scores; "
          f"grad_abs reduces each of {args.saliency_batches} saliency batches, the other stats once")
    for name, r in rows.items():
        g, s = 4 * r["adapter_entries"], 4 * r["weight_entries"]
        print(f"\n{name}: adapter gradient {g / MB:.2f} MB a step; scores {s / MB:.1f} MB")
        print(f"{'N':>3} {'grad AR sent/step':>18} {'saliency ours sent':>19} {'(ideal RS)':>11} {'AR sent':>9} "
              f"{'held ours':>10} {'held AR':>8} {'transient':>10} {'buckets':>8}   (MB per rank, the busiest)")
        for n in (2, 8):
            ar, rs = 2 * (n - 1) / n, (n - 1) / n
            t = plan_traffic(shapes[name], n)
            row = {"grad_allreduce_per_step_mb": ar * g / MB, "saliency_ours_sent_mb": t["sent_max_mb"],
                   "saliency_ideal_reduce_scatter_mb": rs * s / MB, "saliency_all_reduce_mb": ar * s / MB,
                   "scores_held_ours_mb": t["held_max_mb"], "scores_held_all_reduce_mb": s / MB,
                   "transient_mb": t["transient_mb"], "buckets": t["buckets"]}
            out["per_world"].setdefault(name, {})[n] = row
            print(f"{n:>3} {row['grad_allreduce_per_step_mb']:>18.2f} {row['saliency_ours_sent_mb']:>19.1f} "
                  f"{row['saliency_ideal_reduce_scatter_mb']:>11.1f} {row['saliency_all_reduce_mb']:>9.1f} "
                  f"{row['scores_held_ours_mb']:>10.1f} {row['scores_held_all_reduce_mb']:>8.1f} "
                  f"{row['transient_mb']:>10.1f} {row['buckets']:>8}")
    return out


def _allreduce_worker(rank, n, port, sizes, reps, q):
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            timeout=datetime.timedelta(seconds=120))
    res = {}
    for name, k in sizes.items():
        x = torch.randn(k)
        for _ in range(3):
            dist.all_reduce(x)
        ts = []
        for _ in range(reps):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(x)
            ts.append(time.perf_counter() - t)
        res[name] = sorted(ts)[len(ts) // 2]
    if rank == 0:
        q.put(res)
    dist.destroy_process_group()


def cmd_allreduce(args):
    import multiprocessing as mp

    from benchmarks.shapes import build_unet
    from spare_kernels import canvas
    sizes = {"MiniCanvas": adapter_and_weight_entries(canvas.load_model(), args.rank)[0],
             "SD-1.5": adapter_and_weight_entries(build_unet("sd15", device="meta"), args.rank)[0]}
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from distworkers import free_port
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    ps = [ctx.Process(target=_allreduce_worker, args=(r, 2, port, sizes, args.reps, q)) for r in range(2)]
    for p in ps:
        p.start()
    res = q.get(timeout=300)
    for p in ps:
        p.join()
    out = {}
    for name, t in res.items():
        out[name] = {"entries": sizes[name], "mb": 4 * sizes[name] / MB, "median_ms": 1e3 * t}
        print(f"gloo all-reduce, 2 processes on localhost, {name} adapter gradient ({4 * sizes[name] / MB:.2f} MB): "
              f"median {1e3 * t:.2f} ms of {args.reps}")
    return out


def _masks(path):
    from safetensors.torch import load_file
    t = load_file(path)
    return {k: v for k, v in t.items() if "mask" in k}


def cmd_scaling(args):
    env = dict(os.environ, PYTHONPATH=REPO)
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        variants = {
            "1 process x 2 threads": [sys.executable, "-m", "spare_kernels", "demo", "--threads", "2"],
            "2 processes x 1 thread (torchrun)": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                  "2", "-m", "spare_kernels", "demo", "--threads", "1"],
        }
        for name, cmd in variants.items():
            out = os.path.join(d, str(len(runs)))
            full = cmd + ["--steps", str(args.steps), "--target", args.target, "--out", out, "--json",
                          os.path.join(out, "r.json"), "--quiet"]
            t = time.perf_counter()
            p = subprocess.run(full, env=dict(env, OMP_NUM_THREADS="2" if "2 threads" in name else "1"), cwd=REPO,
                               capture_output=True, text=True)
            wall = time.perf_counter() - t
            if p.returncode:
                raise SystemExit(f"{name} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            with open(os.path.join(out, "r.json")) as f:
                r = json.load(f)
            with open(os.path.join(out, "results.json")) as f:
                st = json.load(f)["rows"][0]["stage_seconds"]
            runs[name] = dict(r, wall_seconds=wall, stage_seconds=st,
                              masks=_masks(os.path.join(out, "adapter.safetensors")))
            bar = r["ua"] >= 0.95 and r["base_ira"] - r["ira"] <= 0.05 and r["base_cra"] - r["cra"] <= 0.05
            runs[name]["meets_bar"] = bar
            print(f"{name}: seconds {r['seconds']:.1f} (localise {st['localise']:.1f}, train {st['train']:.1f}); "
                  f"UA {r['ua']:.3f} IRA {r['ira']:.3f} CRA {r['cra']:.3f} (base {r['base_ira']:.3f} / "
                  f"{r['base_cra']:.3f}); bar {'met' if bar else 'NOT met'}; peak {r['peak_mem_mb']:.0f} MB/rank; "
                  f"wall {wall:.1f} s", flush=True)
    a, b = runs.values()
    same = a["masks"].keys() == b["masks"].keys() and all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    print(f"masks identical: {same}; 2x1 / 1x2 seconds: {b['seconds'] / a['seconds']:.3f}")
    for r in runs.values():
        del r["masks"]
    return {"steps": args.steps, "target": args.target, "runs": runs, "masks_identical": same,
            "ratio_2x1_over_1x2": b["seconds"] / a["seconds"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bytes")
    b.add_argument("--rank", type=int, default=4)
    b.add_argument("--saliency-batches", type=int, default=4)
    a = sub.add_parser("allreduce")
    a.add_argument("--rank", type=int, default=4)
    a.add_argument("--reps", type=int, default=30)
    s = sub.add_parser("scaling")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--target", default="style:dots")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    res = {"bytes": cmd_bytes, "allreduce": cmd_allreduce, "scaling": cmd_scaling}[args.cmd](args)
    if args.out:
        from spare_kernels.utils.io import write_json
        write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
