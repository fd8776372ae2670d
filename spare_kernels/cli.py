"""Command line: ``spare-kernels`` / ``python -m spare_kernels``.

- ``demo``: MiniCanvas end to end on the shipped model (base metrics, saliency, masks, training,
  metrics after), one method or ``--compare`` (all methods, one table);
- ``unlearn``: the same recipe on a local diffusers model directory, writes the adapter;
- ``bench``: the benchmark tables (``benchmarks/``, run from a checkout; the GPU one when torch sees a GPU);
- ``info``: which backend runs each op.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

RESULT_KEYS = ("target", "surrogate", "method", "ua", "ira", "cra", "base_ira", "base_cra", "fidelity_psnr",
               "seconds", "steps", "peak_mem_mb")


class UsageError(Exception):
    """Bad input found before any work started."""


def _writable_dir(path, arg):
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".spare_kernels_write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{arg}: cannot write to {path!r} ({e.strerror or e})") from None
    return path


def _could_write_dir(path, arg):
    """What :func:`_writable_dir` will find, without creating anything: ``path`` is a writable directory,
    or its nearest existing ancestor is one (``path`` is made there later)."""
    p = os.path.abspath(path)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UsageError(f"{arg}: cannot write to {path!r} ({p!r} is not a directory)")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UsageError(f"{arg}: cannot write to {path!r} (no write permission in {p!r})")


def _writable_file(path, arg):
    if os.path.isdir(path):
        raise UsageError(f"{arg}: {path!r} is a directory; expected a file path")
    _writable_dir(os.path.dirname(os.path.abspath(path)), arg)
    return path


def _common_checks(args, out_dirs):
    """Checks ``demo`` and ``unlearn`` share, before any work: thread count, checkpoint and resume flags
    (``out_dirs``: the run directories that will hold checkpoint.pt)."""
    if args.threads < 0:
        raise UsageError(f"--threads: expected >= 0 (0: torch's default), got {args.threads}")
    if args.checkpoint_every and not out_dirs:
        raise UsageError("--checkpoint-every: needs --out (where checkpoint.pt is written)")
    if args.resume:
        if not out_dirs:
            raise UsageError("--resume: needs --out (the run directory holding checkpoint.pt)")
        missing = [d for d in out_dirs if not os.path.isfile(os.path.join(d, "checkpoint.pt"))]
        if missing:
            raise UsageError(f"--resume: no checkpoint.pt in {missing[0]!r} to resume from")


def _threads(n):
    if n:
        import torch
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- demo
def _recipe_args(p):
    """The recipe's settings that ``demo`` and ``unlearn`` share: ``Config`` fields, with its defaults."""
    import dataclasses

    from .masks import GRANULARITIES, SCOPES
    from .ops.saliency import STATS
    from .unlearn.config import TARGETS, TIMESTEPS, Config
    d = {f.name: f.default for f in dataclasses.fields(Config)}
    p.add_argument("--steps", type=int, default=d["steps"], help=f"training steps (default {d['steps']})")
    p.add_argument("--rank", type=int, default=d["rank"], help=f"adapter rank (default {d['rank']})")
    p.add_argument("--density", type=float, default=d["density"],
                   help=f"mask density (SPARE's per-weight default {d['density']})")
    p.add_argument("--granularity", default=d["granularity"], choices=GRANULARITIES,
                   help=f"mask unit (default {d['granularity']})")
    p.add_argument("--block", type=int, nargs=2, default=d["block"], metavar=("BO", "BI"),
                   help=f"tile of block masks (default {d['block'][0]} {d['block'][1]})")
    p.add_argument("--scope", default=d["scope"], choices=SCOPES, help="top-k over the whole UNet or per module")
    p.add_argument("--saliency-stat", default=d["saliency_stat"], choices=STATS)
    p.add_argument("--timesteps", default=d["timesteps"], choices=TIMESTEPS)
    p.add_argument("--targets", default=d["targets"], choices=TARGETS,
                   help=f"layers the methods change: every Linear and Conv2d, or the attention projections "
                        f"to_q/to_k/to_v/to_out.0 as SPARE's code (default {d['targets']}; esd: cross-attention "
                        f"whatever this says)")
    p.add_argument("--mix", type=float, default=d["mix"],
                   help=f"weight of the concept curve in the timestep mixture (default {d['mix']})")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default: each method's own; with --compare, one lr for every method)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"],
                   help="checkpoint every K steps (0: never; needs --out)")


def _recipe_config(args, method):
    """The Config of ``method`` from every parsed flag named after a Config field (``--method`` aside:
    ``--compare`` runs them all)."""
    import dataclasses

    from .unlearn import Config
    fields = {f.name for f in dataclasses.fields(Config)} - {"method"}
    return Config(method=method, **{k: v for k, v in vars(args).items() if k in fields})


