"""Whole unlearning runs side by side in one process: the wall-time ratios of issue 6's targets.

``PYTHONPATH=. python -m benchmarks.unlearn_runs [--target style:dots] [--methods spare spare-reference
salun] [--reps 3] [--steps 200] [--threads N] [--targets all|attention]`` runs
:func:`spare_kernels.unlearn.run` (probe, saliency, training; evaluation excluded) for each method on a
fresh copy of the shipped MiniCanvas model, the methods interleaved ``reps`` times so that the
machine's slow and fast phases fall on all of them. ``--targets`` is ``Config.targets`` for every
method: every Linear and Conv2d (``all``, the default) or the attention projections (``attention``).
Prints each run's seconds and, per rep, the first method's time over each other's; writes
``benchmarks/results/unlearn_runs.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from spare_kernels import canvas
from spare_kernels.unlearn import METHODS, Config, canvas_task, run
from spare_kernels.unlearn.config import TARGETS
from spare_kernels.utils.io import write_json

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="style:dots")
    p.add_argument("--methods", nargs="+", default=["spare", "spare-reference", "salun"], choices=METHODS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=Config().steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as set by the environment)")
    p.add_argument("--targets", default=Config().targets, choices=TARGETS,
                   help="layers every method changes (Config.targets; esd: cross-attention whatever this says)")
    p.add_argument("--out", default=os.path.join(RESULTS, "unlearn_runs.json"))
    a = p.parse_args(argv)
    if a.reps < 1 or a.steps < 0 or a.threads < 0:
        p.error("--reps must be >= 1, --steps and --threads >= 0")
    if len(set(a.methods)) != len(a.methods):
        p.error("--methods: each method once")
    if a.threads:
        torch.set_num_threads(a.threads)
    task = canvas_task(a.target, seed=a.seed)
    first = a.methods[0]
    print(f"whole runs, {torch.get_num_threads()} thread(s), {a.steps} steps, target {a.target}, "
          f"targets {a.targets}; ratios = {first} / other, same rep")
    secs = {m: [] for m in a.methods}
    for rep in range(a.reps):
        for m in a.methods:
            r = run(canvas.load_model(), task, Config(method=m, steps=a.steps, seed=a.seed, targets=a.targets),
                    progress=False)
            secs[m].append(r["seconds"])
            st = r["stage_seconds"]
            print(f"rep {rep}  {m:<16} {r['seconds']:7.2f} s  (localise {st['localise']:.2f}, "
                  f"train {st['train']:.2f})", flush=True)
    ratios = {m: [s / o for s, o in zip(secs[first], secs[m])] for m in a.methods[1:]}
    for m, v in ratios.items():
        print(f"{first} / {m}: " + ", ".join(f"{x:.3f}" for x in v) + f"  (median {statistics.median(v):.3f})")
    write_json(a.out, {"target": a.target, "targets": a.targets, "threads": torch.get_num_threads(), "steps": a.steps,
                       "seconds": secs, "ratios": ratios,
                       "median_ratios": {m: statistics.median(v) for m, v in ratios.items()}})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
