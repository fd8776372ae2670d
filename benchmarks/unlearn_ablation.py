"""Steps (and seconds) to reach UA >= 0.95: concept-critical vs uniform timesteps for spare, and
optionally every baseline (MiniCanvas).

``PYTHONPATH=. python -m benchmarks.unlearn_ablation [--target style:dots] [--steps 50 100 200 300]
[--methods spare salun ...] [--lr LR]`` trains once per (method, timestep mode), evaluating after each budget
(continuing from the checkpoint, which gives the same adapter as an uninterrupted run), and writes
``benchmarks/results/unlearn_ablation.json``. ``spare`` runs both timestep modes; the baselines
sample uniformly, as their code does. "Seconds" are the method's own wall time up to that budget:
its localisation once plus its training steps, evaluation excluded. Two bars: UA >= 0.95 alone, and
the issue's (UA >= 0.95 with IRA and CRA within 0.05 of the base model), each from that budget on.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from spare_kernels import canvas
import torch

from spare_kernels.unlearn import METHODS, Config, canvas_task, run
from spare_kernels.unlearn.config import TARGETS
from spare_kernels.utils.io import write_json

RESULTS = os.path.join(os.path.dirname(__file__), "results")


# The metrics are float32 fractions of image counts: a row exactly on a bar must not miss it by rounding.
TOL = 1e-6


def reached(rows, key="steps", ok=lambda r: r["ua"] >= 0.95 - TOL):
    """``key`` of the first budget from which ``ok`` holds on every later one (None if not at the last)."""
    first = None
    for r in rows:
        first = (first if first is not None else r[key]) if ok(r) else None
    return first


def bar_met(r, base):
    """The issue's bar: UA >= 0.95 and IRA, CRA >= base - 0.05 (e.g. 6 images of 120 below base meet it)."""
    return (r["ua"] >= 0.95 - TOL and r["ira"] >= base["ira"] - 0.05 - TOL
            and r["cra"] >= base["cra"] - 0.05 - TOL)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="style:dots")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 300])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=["spare"])
    p.add_argument("--lr", type=float, default=None, help="every method's learning rate (default: each method's own)")
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=("unet", "dit"), default="unet",
                   help="the shipped UNet or MiniCanvas-DiT (an SD3 MMDiT, rectified flow)")
    p.add_argument("--targets", choices=TARGETS, default="all", help="Config.targets of every method")
    p.add_argument("--spare-modes", nargs="+", choices=("critical", "uniform"), default=["critical", "uniform"],
                   help="spare's timestep samplers to run (the baselines sample as their code does)")
    p.add_argument("--out", default=os.path.join(RESULTS, "unlearn_ablation.json"))
    a = p.parse_args(argv)
    task = canvas_task(a.target, seed=a.seed, model=a.model)
    load = canvas.load_model
    if a.model == "dit":
        from spare_kernels.canvas.dit import load_dit as load
    base = canvas.evaluate(load(), target=a.target, surrogate=task.surrogate, n_per_prompt=a.n_per_prompt,
                           seed=a.seed, progress=False)

    runs = [(m, mode) for m in a.methods for mode in (a.spare_modes if m == "spare" else ("uniform",))]
    rows, reach = [], {}
    for method, mode in runs:
        label = f"{method} {mode}" if method == "spare" else method
        mine = []
        with tempfile.TemporaryDirectory() as d:
            prev, seconds = 0, 0.0
            for steps in sorted(a.steps):
                unet = load()
                cfg = Config(method=method, steps=steps, timesteps=mode, seed=a.seed, checkpoint_every=steps, lr=a.lr,
                             targets=a.targets)
                r = run(unet, task, cfg, out_dir=d, resume=prev > 0, progress=False)
                seconds += r["stage_seconds"]["train"] + (r["stage_seconds"]["localise"] if prev == 0 else 0.0)
                ev = canvas.evaluate(unet, target=a.target, surrogate=task.surrogate, n_per_prompt=a.n_per_prompt,
                                     seed=a.seed, progress=False)
                row = {"method": method, "timesteps": mode, "lr": cfg.learning_rate, "steps": steps, "ua": ev["ua"],
                       "ira": ev["ira"], "cra": ev["cra"], "fidelity_psnr": ev["fidelity_psnr"],
                       "train_seconds": r["stage_seconds"]["train"], "seconds": seconds}
                mine.append(row)
                print(f"{label:<16} {steps:>4} steps {seconds:6.1f} s: UA {row['ua']:.3f}  IRA {row['ira']:.3f}  "
                      f"CRA {row['cra']:.3f}  PSNR {row['fidelity_psnr']:.1f}", flush=True)
                prev = steps
        rows += mine
        reach[label] = {"steps": reached(mine), "seconds": reached(mine, "seconds"),
                        "steps_bar": reached(mine, ok=lambda r: bar_met(r, base)),
                        "seconds_bar": reached(mine, "seconds", ok=lambda r: bar_met(r, base))}
    print(f"base IRA {base['ira']:.3f}, CRA {base['cra']:.3f}. From which budget on (None: not at {max(a.steps)} steps):")
    print(f"  {'':<16} {'UA >= 0.95':>18} {'and IRA, CRA >= base - 0.05':>30}")
    for label, v in reach.items():
        cell = [f"{v[k]} ({v[s]:.1f} s)" if v[s] is not None else "None"
                for k, s in (("steps", "seconds"), ("steps_bar", "seconds_bar"))]
        print(f"  {label:<16} {cell[0]:>18} {cell[1]:>30}")
    write_json(a.out, {"target": a.target, "surrogate": task.surrogate, "model": a.model, "targets": a.targets,
                       "threads": torch.get_num_threads(), "base": {"ira": base["ira"], "cra": base["cra"]},
                       "rows": rows, "steps_to_ua95": reach})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
