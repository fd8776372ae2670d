"""Ahead-of-time compile every Triton kernel of this backend, in every specialisation its launchers use,
for the given GPU architectures; no GPU or driver needed.

    python -m spare_kernels.backends.triton.aot --arch 80 90 [--jobs N] [--only SUBSTR ...]

Each kernel module in :data:`MODULES` declares its specialisations as data (``aot_specs()`` returning
``utils.Spec``\\ s: the kernel, its signature, constexprs and launch options). Each is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``; its PTX
is then run through ``ptxas -v`` for that architecture (``sm_80``, ``sm_90a``: without a driver the
compiled kernel carries no register count) for registers and spills; shared memory is the compiled
kernel's own figure (Triton's dynamic shared memory). Prints one row per (kernel, specialisation, arch)
and a summary; exits 1 on any compile error, any spill, or shared memory above the architecture's
per-block limit.

Pointer arguments are compiled as 16-byte aligned, and ``IN`` / ``OUT`` / ``mask_stride`` as multiples of
16: what the JIT specialises to for every linear layer of an SD UNet (odd shapes get a generic variant
at run time). Uses only API present in Triton 3.6 (``ASTSource``, ``GPUTarget``, ``triton.compile``).
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# The kernel modules that declare ``aot_specs()``.
MODULES = (
    "spare_kernels.backends.triton.linear",
    "spare_kernels.backends.triton.saliency",
    "spare_kernels.backends.triton.conv",
)

# Integer arguments compiled as multiples of 16 (see the module docstring).
ALIGNED_INTS = ("IN", "OUT", "mask_stride")

# Per-block shared memory limits (bytes): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def collect(only=()):
    """Every module's specialisations (those whose ``kernel label`` contains all of ``only``)."""
    from . import utils as U
    if U.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET is set: the kernels were decorated as interpreted functions and "
                           "cannot be compiled; run the AOT step without it")
    specs = []
    for name in MODULES:
        specs.extend(importlib.import_module(name).aot_specs())
    return [s for s in specs if all(w in f"{s.name} {s.label}" for w in only)]


def find_ptxas(explicit=None):
    for cand in (explicit, os.environ.get("TRITON_PTXAS_PATH"), shutil.which("ptxas"), "/usr/local/bin/ptxas"):
        if cand and os.path.isfile(cand):
            return cand
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if os.path.isfile(bundled):
        return bundled
    raise FileNotFoundError("ptxas not found (pass --ptxas or set TRITON_PTXAS_PATH)")


def _attrs(spec):
    return {(i,): [["tt.divisibility", 16]] for i, (n, ty) in enumerate(spec.signature.items())
            if ty.startswith("*") or n in ALIGNED_INTS}


