"""Command line: ``spare-kernels`` / ``python -m spare_kernels``.

- ``demo``: MiniCanvas end to end on the shipped model (base metrics, saliency, masks, training,
  metrics after), one method or ``--compare`` (all methods, one table);
- ``unlearn``: the same recipe on a local diffusers model directory, writes the adapter;
- ``bench``: the benchmark tables (``benchmarks/``, run from a checkout; the GPU one when torch sees a GPU);
- ``info``: which backend runs each op;
- ``warmup``: compile (in parallel) and, on a GPU, tune every Triton kernel a patched UNet's step will
  launch, so the first step does not (``spare_kernels.warmup``).

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1), ``demo`` and ``unlearn`` train data
parallel across the ranks (rank 0 evaluates, prints and writes), or, with ``--jobs FILE``, give each
rank whole jobs of its own (one concept per JSON line; finished jobs are skipped on a rerun).
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


def _common_checks(args, out_dirs, check_files=True, cfg=None):
    """Checks ``demo`` and ``unlearn`` share, before any work: thread count, checkpoint and resume flags
    (``out_dirs``: the run directories that will hold checkpoint.pt; ``check_files``: whether this
    process reads them, rank 0 alone across ranks). With ``--resume`` and ``cfg`` (the run's Config),
    each checkpoint is read as the run will read it: one that does not load, was made with other
    settings or is past ``--steps`` is refused now, not after the model and data are loaded (its tensors
    mapped, not read: the run reads the file once, weights only)."""
    if args.threads < 0:
        raise UsageError(f"--threads: expected >= 0 (0: torch's default), got {args.threads}")
    if args.checkpoint_every and not out_dirs:
        raise UsageError("--checkpoint-every: needs --out (where checkpoint.pt is written)")
    if args.resume:
        if not out_dirs:
            raise UsageError("--resume: needs --out (the run directory holding checkpoint.pt)")
        missing = [d for d in out_dirs if check_files and not os.path.isfile(os.path.join(d, "checkpoint.pt"))]
        if missing:
            raise UsageError(f"--resume: no checkpoint.pt in {missing[0]!r} to resume from")
        if check_files and cfg is not None:
            from .unlearn.checkpoints import read_checkpoint
            for d in out_dirs:
                path = os.path.join(d, "checkpoint.pt")
                try:
                    read_checkpoint(path, cfg, mmap=True)
                except ValueError as e:
                    raise UsageError("--" + str(e)) from None   # its messages start "resume: "
                except OSError as e:   # not readable now (permissions, EIO): nothing says it is damaged
                    raise UsageError(f"--resume: cannot read {path} ({e.strerror or e})") from None


def _threads(n):
    if n:
        import torch
        torch.set_num_threads(n)


def _world(device_type, timeout_s=None):
    """The process group of a ``torchrun`` / ``accelerate launch`` start (made here from the
    environment), or one rank."""
    from .distributed import init_from_env
    try:
        return init_from_env(device_type, timeout_s=timeout_s)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ------------------------------------------------------------------------------------------- jobs
JOB_KEYS = {"demo": {"name", "target", "surrogate"},
            "unlearn": {"name", "forget_prompts", "surrogate_prompt", "retain_prompts", "forget_images", "data_free"}}
# A jobs sweep talks only at its very end (the summary); ranks with shorter jobs wait there this long.
JOBS_TIMEOUT_S = 7 * 24 * 3600.0


def _read_jobs(path, kind):
    """The jobs file: one JSON object per line (blank lines and lines starting with # skipped), each
    checked before any work; names (default: the target, or job<N>) are unique and safe as folder names."""
    import re
    if not os.path.isfile(path):
        raise UsageError(f"--jobs: no such file {path!r}")
    jobs = []
    with open(path) as f:
        for ln, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = f"--jobs {path}:{ln}"
            try:
                job = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(job, dict):
                raise UsageError(f"{where}: expected a JSON object, got {type(job).__name__}")
            bad = sorted(set(job) - JOB_KEYS[kind])
            if bad:
                raise UsageError(f"{where}: unknown keys {bad}; expected {sorted(JOB_KEYS[kind])}")
            if kind == "demo":
                if not isinstance(job.get("target"), str):
                    raise UsageError(f"{where}: 'target' (style:NAME or object:NAME) is required")
                try:
                    _, _, job["surrogate"] = _demo_surrogate(job["target"], job.get("surrogate"))
                except ValueError as e:
                    raise UsageError(f"{where}: {e}") from None
                default = job["target"].replace(":", "_")
            else:
                for k in ("forget_prompts", "retain_prompts"):
                    v = job.get(k)
                    if not (isinstance(v, list) and v and all(isinstance(p, str) and p.strip() for p in v)):
                        raise UsageError(f"{where}: {k!r}: expected a non-empty list of non-empty prompts")
                if not (isinstance(job.get("surrogate_prompt"), str) and job["surrogate_prompt"].strip()):
                    raise UsageError(f"{where}: 'surrogate_prompt': expected a non-empty prompt")
                if bool(job.get("forget_images")) == bool(job.get("data_free")):
                    raise UsageError(f"{where}: give exactly one of 'forget_images' (a folder) or 'data_free': true")
                if job.get("forget_images") and not os.path.isdir(job["forget_images"]):
                    raise UsageError(f"{where}: 'forget_images': not a directory: {job['forget_images']!r}")
                default = f"job{len(jobs)}"
            name = job.get("name", default)
            if not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name)):
                raise UsageError(f"{where}: 'name': expected letters, digits, '_', '.', '-' (a folder name), "
                                 f"got {name!r}")
            if any(j["name"] == name for j in jobs):
                raise UsageError(f"{where}: name {name!r} is used twice")
            job["name"] = name
            jobs.append(job)
    if not jobs:
        raise UsageError(f"--jobs: {path!r} holds no job")
    return jobs


def _run_jobs(args, jobs, do_job, world):
    """Rank ``r`` of ``N`` runs jobs ``r, r+N, ...``, each alone (no communication) in ``--out/NAME``:
    a job whose ``result.json`` exists is skipped, one with a ``checkpoint.pt`` resumes from it. A
    failing job is reported and the others go on. At the end one all-gather brings every rank's rows
    to rank 0, which prints the table and writes ``--out/summary.json``. Exit status 1 if a job failed."""
    from .distributed import all_gather_object, local
    from .utils.io import write_json
    rows = []
    for i in range(world.rank, len(jobs), world.size):
        job = jobs[i]
        d = os.path.join(args.out, job["name"])
        done = os.path.join(d, "result.json")
        if os.path.isfile(done):
            with open(done) as f:
                row = json.load(f)
            print(f"[rank {world.rank}] {job['name']}: done before, skipped", flush=True)
            rows.append(dict(row, skipped=True))
            continue
        os.makedirs(d, exist_ok=True)
        resume = os.path.isfile(os.path.join(d, "checkpoint.pt"))
        print(f"[rank {world.rank}] {job['name']}: " + ("resuming" if resume else "starting"), flush=True)
        try:
            with local():
                row = do_job(job, d, resume)
        except Exception as e:   # one concept failing must not cost the sweep the others
            print(f"[rank {world.rank}] {job['name']}: failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            rows.append({"name": job["name"], "error": f"{type(e).__name__}: {e}", "rank": world.rank})
            continue
        # Each job ran alone: world_size 1; sweep_ranks is how many ranks shared the sweep.
        row = dict(row, name=job["name"], rank=world.rank, world_size=1, sweep_ranks=world.size)
        write_json(done, row)
        rows.append(row)
    every = [r for part in all_gather_object(rows, world, "jobs summary") for r in part]
    every.sort(key=lambda r: [j["name"] for j in jobs].index(r["name"]))
    failed = [r for r in every if "error" in r]
    if world.is_main:
        print()
        print(format_jobs(every))
        write_json(os.path.join(args.out, "summary.json"), {"jobs": every, "sweep_ranks": world.size})
        print(f"wrote {os.path.join(args.out, 'summary.json')}" + (f"; {len(failed)} job(s) failed" if failed else ""))
    return 1 if failed else 0


def format_jobs(rows) -> str:
    head = f"{'job':<24}{'rank':>5}{'UA':>7}{'IRA':>7}{'CRA':>7}{'seconds':>9}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        def num(k, w=7, f=".3f"):
            return f"{r[k]:>{w}{f}}" if isinstance(r.get(k), (int, float)) else f"{'-':>{w}}"
        status = "failed: " + r["error"][:60] if "error" in r else "skipped (done before)" if r.get("skipped") else "ok"
        lines.append(f"{r['name']:<24}{r.get('rank', '-'):>5}{num('ua')}{num('ira')}{num('cra')}{num('seconds', 9, '.1f')}"
                     f"  {status}")
    return "\n".join(lines)


def _demo_jobs(args):
    if args.compare:
        raise UsageError("--jobs: runs --method on every job; --compare is not taken with it")
    if not args.out:
        raise UsageError("--jobs: needs --out (one folder per job, and summary.json)")
    if args.json or args.resume:
        raise UsageError("--jobs: --json and --resume are not taken with it (each job writes --out/NAME/result.json "
                         "and resumes from its own checkpoint)")
    jobs = _read_jobs(args.jobs, "demo")
    _common_checks(args, [args.out])   # --checkpoint-every: each job's folder; --resume is refused above
    _writable_dir(args.out, "--out")
    _threads(args.threads)
    world = _world("cpu", timeout_s=JOBS_TIMEOUT_S)
    from . import canvas
    from .unlearn import canvas_task, run

    def do_job(job, d, resume):
        ev = dict(target=job["target"], surrogate=job["surrogate"], n_per_prompt=args.n_per_prompt, seed=args.seed,
                  progress=False)
        base = canvas.evaluate(_canvas_model(args.model), **ev)
        task = canvas_task(job["target"], job["surrogate"], seed=args.seed, data_free=args.data_free,
                           unet=_canvas_model(args.model) if args.data_free else None, model=args.model)
        unet = _canvas_model(args.model)
        r = run(unet, task, _recipe_config(args, args.method), out_dir=d, resume=resume, progress=False)
        after = canvas.evaluate(unet, **ev)
        return {"target": job["target"], "surrogate": job["surrogate"], "method": args.method, "ua": after["ua"],
                "ira": after["ira"], "cra": after["cra"], "base_ira": base["ira"], "base_cra": base["cra"],
                "fidelity_psnr": after["fidelity_psnr"], "seconds": r["seconds"], "steps": r["steps"],
                "peak_mem_mb": r["peak_mem_mb"], "per_rank_batch": r["per_rank_batch"], "config": r["config"]}
    return _run_jobs(args, jobs, do_job, world)


# ------------------------------------------------------------------------------------------- demo
def _canvas_model(kind):
    """A fresh copy of the shipped MiniCanvas model of ``kind``: ``"unet"`` or ``"dit"``."""
    from . import canvas
    if kind == "dit":
        from .canvas.dit import load_dit
        return load_dit()
    return canvas.load_model()


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
                   help=f"layers the methods change, a preset of the model's family: on a UNet every Linear "
                        f"and Conv2d, or the attention projections to_q/to_k/to_v/to_out.0 as SPARE's code; on a "
                        f"transformer every attention projection of both streams, +mlp, or every Linear but "
                        f"the AdaLN modulation (default {d['targets']}; esd: its cross-attention set whatever "
                        f"this says)")
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


def _demo_surrogate(target, surrogate, where="--target"):
    from . import canvas
    from .canvas.metrics import parse_surrogate, parse_target
    domain, name = parse_target(target)
    names = canvas.STYLES if domain == "style" else canvas.OBJECTS
    return domain, name, parse_surrogate(surrogate or next(n for n in names if n != name), domain, name)


def _cmd_demo(args):
    from . import canvas
    from .unlearn import METHODS

    # Every check before any work.
    try:
        domain, name, surrogate = _demo_surrogate(args.target, args.surrogate)
        _recipe_config(args, args.method)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.n_per_prompt < 1:
        raise UsageError(f"--n-per-prompt: expected >= 1, got {args.n_per_prompt}")
    if args.model == "dit":
        from .canvas.dit import load_dit_meta
        try:
            load_dit_meta()
        except ValueError as e:
            raise UsageError(f"--model dit: {e}") from None
    if args.jobs:
        return _demo_jobs(args)
    world = _world("cpu")
    main = world.is_main
    if args.json and main:
        _writable_file(args.json, "--json")
    # resume continues the method named by --method (its folder under --out with --compare)
    _common_checks(args, [os.path.join(args.out, args.method) if args.compare else args.out] if args.out else [],
                   check_files=main, cfg=_recipe_config(args, args.method))
    if args.out and main:
        _writable_dir(args.out, "--out")
    _threads(args.threads)
    import torch

    from .unlearn import canvas_task, run
    say = print if main else (lambda *a, **k: None)

    methods = list(METHODS) if args.compare else [args.method]
    ev = dict(target=args.target, surrogate=surrogate, n_per_prompt=args.n_per_prompt, seed=args.seed,
              progress=not args.quiet)
    say(f"MiniCanvas{'-DiT' if args.model == 'dit' else ''}: erase {args.target!r} (surrogate {surrogate!r}); "
        f"methods: {', '.join(methods)}; "
        f"targets {args.targets}; {args.steps} steps; {torch.get_num_threads()} threads"
        + (f"; {world.size} ranks" if world.distributed else ""), flush=True)
    base_model = _canvas_model(args.model)
    # Evaluation and sample grids: rank 0 only (the others go on to the run and wait for it there).
    base = canvas.evaluate(base_model, **ev) if main else None
    if main:
        say(f"base model: UA {base['ua']:.3f}  IRA {base['ira']:.3f}  CRA {base['cra']:.3f}", flush=True)
    grid_prompts = canvas.prompts(**{domain: name}) + canvas.prompts(**{domain: surrogate})
    grids = {"samples_before": (canvas.sample(base_model, grid_prompts, seed=args.seed), len(grid_prompts) // 2)} \
        if main else {}
    # One task for every method: its tensors are only read, and data-free samples come from the
    # shipped model, which base_model is.
    task = canvas_task(args.target, surrogate, seed=args.seed, data_free=args.data_free,
                       unet=base_model if args.data_free else None, model=args.model)
    rows, results = [], {}
    for method in methods:
        unet = _canvas_model(args.model)
        out = os.path.join(args.out, method) if args.out and args.compare else args.out
        if out and main:
            os.makedirs(out, exist_ok=True)
        r = run(unet, task, _recipe_config(args, method), out_dir=out, resume=args.resume and method == args.method,
                progress=not args.quiet)
        if not main:
            continue
        after = canvas.evaluate(unet, **ev)
        row = {"target": args.target, "surrogate": surrogate, "method": method, "ua": after["ua"],
               "ira": after["ira"], "cra": after["cra"], "base_ira": base["ira"], "base_cra": base["cra"],
               "fidelity_psnr": after["fidelity_psnr"], "seconds": r["seconds"], "steps": r["steps"],
               "peak_mem_mb": r["peak_mem_mb"], "surrogate_rate": after["surrogate_rate"],
               "stage_seconds": r["stage_seconds"], "data_free": args.data_free, "timesteps": args.timesteps,
               # esd: ESD-x's own set (the DiT's joint attention)
               "targets": ("joint-attention" if args.model == "dit" else "cross-attention") if method == "esd"
               else args.targets, "model": args.model,
               "world_size": r["world_size"], "per_rank_batch": r["per_rank_batch"]}
        rows.append(row)
        results[method] = r
        grids[f"samples_after_{method}"] = (canvas.sample(unet, grid_prompts, seed=args.seed), len(grid_prompts) // 2)
        print(f"{method}: UA {row['ua']:.3f}  IRA {row['ira']:.3f}  CRA {row['cra']:.3f}  "
              f"PSNR {row['fidelity_psnr']:.1f} dB  {row['seconds']:.1f} s  peak {row['peak_mem_mb']:.0f} MB", flush=True)
    if not main:
        return 0
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
        doc = {k: main_row[k] for k in RESULT_KEYS + ("world_size", "per_rank_batch")}
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
    """``--device``: None picks CUDA when torch sees a GPU (under a launcher: this rank's, ``LOCAL_RANK``),
    else the CPU; anything else must exist here."""
    import torch
    if spec is None:
        from .distributed import local_device
        return local_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
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


def _unlearn_settings(args):
    """The checks of ``unlearn``'s model and recipe settings (one job or many) -> its Config."""
    from .unlearn.diffusers_task import check_model_dir
    if args.n_generate < 1:
        raise UsageError(f"--n-generate: expected >= 1, got {args.n_generate}")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution: expected a positive multiple of 8 (the VAE's factor), got {args.resolution}")
    try:
        layout = check_model_dir(args.model)
        cfg = _recipe_config(args, "spare")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.resolution is not None and args.resolution % layout.multiple:
        raise UsageError(f"--resolution: the {layout.pipeline} needs a multiple of {layout.multiple} (its VAE factor, "
                         f"patch and size checks), got {args.resolution}")
    return cfg, layout


def _total_bytes(device):
    """-> ``(bytes, what)``: all the memory of ``device``, not what is free now (free memory counts the
    page cache, ~0 in a container that just read a model folder): CUDA's total memory, or the CPU's
    (/proc/meminfo's MemTotal, within a cgroup's limit); ``(None, None)`` where it cannot be told."""
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, "its total memory"
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [(int(ln.split()[1]) * 1024, "MemTotal") for ln in f if ln.startswith("MemTotal:")]
    except (OSError, ValueError, IndexError):
        pass
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                found.append((int(f.read()), f"the cgroup limit {limit}"))
        except (OSError, ValueError):   # no such cgroup, or "max": no limit
            pass
    return min(found) if found else (None, None)


def _check_memory(args, cfg, layout, device, ranks=1):
    """Refuse an image size whose training step cannot fit: a lower bound of the step's memory from
    the folder's configs (:func:`~spare_kernels.unlearn.diffusers_task.step_memory`), against all the
    memory ``device`` has (a bound meant to catch absurd requests: what is free now is no measure of
    what the run may use), before anything is loaded (an allocator error deep in the first forward
    otherwise). ``ranks``: how many ranks share each batch."""
    from .unlearn.diffusers_task import step_memory
    batch = -(-max(cfg.batch_forget + cfg.batch_retain, cfg.saliency_batch) // ranks)   # the most a rank holds
    need = step_memory(layout, args.resolution, batch, 2 if cfg.precision == "bf16" else 4)
    have, what = _total_bytes(device)
    if need is None or have is None or need["total"] <= have:
        return
    gib = 2 ** 30
    asked = f"--resolution {args.resolution}" if args.resolution else f"the default resolution {need['size']}"
    raise UsageError(f"{asked}: a training step at {need['size']}x{need['size']} px needs at least "
                     f"{need['total'] / gib:,.1f} GiB on {device} (activations of {batch} samples at a "
                     f"{need['latent']}x{need['latent']} latent: {need['activations'] / gib:,.1f} GiB; weights: "
                     f"{need['weights'] / gib:,.1f} GiB), more than the {have / gib:,.1f} GiB {device} has in "
                     f"all ({what}); give a smaller --resolution")


def _cmd_unlearn(args):
    from .unlearn.diffusers_task import diffusers_task, load_pipeline

    if args.jobs:
        return _unlearn_jobs(args)
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
        from .unlearn.diffusers_task import check_images
        if not os.path.isdir(args.forget_images):
            raise UsageError(f"--forget-images: not a directory: {args.forget_images!r}")
        try:   # some, and every one decodes: a broken file must not fail the run after --out is made
            check_images(args.forget_images, "--forget-images")
        except ValueError as e:
            raise UsageError(str(e)) from None
    cfg, layout = _unlearn_settings(args)
    device = _device(args.device)
    world = _world(device.type)
    main = world.is_main
    _common_checks(args, [args.out], check_files=main, cfg=cfg)
    _check_memory(args, cfg, layout, device, world.size)
    if args.precision == "bf16" and device.type == "cuda":
        import torch
        with torch.cuda.device(device):
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if not native_bf16:
            raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no native bf16 "
                             "(it would be emulated, slowly); use --precision fp32")
    if main:
        _could_write_dir(args.out, "--out")
    _threads(args.threads)
    # Load before --out is made: a folder with missing files (an interrupted download) passes
    # check_model_dir but fails here, and must leave nothing behind. Generation and training follow.
    try:
        pipe = load_pipeline(args.model, progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if main:
        _writable_dir(args.out, "--out")
    from .unlearn import run
    model, task = diffusers_task(args.model, forget, args.surrogate_prompt, retain, images_dir=args.forget_images,
                                 n_generate=args.n_generate, seed=args.seed, resolution=args.resolution,
                                 device=device, progress=not args.quiet and main, pipe=pipe)
    if world.distributed:   # rank 0's samples for all: generation on another GPU may round differently
        from .distributed import broadcast_object
        keys = ("x_forget", "c_forget", "c_surrogate", "x_retain", "c_retain", "c_null")
        got = broadcast_object({k: getattr(task, k).cpu() for k in keys} if main else None, world, "task broadcast")
        for k in keys:
            setattr(task, k, got[k].to(device))
    r = run(model, task, cfg, out_dir=args.out, resume=args.resume, progress=not args.quiet)
    if not main:
        return 0
    from .utils.io import write_json
    write_json(os.path.join(args.out, "run.json"), {k: v for k, v in r.items() if k != "history"}
               | {"history": r["history"], "model": os.path.abspath(args.model)})
    print(f"wrote {r['adapter']} ({r['seconds']:.1f} s, peak {r['peak_mem_mb']:.0f} MB)")
    return 0


def _unlearn_jobs(args):
    from .unlearn.diffusers_task import check_images, diffusers_task, load_pipeline
    given = [f for f, v in (("--forget-prompt", args.forget_prompt), ("--forget-prompts-file", args.forget_prompts_file),
                            ("--retain-prompt", args.retain_prompt), ("--retain-prompts-file", args.retain_prompts_file),
                            ("--surrogate-prompt", args.surrogate_prompt), ("--forget-images", args.forget_images),
                            ("--data-free", args.data_free), ("--resume", args.resume)) if v]
    if given:
        raise UsageError(f"--jobs: each job gives its own prompts and images; not taken with {', '.join(given)}")
    jobs = _read_jobs(args.jobs, "unlearn")
    for j in jobs:
        if not j.get("forget_images"):
            continue
        try:   # some, and every one decodes, before --out is made
            check_images(j["forget_images"], f"--jobs: job {j['name']!r}: forget_images")
        except ValueError as e:
            raise UsageError(str(e)) from None
    cfg, layout = _unlearn_settings(args)
    _common_checks(args, [args.out])   # --checkpoint-every: each job's folder; --resume is refused above
    device = _device(args.device)
    _check_memory(args, cfg, layout, device)   # each rank runs whole jobs: the whole batch
    _writable_dir(args.out, "--out")
    _threads(args.threads)
    world = _world(device.type, timeout_s=JOBS_TIMEOUT_S)
    try:
        pipe = load_pipeline(args.model, progress=not args.quiet)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from .patch import unpatch_unet
    from .unlearn import run

    def do_job(job, d, resume):
        model, task = diffusers_task(args.model, job["forget_prompts"], job["surrogate_prompt"], job["retain_prompts"],
                                     images_dir=job.get("forget_images"), n_generate=args.n_generate, seed=args.seed,
                                     resolution=args.resolution, device=device, progress=False, pipe=pipe)
        try:
            r = run(model, task, cfg, out_dir=d, resume=resume, progress=False)
        finally:
            unpatch_unet(model)   # the pipeline's UNet or transformer, as loaded, for the next job
        return {"target": task.target, "surrogate": task.surrogate, "method": "spare", "seconds": r["seconds"],
                "steps": r["steps"], "peak_mem_mb": r["peak_mem_mb"], "adapter": r["adapter"],
                "per_rank_batch": r["per_rank_batch"], "config": r["config"]}
    return _run_jobs(args, jobs, do_job, world)


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


def _cmd_warmup(args):
    import torch

    from .warmup import DTYPES, build_model, warmup
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution: expected a positive multiple of 8 (the VAE's factor), got {args.resolution}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size: expected >= 1, got {args.batch_size}")
    if not 1 <= args.rank <= 64:
        raise UsageError(f"--rank: expected 1..64 (the Triton kernels' ranks), got {args.rank}")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers: expected >= 1, got {args.workers}")
    if args.tune and not torch.cuda.is_available():
        raise UsageError("--tune: needs a CUDA device (tuning benchmarks the kernels on it)")
    target = None
    if args.arch is not None:
        if torch.cuda.is_available():
            raise UsageError("--arch: only without a GPU (with one, its own architecture is the target)")
        from triton.backends.compiler import GPUTarget
        target = GPUTarget("cuda", args.arch, 32)
    dtype = DTYPES[args.dtype]
    unet = build_model(args.config, rank=args.rank, mask=args.mask, target_modules=args.targets, dtype=dtype)
    latent = (args.resolution // 8) if args.resolution else unet.config.sample_size
    rep = warmup(unet, batch_size=args.batch_size, height=latent, width=latent, dtype=dtype,
                 backward=not args.no_backward, workers=args.workers, tune=True if args.tune else None,
                 target=target, progress=not args.quiet)
    if args.quiet:
        print(rep.summary())
    if args.json:
        from dataclasses import asdict
        with open(args.json, "w") as f:
            json.dump(asdict(rep), f, indent=1)
    return 1 if rep.failed else 0


def _cmd_info(args):
    from . import backend_info
    print(json.dumps(backend_info(), indent=2))
    return 0


def main(argv=None) -> int:
    from .unlearn.config import METHODS, PRECISIONS
    from .unlearn.diffusers_task import IMAGE_EXTENSIONS

    p = argparse.ArgumentParser(prog="spare-kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="MiniCanvas unlearning end to end on the shipped model")
    d.add_argument("--target", default="style:dots", help="style:NAME or object:NAME (default style:dots)")
    d.add_argument("--surrogate", default=None, help="concept of the same domain to map the target to")
    d.add_argument("--method", default="spare", choices=METHODS)
    d.add_argument("--compare", action="store_true", help="run every method, one table")
    d.add_argument("--model", default="unet", choices=("unet", "dit"),
                   help="the shipped UNet (DDPM), or MiniCanvas-DiT (an SD3 MMDiT trained with rectified flow)")
    _recipe_args(d)
    d.add_argument("--data-free", action="store_true", help="forget images generated by the model (PECKER)")
    d.add_argument("--n-per-prompt", type=int, default=4, help="evaluation images per prompt")
    d.add_argument("--out", default=None, help="directory for the adapter, plots and results.json")
    d.add_argument("--json", default=None, help="write the result keys to this JSON file")
    d.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--jobs", default=None, metavar="FILE",
                   help='many concepts, one adapter each: one JSON line per job, {"target": "style:NAME", '
                        '"surrogate": "NAME", "name": "..."}; under torchrun each rank runs whole jobs; '
                        'needs --out; finished jobs are skipped on a rerun')
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(fn=_cmd_demo)

    u = sub.add_parser("unlearn", help="the SPARE recipe on a local diffusers model directory (Stable Diffusion "
                                       "1.x/2.x, SDXL, SD3/SD3.5, Flux, PixArt-alpha/-Sigma, Sana)")
    u.add_argument("model", help="a local diffusers pipeline directory (model_index.json and its components): a "
                                 "StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, PixArtAlpha, PixArtSigma "
                                 "or Sana pipeline; it says which before loading")
    u.add_argument("--forget-prompt", action="append", help="a prompt naming the concept (repeatable)")
    u.add_argument("--forget-prompts-file")
    u.add_argument("--surrogate-prompt", help="the prompt the forget prompts should behave like")
    u.add_argument("--retain-prompt", action="append", help="a prompt to keep unchanged (repeatable)")
    u.add_argument("--retain-prompts-file")
    u.add_argument("--forget-images", metavar="DIR",
                   help=f"folder of forget images: its {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files, "
                        "any letter case (subfolders are not read)")
    u.add_argument("--data-free", action="store_true", help="generate the forget images with the model")
    u.add_argument("--n-generate", type=int, default=4, help="generated images per prompt (data-free / retain)")
    u.add_argument("--resolution", type=int, default=None,
                   help="image size (default: the pipeline's, its denoiser's sample size x the VAE factor)")
    _recipe_args(u)
    u.add_argument("--out", required=True, help="output directory (adapter.safetensors, run.json)")
    u.add_argument("--resume", action="store_true")
    u.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if torch sees a GPU, else cpu)")
    u.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: forwards under torch.autocast; weights, adapters and optimizer stay fp32")
    u.add_argument("--threads", type=int, default=0)
    u.add_argument("--jobs", default=None, metavar="FILE",
                   help='many concepts, one adapter each: one JSON line per job, {"name", "forget_prompts": [...], '
                        '"surrogate_prompt", "retain_prompts": [...], "forget_images": DIR | "data_free": true}; '
                        'under torchrun each rank runs whole jobs; finished jobs are skipped on a rerun')
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

    w = sub.add_parser("warmup", help="compile (in parallel) and, on a GPU, tune every Triton kernel a patched "
                                      "UNet's training step launches, before the first step")
    w.add_argument("--config", default="sd15", choices=["sd15", "canvas"],
                   help="the UNet: SD-1.5's config, or the shipped MiniCanvas model's (default sd15)")
    w.add_argument("--batch-size", type=int, default=1)
    w.add_argument("--resolution", type=int, default=None, help="image size (default: the UNet's sample size x 8)")
    w.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="activations (default bf16)")
    w.add_argument("--rank", type=int, default=4, help="adapter rank (default 4)")
    w.add_argument("--mask", default="element", choices=["element", "block", "row", "none"],
                   help="mask granularity of every adapted layer (default element; none: dense adapters)")
    w.add_argument("--targets", default="attention", choices=["attention", "all"],
                   help="adapted layers: attention (to_q/k/v/out, SPARE's) or all Linear and Conv2d")
    w.add_argument("--no-backward", action="store_true", help="forward kernels only (inference)")
    w.add_argument("--workers", type=int, default=None, help="compile processes (default: every CPU)")
    w.add_argument("--tune", action="store_true", help="require tuning (default: tune when a GPU is present)")
    w.add_argument("--arch", type=int, default=None,
                   help="without a GPU: the compute capability to compile for (default 90)")
    w.add_argument("--json", default=None, help="also write the report to this JSON file")
    w.add_argument("--quiet", action="store_true", help="the summary only")
    w.set_defaults(fn=_cmd_warmup)
    args = p.parse_args(argv)
    from .distributed import close_group
    try:
        rc = args.fn(args)
        # a rank that finished must not leave its group to interpreter teardown (gloo aborts); a caller's
        # own group (cli.main inside their script) stays theirs
        close_group(own_only=True)
        return rc
    except UsageError as e:
        print(f"spare-kernels {args.cmd}: error{_rank_tag()}: {e}", file=sys.stderr)
        close_group()   # a check only rank 0 makes (its files): the others must not wait for it
        return 2
    except Exception as e:
        tag = _rank_tag()
        if not close_group():
            raise
        # Across ranks: say which rank stopped and why, then close this rank's connections, so the
        # others' next collective fails at once (gloo; under NCCL the launcher or the timeout stops them).
        import traceback
        traceback.print_exc()
        print(f"spare-kernels {args.cmd}: error{tag}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1


def _rank_tag() -> str:
    from .distributed import current_world
    w = current_world()
    return f" (rank {w.rank} of {w.size})" if w.distributed else ""


if __name__ == "__main__":
    sys.exit(main())
