"""Ablation: steps to reach UA >= 0.95 with concept-critical vs uniform timesteps (MiniCanvas, spare).

``PYTHONPATH=. python -m benchmarks.unlearn_ablation [--target style:dots] [--steps 50 100 200 300]``
trains once per timestep mode, evaluating after each budget (continuing from the checkpoint, which
gives the same adapter as an uninterrupted run), and writes ``benchmarks/results/unlearn_ablation.json``.
"""
from __future__ import annotations

import argparse
import os
import tempfile

from spare_kernels import canvas
from spare_kernels.unlearn import Config, canvas_task, run
from spare_kernels.utils.io import write_json

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="style:dots")
    p.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200, 300])
    p.add_argument("--n-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(RESULTS, "unlearn_ablation.json"))
    a = p.parse_args(argv)
    task = canvas_task(a.target, seed=a.seed)
    rows = []
    for mode in ("critical", "uniform"):
        with tempfile.TemporaryDirectory() as d:
            prev = 0
            for steps in sorted(a.steps):
                unet = canvas.load_model()
                cfg = Config(method="spare", steps=steps, timesteps=mode, seed=a.seed, checkpoint_every=steps)
                r = run(unet, task, cfg, out_dir=d, resume=prev > 0, progress=False)
                ev = canvas.evaluate(unet, target=a.target, surrogate=task.surrogate, n_per_prompt=a.n_per_prompt,
                                     seed=a.seed, progress=False)
                row = {"timesteps": mode, "steps": steps, "ua": ev["ua"], "ira": ev["ira"], "cra": ev["cra"],
                       "fidelity_psnr": ev["fidelity_psnr"], "train_seconds": r["stage_seconds"]["train"]}
                rows.append(row)
                print(f"{mode:<9} {steps:>4} steps: UA {row['ua']:.3f}  IRA {row['ira']:.3f}  CRA {row['cra']:.3f}  "
                      f"PSNR {row['fidelity_psnr']:.1f}", flush=True)
                prev = steps
    first = {m: next((r["steps"] for r in rows if r["timesteps"] == m and r["ua"] >= 0.95), None)
             for m in ("critical", "uniform")}
    print(f"steps to UA >= 0.95: critical {first['critical']}, uniform {first['uniform']} "
          f"(None: not within {max(a.steps)})")
    write_json(a.out, {"target": a.target, "surrogate": task.surrogate, "rows": rows, "steps_to_ua95": first})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