def compile_one(spec, arch, ptxas):
    """``dict(kernel, spec, arch, regs, spills, smem, seconds, error)`` for one specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = dict(kernel=spec.name, spec=spec.label, arch=arch, regs=None, spills=None, smem=None, error=None)
    t0 = time.perf_counter()
    try:
        src = ASTSource(spec.fn, spec.signature, spec.constexprs, _attrs(spec))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
        row["smem"] = int(k.metadata.shared)
        sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.ptx")
            with open(path, "w") as f:
                f.write(k.asm["ptx"])
            out = subprocess.run([ptxas, "-v", f"-arch={sm}", path, "-o", os.path.join(d, "k.cubin")],
                                 capture_output=True, text=True)
        log = out.stdout + out.stderr
        if out.returncode != 0:
            raise RuntimeError(f"ptxas failed: {log.strip()[-2000:]}")
        regs = re.search(r"Used (\d+) registers", log)
        spill_st = re.search(r"(\d+) bytes spill stores", log)
        spill_ld = re.search(r"(\d+) bytes spill loads", log)
        if not regs or not spill_st or not spill_ld:
            raise RuntimeError(f"could not parse ptxas -v output: {log.strip()[-2000:]}")
        row["regs"] = int(regs.group(1))
        row["spills"] = int(spill_st.group(1)) + int(spill_ld.group(1))
    except Exception as e:  # noqa: BLE001 - every failure is reported in the table
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    row["seconds"] = time.perf_counter() - t0
    return row


# Worker side of the pool (fork: the specs are inherited, no pickling of kernels).
_WORK = None


def _run(i_arch):
    i, arch = i_arch
    specs, ptxas = _WORK
    return compile_one(specs[i], arch, ptxas)


def problems(row):
    """Why a row fails the check ('' when it passes)."""
    if row["error"]:
        return row["error"]
    if row["spills"]:
        return f"spills {row['spills']} B"
    lim = SMEM_LIMIT.get(row["arch"])
    if lim is not None and row["smem"] > lim:
        return f"shared memory {row['smem']} B > {lim} B"
    return ""


def run(archs, only=(), jobs=1, ptxas=None, out=sys.stdout, verbose=True):
    """Compile everything; returns ``(rows, seconds)``. Rows come back in spec order."""
    global _WORK
    specs = collect(only)
    ptxas = find_ptxas(ptxas)
    work = [(i, a) for i in range(len(specs)) for a in archs]
    _WORK = (specs, ptxas)
    t0 = time.perf_counter()
    if jobs > 1:
        with mp.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_run, work, chunksize=1)
    else:
        rows = [_run(w) for w in work]
    took = time.perf_counter() - t0
    if verbose:
        w = max([len(r["spec"]) for r in rows] + [14])
        print(f"{'kernel':<24} {'specialisation':<{w}} {'arch':>4} {'regs':>4} {'spills':>6} {'smem':>7} "
              f"{'s':>5}  status", file=out)
        for r in rows:
            p = problems(r)
            print(f"{r['kernel']:<24} {r['spec']:<{w}} {'sm_%d' % r['arch']:>4} {r['regs'] or '-':>4} "
                  f"{'-' if r['spills'] is None else r['spills']:>6} {r['smem'] if r['smem'] is not None else '-':>7} "
                  f"{r['seconds']:5.1f}  {p or 'ok'}", file=out)
    return rows, took


def summary(rows, took, jobs):
    kernels = sorted({r["kernel"] for r in rows})
    archs = sorted({r["arch"] for r in rows})
    per = {k: len({r["spec"] for r in rows if r["kernel"] == k}) for k in kernels}
    ok = [r for r in rows if not r["error"]]
    bad = [r for r in rows if problems(r)]
    lines = [f"AOT: {len(kernels)} kernels, {sum(per.values())} specialisations "
             f"({', '.join(f'{k} {n}' for k, n in per.items())}) x {len(archs)} archs "
             f"({', '.join('sm_%d' % a for a in archs)}) = {len(rows)} compiles in {took:.0f} s wall "
             f"({sum(r['seconds'] for r in rows):.0f} s of work, {jobs} jobs)"]
    if ok:
        top = max(ok, key=lambda r: r["regs"])
        lines.append(f"max registers {top['regs']} ({top['kernel']} {top['spec']} sm_{top['arch']}); "
                     f"total spill bytes {sum(r['spills'] for r in ok)}; "
                     f"max shared memory {max(r['smem'] for r in ok)} B")
    lines.append(f"{len(bad)} failing" + (":" if bad else ""))
    for r in bad:
        lines.append(f"  {r['kernel']} {r['spec']} sm_{r['arch']}: {problems(r)}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m spare_kernels.backends.triton.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default: 80 90)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all CPUs)")
    ap.add_argument("--only", nargs="*", default=(), help="compile only specs whose 'kernel label' contains all")
    ap.add_argument("--ptxas", default=None, help="ptxas binary (default: TRITON_PTXAS_PATH, PATH, triton's own)")
    ap.add_argument("--quiet", action="store_true", help="print the summary only")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    a = ap.parse_args(argv)
    rows, took = run(a.arch, a.only, max(1, a.jobs), a.ptxas, verbose=not a.quiet)
    if not rows:
        print("AOT: no specialisation matched", file=sys.stderr)
        return 1
    print(summary(rows, took, a.jobs))
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any(problems(r) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