def _cmd_demo(args):
    from . import canvas
    from .canvas.metrics import parse_surrogate, parse_target
    from .unlearn import METHODS

    # Every check before any work.
    try:
        domain, name = parse_target(args.target)
        names = canvas.STYLES if domain == "style" else canvas.OBJECTS
        surrogate = args.surrogate or next(n for n in names if n != name)
        surrogate = parse_surrogate(surrogate, domain, name)
        _recipe_config(args, args.method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.n_per_prompt < 1:
        raise UsageError(f"--n-per-prompt: expected >= 1, got {args.n_per_prompt}")
    if args.json:
        _writable_file(args.json, "--json")
    # resume continues the method named by --method (its folder under --out with --compare)
    _common_checks(args, [os.path.join(args.out, args.method) if args.compare else args.out] if args.out else [])
    if args.out:
        _writable_dir(args.out, "--out")
    _threads(args.threads)
    import torch

    from .unlearn import canvas_task, run

    methods = list(METHODS) if args.compare else [args.method]
    ev = dict(target=args.target, surrogate=surrogate, n_per_prompt=args.n_per_prompt, seed=args.seed,
              progress=not args.quiet)
    print(f"MiniCanvas: erase {args.target!r} (surrogate {surrogate!r}); methods: {', '.join(methods)}; "
          f"targets {args.targets}; {args.steps} steps; {torch.get_num_threads()} threads", flush=True)
    base_model = canvas.load_model()
    base = canvas.evaluate(base_model, **ev)
    print(f"base model: UA {base['ua']:.3f}  IRA {base['ira']:.3f}  CRA {base['cra']:.3f}", flush=True)
    grid_prompts = canvas.prompts(**{domain: name}) + canvas.prompts(**{domain: surrogate})
    grids = {"samples_before": (canvas.sample(base_model, grid_prompts, seed=args.seed), len(grid_prompts) // 2)}
    # One task for every method: its tensors are only read, and data-free samples come from the
    # shipped model, which base_model is.
    task = canvas_task(args.target, surrogate, seed=args.seed, data_free=args.data_free,
                       unet=base_model if args.data_free else None)
    rows, results = [], {}
    for method in methods:
        unet = canvas.load_model()
        out = os.path.join(args.out, method) if args.out and args.compare else args.out
        if out:
            os.makedirs(out, exist_ok=True)
        r = run(unet, task, _recipe_config(args, method), out_dir=out, resume=args.resume and method == args.method,
                progress=not args.quiet)
        after = canvas.evaluate(unet, **ev)
        row = {"target": args.target, "surrogate": surrogate, "method": method, "ua": after["ua"],
               "ira": after["ira"], "cra": after["cra"], "base_ira": base["ira"], "base_cra": base["cra"],
               "fidelity_psnr": after["fidelity_psnr"], "seconds": r["seconds"], "steps": r["steps"],
               "peak_mem_mb": r["peak_mem_mb"], "surrogate_rate": after["surrogate_rate"],
               "stage_seconds": r["stage_seconds"], "data_free": args.data_free, "timesteps": args.timesteps,
               "targets": "cross-attention" if method == "esd" else args.targets}   # esd: ESD-x's own set
        rows.append(row)
        results[method] = r
        grids[f"samples_after_{method}"] = (canvas.sample(unet, grid_prompts, seed=args.seed), len(grid_prompts) // 2)
        print(f"{method}: UA {row['ua']:.3f}  IRA {row['ira']:.3f}  CRA {row['cra']:.3f}  "
              f"PSNR {row['fidelity_psnr']:.1f} dB  {row['seconds']:.1f} s  peak {row['peak_mem_mb']:.0f} MB", flush=True)
    print()
    print(format_table(rows))
    if args.out:
        from .unlearn.plots import write_all
        for p in write_all(args.out, results, grids):
            print(f"wrote {p}")
        from .utils.io import write_json
        write_json(os.path.join(args.out, "results.json"), {"rows": rows, "curves": {
            m: {"curve": r["curve"], "timestep_density": r["timestep_density"], "history": r["history"]}
            for m, r in results.items()}, "configs": {m: r["config"] for m, r in results.items()}})
    if args.json:
        from .utils.io import write_json
        main_row = next(r for r in rows if r["method"] == args.method) if args.method in methods else rows[0]
        doc = {k: main_row[k] for k in RESULT_KEYS}
        if args.compare:
            doc["compare"] = rows
        write_json(args.json, doc)
        print(f"wrote {args.json}")
    return 0


def format_table(rows) -> str:
    """One line per method; with spare and another method, ``spare/x`` is spare's wall time over this
    method's (the issue's ratio: 0.6 means spare took 60% of its time)."""
    spare = next((r["seconds"] for r in rows if r["method"] == "spare"), None)
    ratio = spare is not None and len(rows) > 1
    head = (f"{'method':<16}{'UA':>7}{'IRA':>7}{'CRA':>7}{'base IRA':>10}{'base CRA':>10}{'PSNR dB':>9}{'seconds':>9}"
            + (f"{'spare/x':>9}" if ratio else "") + f"{'peak MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        x = (f"{spare / r['seconds']:>9.3f}" if r["seconds"] > 0 else f"{'-':>9}") if ratio else ""
        lines.append(f"{r['method']:<16}{r['ua']:>7.3f}{r['ira']:>7.3f}{r['cra']:>7.3f}{r['base_ira']:>10.3f}"
                     f"{r['base_cra']:>10.3f}{r['fidelity_psnr']:>9.1f}{r['seconds']:>9.1f}{x}{r['peak_mem_mb']:>9.0f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- unlearn
def _prompt(value, flag):
    """An empty or blank prompt would encode to the unconditional embedding: never what was meant."""
    if not value.strip():
        raise UsageError(f"{flag}: expected a non-empty prompt, got {value!r}")
    return value


def _read_prompts(flag_values, file_path, flag):
    """``flag`` values, then the file's lines (blank lines skipped); a file holding no prompt at all is
    an error of its own (an empty forget set would otherwise be blamed on the flags)."""
    prompts = [_prompt(v, flag) for v in flag_values or []]
    if file_path:
        if not os.path.isfile(file_path):
            raise UsageError(f"{flag}s-file: no such file {file_path!r}")
        with open(file_path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        if not lines:
            raise UsageError(f"{flag}s-file: {file_path!r} holds no prompt (every line is blank)")
        prompts += lines
    return prompts


def _device(spec):
    """``--device``: None picks CUDA when torch sees a GPU, else the CPU; anything else must exist here."""
    import torch
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: expected a torch device such as cpu or cuda:0, got {spec!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: this torch sees no CUDA device (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise UsageError(f"--device: expected cpu or cuda[:N], got {spec!r}")
    return dev


def _cmd_unlearn(args):
    from .unlearn.diffusers_task import check_model_dir, diffusers_task, load_pipeline

    forget = _read_prompts(args.forget_prompt, args.forget_prompts_file, "--forget-prompt")
    retain = _read_prompts(args.retain_prompt, args.retain_prompts_file, "--retain-prompt")
    if not forget:
        raise UsageError("forget set: empty: give --forget-prompt and/or --forget-prompts-file")
    if args.surrogate_prompt is None:
        raise UsageError("--surrogate-prompt: required (what the forget prompts should produce instead)")
    _prompt(args.surrogate_prompt, "--surrogate-prompt")
    if not retain:
        raise UsageError("retain set: empty: give --retain-prompt and/or --retain-prompts-file")
    if bool(args.forget_images) == bool(args.data_free):
        raise UsageError("forget images: give exactly one of --forget-images DIR or --data-free")
    if args.forget_images:
        from .unlearn.diffusers_task import image_files
        if not os.path.isdir(args.forget_images):
            raise UsageError(f"--forget-images: not a directory: {args.forget_images!r}")
        if not image_files(args.forget_images):
            raise UsageError(f"forget set: empty: no images in {args.forget_images!r}")
    if args.n_generate < 1:
        raise UsageError(f"--n-generate: expected >= 1, got {args.n_generate}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution: expected a positive multiple of 8 (the VAE's factor), got {args.resolution}")
    try:
        check_model_dir(args.model)
        cfg = _recipe_config(args, "spare")
    except ValueError as e:
        raise UsageError(str(e)) from None
    _common_checks(args, [args.out])
    device = _device(args.device)
    if args.precision == "bf16" and device.type == "cuda":
        import torch
        with torch.cuda.device(device):
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if not native_bf16:
            raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                             "(it would be emulated, slowly); use --precision fp32")
    _could_write_dir(args.out, "--out")
    _threads(args.threads)
    # Load before --out is made: a folder with missing files (an interrupted download) passes
    # check_model_dir but fails here, and must leave nothing behind. Generation and training follow.
    try:
        pipe = load_pipeline(args.model, progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from None
    _writable_dir(args.out, "--out")
    from .unlearn import run
    unet, task = diffusers_task(args.model, forget, args.surrogate_prompt, retain, images_dir=args.forget_images,
                                n_generate=args.n_generate, seed=args.seed, resolution=args.resolution,
                                device=device, progress=not args.quiet, pipe=pipe)
    r = run(unet, task, cfg, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    from .utils.io import write_json
    write_json(os.path.join(args.out, "run.json"), {k: v for k, v in r.items() if k != "history"}
               | {"history": r["history"], "model": os.path.abspath(args.model)})
    print(f"wrote {r['adapter']} ({r['seconds']:.1f} s, peak {r['peak_mem_mb']:.0f} MB)")
    return 0


# ------------------------------------------------------------------------------------------ bench
def _cmd_bench(args):
    try:   # the anchors live in the repository's benchmarks/ (run from a checkout)
        from benchmarks import gpu as bench_gpu
        from benchmarks import run as bench_run
    except ImportError:
        raise UsageError("bench: run it from the repository root (it uses benchmarks/)") from None
    import torch
    _threads(args.threads)
    if torch.cuda.is_available() and not args.cpu:   # the GPU benchmark (CUDA events, SD-1.5 at 64x64)
        sections = [{"unet_step": "step"}.get(s, s) for s in (args.only or ["layers", "saliency", "unet_step", "run"])]
        return bench_gpu.main((["--quick"] if args.quick else []) + ["--sections"] + sections) or 0
    if args.only and "run" in args.only:
        raise UsageError("--only run: the whole SPARE run is a section of the GPU benchmark (no GPU here, or --cpu)")
    only = args.only or []
    return bench_run.main((["--quick"] if args.quick else []) + (["--only"] + only if only else [])) or 0


def _cmd_info(args):
    from . import backend_info
    print(json.dumps(backend_info(), indent=2))
    return 0


def main(argv=None) -> int:
    from .unlearn.config import METHODS, PRECISIONS

    p = argparse.ArgumentParser(prog="spare-kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="MiniCanvas unlearning end to end on the shipped model")
    d.add_argument("--target", default="style:dots", help="style:NAME or object:NAME (default style:dots)")
    d.add_argument("--surrogate", default=None, help="concept of the same domain to map the target to")
    d.add_argument("--method", default="spare", choices=METHODS)
    d.add_argument("--compare", action="store_true", help="run every method, one table")
    _recipe_args(d)
    d.add_argument("--data-free", action="store_true", help="forget images generated by the model (PECKER)")
    d.add_argument("--n-per-prompt", type=int, default=4, help="evaluation images per prompt")
    d.add_argument("--out", default=None, help="directory for the adapter, plots and results.json")
    d.add_argument("--json", default=None, help="write the result keys to this JSON file")
    d.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(fn=_cmd_demo)

    u = sub.add_parser("unlearn", help="the SPARE recipe on a local diffusers model directory")
    u.add_argument("model", help="a diffusers pipeline directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    u.add_argument("--forget-prompt", action="append", help="a prompt naming the concept (repeatable)")
    u.add_argument("--forget-prompts-file")
    u.add_argument("--surrogate-prompt", help="the prompt the forget prompts should behave like")
    u.add_argument("--retain-prompt", action="append", help="a prompt to keep unchanged (repeatable)")
    u.add_argument("--retain-prompts-file")
    u.add_argument("--forget-images", help="folder of forget images (png/jpg)")
    u.add_argument("--data-free", action="store_true", help="generate the forget images with the model")
    u.add_argument("--n-generate", type=int, default=4, help="generated images per prompt (data-free / retain)")
    u.add_argument("--resolution", type=int, default=None, help="image size (default: the UNet's sample size x 8)")
    _recipe_args(u)
    u.add_argument("--out", required=True, help="output directory (adapter.safetensors, run.json)")
    u.add_argument("--resume", action="store_true")
    u.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if torch sees a GPU, else cpu)")
    u.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: forwards under torch.autocast; weights, adapters and optimizer stay fp32")
    u.add_argument("--threads", type=int, default=0)
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(fn=_cmd_unlearn)

    b = sub.add_parser("bench", help="the benchmark tables (run from the repository root): the GPU benchmark "
                                     "(benchmarks/gpu.py) when torch sees a GPU, else the CPU one")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--only", nargs="+", choices=["layers", "saliency", "unet_step", "run"],
                   help="sections ('run': the whole SPARE run, GPU only)")
    b.add_argument("--cpu", action="store_true", help="the CPU benchmarks even when a GPU is present")
    b.add_argument("--threads", type=int, default=0)
    b.set_defaults(fn=_cmd_bench)

    i = sub.add_parser("info", help="print which backend runs each op on each device")
    i.set_defaults(fn=_cmd_info)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"spare-kernels {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
