"""Builds the optional native extensions of spare_kernels, each on its own, against the torch installed.

Install: ``pip install --no-build-isolation .`` (torch first; ``-v`` shows the build's messages, pip
hides them otherwise). Without ``--no-build-isolation`` pip builds in a fresh environment without torch:
the build stops with one line saying so (pyproject.toml lists no torch to build with on purpose: the
extensions must match the torch they run with). ``python -m build --no-isolation`` makes the sdist and
the wheel (``make dist``). What was built, skipped or failed, and against which torch, is recorded in
``spare_kernels/_build_info.json``: the backends' load messages and ``python -m spare_kernels.selfcheck``
report it.

- ``spare_kernels._C``      : the CPU kernels, ``csrc/cpu/*.cpp`` (``torch.ops.spare_kernels_cpu``).
- ``spare_kernels._C_cuda`` : the CUDA kernels, ``csrc/cuda/*.cu`` + ``csrc/cuda/*.cpp``
  (``torch.ops.spare_kernels_cuda``). Built when torch is a CUDA build and nvcc is found. A failed
  ``_C_cuda`` build is reported loudly (the error, and that ``_C`` was still built) but does not fail
  the install, unless ``SPARE_KERNELS_BUILD_CUDA=1`` asks for it explicitly.

Build switches (environment variables, all ``SPARE_KERNELS_*``; the tree shows which switch a switch
depends on, defaults first)::

    SPARE_KERNELS_BUILD_EXT=1              0: nothing native (pure-PyTorch reference backend only)
    ├── SPARE_KERNELS_BUILD_CPU=1          0: no spare_kernels._C
    │   └── SPARE_KERNELS_NATIVE=1         0: _C without -march=native (a portable binary)
    └── SPARE_KERNELS_BUILD_CUDA=auto      0: no spare_kernels._C_cuda
        │                                  auto: build it when torch has CUDA and nvcc is found; a
        │                                        failure is reported, the install goes on
        │                                  1: required: no CUDA torch, no nvcc or a failed build is an error
        └── SPARE_KERNELS_CUDA_ARCHS=80;90 compute capabilities, ';' or ',' separated: 80, 86, 89, 90,
                                           90a, ... each becomes -gencode arch=compute_XX,code=sm_XX
    MAX_JOBS=<cores>                       parallel compile jobs (torch's BuildExtension passes it to ninja);
                                           lower it when nvcc runs out of memory (each job ~2-4 GB)

Every way ``_C_cuda`` ends up not built prints one line ``spare_kernels: spare_kernels._C_cuda is not
built: <why>`` (switched off, CPU torch, no nvcc, toolkit that does not fit torch's CUDA, no compiler);
a failed compile prints the compiler's messages and a banner starting with that line.

nvcc is looked up as torch does (``CUDA_HOME`` / ``CUDA_PATH``, else ``nvcc`` on ``PATH``); when the
directory above ``nvcc`` is not a CUDA toolkit (a wrapper script), the toolkit root nvcc reports is used.
Runtime variables (not build switches) are in docs/backends.md: ``SPARE_KERNELS_BACKEND`` and the CPU engine's
tuning variables ``SPARE_KERNELS_QF`` etc.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU_EXT = "spare_kernels._C"
CUDA_EXT = "spare_kernels._C_cuda"
_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


# Commands that compile (anything else, e.g. egg_info, dist_info or sdist, needs only the metadata: no
# torch, so that pip's metadata step and an sdist work anywhere).
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "bdist_egg", "bdist", "editable_wheel", "develop", "install"}
# What this build did to each extension, for spare_kernels/_build_info.json ("built", "skipped: why",
# "failed: why"); an extension a switch leaves alone is not listed (an in-place build keeps its record).
_RECORD = {}


def _say(msg):
    print(f"spare_kernels: {msg}", file=sys.stderr, flush=True)


def _skip(ext, why, record=True):
    """The one line that says ``ext`` is not built, and why."""
    _say(f"{ext} is not built: {why}")
    if record:
        _RECORD[ext.rsplit(".", 1)[-1]] = f"skipped: {why}"


def _import_torch():
    try:
        import torch
    except ImportError:
        raise SystemExit(
            "spare_kernels: torch is not importable in this build environment (pip's build isolation hides the "
            "installed one): install torch first, then `pip install --no-build-isolation .` (or "
            "SPARE_KERNELS_BUILD_EXT=0 for the pure-PyTorch backend only)") from None
    return torch


def _write_build_info(pkg_dir, torch):
    """Merge this build's record into ``pkg_dir/_build_info.json`` (atomically: gpu_check.sh builds _C and
    _C_cuda in place side by side). An older record made with another torch is dropped."""
    import json
    import tempfile
    path = os.path.join(pkg_dir, "_build_info.json")
    info = {}
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        pass
    if not isinstance(info, dict) or info.get("torch") != torch.__version__:
        info = {}
    info.update(torch=torch.__version__, cuda=torch.version.cuda)
    info["extensions"] = {**info.get("extensions", {}), **_RECORD}
    os.makedirs(pkg_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=pkg_dir, prefix="._build_info.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _flag(name, default="1"):
    v = os.environ.get(name, default).strip().lower()
    if v in _FALSE or v == "":
        return False
    if v in _TRUE:
        return True
    raise SystemExit(f"spare_kernels: {name}={os.environ[name]!r}: expected 0 or 1")


def _cuda_mode():
    """'off', 'auto' or 'required' (SPARE_KERNELS_BUILD_CUDA)."""
    v = os.environ.get("SPARE_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if v in ("", "auto"):
        return "auto"
    if v in _FALSE:
        return "off"
    if v in _TRUE:
        return "required"
    raise SystemExit(f"spare_kernels: SPARE_KERNELS_BUILD_CUDA={os.environ['SPARE_KERNELS_BUILD_CUDA']!r}: "
                     "expected 0, 1 or auto")


def cuda_arch_flags(value=None):
    """``SPARE_KERNELS_CUDA_ARCHS`` (default ``80;90``) as nvcc ``-gencode`` flags; a bad value raises
    ValueError naming the variable."""
    if value is None:
        value = os.environ.get("SPARE_KERNELS_CUDA_ARCHS", "80;90")
    archs = [a.strip() for a in re.split(r"[;,]", value) if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"[1-9][0-9]{1,2}a?", a)]
    if bad or not archs:
        raise ValueError(f"SPARE_KERNELS_CUDA_ARCHS={value!r}: expected compute capabilities separated by ';' or "
                         f"',' (each an integer such as 80, 86, 89, 90, optionally with the suffix 'a': 90a)"
                         + (f"; not one: {', '.join(map(repr, bad))}" if bad else ""))
    flags = []
    for a in dict.fromkeys(archs):   # in order, without repeats
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def cxx_std(torch_dir):
    """The oldest C++ standard torch's headers accept (ATen.h checks __cplusplus): c++17 up to torch
    2.13, c++20 from 2.14 on. Oldest, so that the sources keep compiling with both."""
    try:
        with open(os.path.join(torch_dir, "include", "ATen", "ATen.h")) as f:
            return "c++20" if "202002L" in f.read() else "c++17"
    except OSError:
        return "c++17"


def _fix_cuda_home():
    """Point torch at the real toolkit when CUDA_HOME is unset and ``nvcc`` on PATH is a wrapper whose
    parent directory has no CUDA headers (torch would take that directory as CUDA_HOME: no
    cuda_runtime.h, no libcudart to link). Must run before torch.utils.cpp_extension is imported."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    if os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda_runtime.h")):
        return
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.*)$", out.stdout + out.stderr, re.M)
    except (OSError, subprocess.SubprocessError):
        m = None
    if m:
        top = os.path.realpath(m.group(1).strip())
        if os.path.exists(os.path.join(top, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = top
            _say(f"nvcc at {nvcc} is a wrapper: CUDA_HOME={top} (the toolkit nvcc reports)")


def _cuda_banner(what, err, cpu):
    bar = "!" * 100
    _RECORD["_C_cuda"] = f"failed: {what}: {err}"
    cpu = (f"The CPU kernels ({CPU_EXT}) are built regardless" if cpu else
           f"{CPU_EXT} is switched off (SPARE_KERNELS_BUILD_CPU=0)")
    print(f"\n{bar}\nspare_kernels: {CUDA_EXT} is not built: {what}\n"
          f"  error: {err}\n"
          f"  {cpu}; the install goes on without the `cuda` backend.\n"
          f"  SPARE_KERNELS_BUILD_CUDA=1 makes this an error, SPARE_KERNELS_BUILD_CUDA=0 skips _C_cuda.\n{bar}\n",
          file=sys.stderr, flush=True)


def _extensions():
    if not _BUILD_COMMANDS.intersection(sys.argv[1:]):
        return [], {}
    if not _flag("SPARE_KERNELS_BUILD_EXT"):
        _say(f"{CPU_EXT} and {CUDA_EXT} are not built: SPARE_KERNELS_BUILD_EXT=0 (the pure-PyTorch backend only)")
        return [], {}
    build_cpu = _flag("SPARE_KERNELS_BUILD_CPU")
    cuda_mode = _cuda_mode()
    try:   # validated even when no CUDA build follows: a bad value is an error wherever it is set
        arch_flags = cuda_arch_flags() if cuda_mode != "off" else []
    except ValueError as e:
        raise SystemExit(f"spare_kernels: {e}") from None
    cpu_srcs = sorted(glob.glob("csrc/cpu/*.cpp")) if build_cpu else []
    cuda_srcs = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")) if cuda_mode != "off" else []
    if not build_cpu:
        _skip(CPU_EXT, "SPARE_KERNELS_BUILD_CPU=0", record=False)
    if cuda_mode == "off":
        _skip(CUDA_EXT, "SPARE_KERNELS_BUILD_CUDA=0", record=False)
    if not cpu_srcs and not cuda_srcs:
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        if cuda_mode == "required":
            raise SystemExit(f"spare_kernels: SPARE_KERNELS_BUILD_CUDA=1 but no C++ compiler ({cxx}) is found")
        _say(f"{CPU_EXT} and {CUDA_EXT} are not built: no C++ compiler ({cxx}) found")
        return [], {}
    torch = _import_torch()
    if cuda_srcs:
        _fix_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    std = "-std=" + cxx_std(os.path.dirname(torch.__file__))
    include = [os.path.join(ROOT, "csrc")]   # `#include "common/..."` as well as "../common/..."
    exts = []
    if cpu_srcs:
        cxx_flags = ["-O3", std, "-fopenmp"]
        if _flag("SPARE_KERNELS_NATIVE"):
            cxx_flags.append("-march=native")
        exts.append(CppExtension(CPU_EXT, cpu_srcs, include_dirs=include, extra_compile_args={"cxx": cxx_flags},
                                 extra_link_args=["-fopenmp"]))
    if cuda_srcs:
        why = ("torch is not a CUDA build" if torch.version.cuda is None else
               "nvcc not found (set CUDA_HOME or put nvcc on PATH)" if CUDA_HOME is None else None)
        if why is None:
            # No --use_fast_math: the kernels are held to the reference's exact arithmetic.
            exts.append(CUDAExtension(
                CUDA_EXT, cuda_srcs, include_dirs=include,
                extra_compile_args={"cxx": ["-O3", std],
                                    "nvcc": ["-O3", std, "-lineinfo"] + arch_flags}))
        elif cuda_mode == "required":
            raise SystemExit(f"spare_kernels: SPARE_KERNELS_BUILD_CUDA=1 but {why}")
        else:
            _skip(CUDA_EXT, why)
    elif cuda_mode == "required":
        raise SystemExit("spare_kernels: SPARE_KERNELS_BUILD_CUDA=1 but csrc/cuda has no sources")

    class Build(BuildExtension):
        """BuildExtension that builds ``_C`` first and keeps a failure of ``_C_cuda`` from failing the
        install (unless SPARE_KERNELS_BUILD_CUDA=1)."""

        def build_extensions(self):
            self.extensions.sort(key=lambda e: e.name == CUDA_EXT)   # the CPU kernels first
            if cuda_mode == "auto" and any(e.name == CUDA_EXT for e in self.extensions):
                try:   # the compiler / CUDA version check BuildExtension runs before building anything
                    from torch.utils.cpp_extension import _check_cuda_version
                    _check_cuda_version(*self._check_abi())
                except ImportError:
                    pass
                except Exception as e:  # noqa: BLE001  (any failure: report it, build the rest)
                    _skip(CUDA_EXT, f"the CUDA toolkit at {CUDA_HOME} does not fit torch {torch.__version__} "
                          f"(CUDA {torch.version.cuda}): {' '.join(str(e).split())} (SPARE_KERNELS_BUILD_CUDA=1 "
                          "makes this an error)")
                    self.extensions = [x for x in self.extensions if x.name != CUDA_EXT]
            self._failed = []
            super().build_extensions()
            # What failed has no output: drop it, so that neither the in-place copy (editable installs)
            # nor the wheel's file list looks for it.
            self.extensions = [x for x in self.extensions if x.name not in self._failed]
            for x in self.extensions:
                _RECORD[x.name.rsplit(".", 1)[-1]] = "built"

        def run(self):
            super().run()
            _write_build_info(os.path.join(self.build_lib, "spare_kernels"), torch)
            if self.inplace:   # build_ext --inplace, editable installs: the package is the source tree
                _write_build_info(os.path.join(ROOT, "spare_kernels"), torch)

        def build_extension(self, ext):
            if ext.name != CUDA_EXT or cuda_mode == "required":
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self._failed.append(ext.name)
                _cuda_banner("compiling or linking csrc/cuda failed (the compiler's messages are above)", e,
                             bool(cpu_srcs))

    return exts, {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
