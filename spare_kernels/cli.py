"""Command line: ``spare-kernels`` / ``python -m spare_kernels``."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_demo(args):
    import torch

    from . import backend_info
    try:   # the anchors live in the repository's benchmarks/ (run from a checkout, as `make demo` does)
        from benchmarks.layers import DEMO_SHAPES, header, run
    except ImportError:
        print("spare-kernels demo: run it from the repository root (it uses benchmarks/)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    be = backend_info()["ops"]["masked_lora_linear"]["cpu"]
    print(f"spare_kernels demo: SD-1.5 Linear layers (32x32 latent, batch 1), forward+backward, fp32, rank 4, "
          f"CPU ({torch.get_num_threads()} threads), backend '{be}'.")
    print("Ratios of median times, interleaved in one process (name/baseline). elem: element mask density 0.5; "
          "block: 32x32 block mask density 0.1; dense: no mask.\n")
    print(header())
    rows = run(shapes=DEMO_SHAPES[:2] if args.quick else DEMO_SHAPES, reps=args.reps)
    if args.json:
        from .utils.io import write_json
        write_json(args.json, rows)
    return 0


def _cmd_info(args):
    from . import backend_info
    print(json.dumps(backend_info(), indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="spare-kernels", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="benchmark the ops against dense LoRA and SPARE's dense-adapter scheme")
    d.add_argument("--reps", type=int, default=7, help="timed repetitions per scheme (median reported)")
    d.add_argument("--quick", action="store_true", help="two shapes only")
    d.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    d.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    d.set_defaults(fn=_cmd_demo)
    i = sub.add_parser("info", help="print which backend runs each op on each device")
    i.set_defaults(fn=_cmd_info)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
