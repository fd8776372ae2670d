"""The full benchmark table (``make bench``): layers, whole-UNet saliency, whole-UNet step.

``PYTHONPATH=. python -m benchmarks.run [--quick]`` runs, in one process each:
``benchmarks.layers`` (every SD-1.5 Linear/Conv2d shape, batch 1 and 2), ``benchmarks.saliency``
(SD-1.5-shaped UNet, batch 8) and ``benchmarks.unet_step`` (SD-1.5-shaped UNet, batch 1), and
writes their JSON under ``benchmarks/results/``. ``--quick`` shrinks everything to a smoke run.
"""
from __future__ import annotations

import argparse
import os
import time

from . import layers, saliency, unet_step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (smoke run)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--only", nargs="+", choices=["layers", "saliency", "unet_step"],
                   default=["layers", "saliency", "unet_step"])
    a = p.parse_args(argv)
    t0 = time.time()
    if "layers" in a.only:
        print("== layers ==", flush=True)
        # (a smoke run must not overwrite the measured table)
        layers.main(["--reps", str(a.reps or (1 if a.quick else 7))] + (
            ["--limit", "3", "--batch", "1", "--out", os.path.join(layers.RESULTS, "layers_quick.json")]
            if a.quick else []))
    if "saliency" in a.only:
        print("\n== saliency ==", flush=True)
        saliency.main(["--reps", str(a.reps or (1 if a.quick else 3))]
                      + (["--config", "tiny", "--batch", "4", "--out",
                          os.path.join(layers.RESULTS, "saliency_quick.json")] if a.quick else []))
    if "unet_step" in a.only:
        print("\n== unet_step ==", flush=True)
        unet_step.main(["--reps", str(a.reps or (1 if a.quick else 5))]
                       + (["--config", "tiny", "--out", os.path.join(layers.RESULTS, "unet_step_quick.json")]
                          if a.quick else ["--config", "sd15"]))
    print(f"\nbenchmarks done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
