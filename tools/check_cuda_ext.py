"""Checks a built spare_kernels._C_cuda without a GPU (``make cuda-ext``): it loads in the CUDA build of
torch, and ``torch.ops.spare_kernels_cuda`` defines every backend op of
``spare_kernels.backends.registry.OPS`` with a CUDA kernel, plus ``wire_format()`` equal to
``spare_kernels/maskfmt.py``. Prints every op of the library with its schema and dispatch keys.

Usage: python tools/check_cuda_ext.py [BUILD_DIR]   (default build/cuda-ext: where setup.py build_ext
--build-lib put spare_kernels/_C_cuda*.so). Exit status 0 when everything is there.

The package itself is not imported (its dependencies need not be in the CUDA venv): ``spare_kernels``
is a stub package over BUILD_DIR/spare_kernels, so ``import spare_kernels._C_cuda`` is the real import
of the built module; OPS and the mask constants are read from registry.py and maskfmt.py, which
import only torch.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS = "spare_kernels_cuda"


def _load_file(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod   # dataclasses looks its module up there
    spec.loader.exec_module(mod)
    return mod


def main(argv):
    build = os.path.abspath(argv[1] if len(argv) > 1 else os.path.join(ROOT, "build", "cuda-ext"))
    pkg_dir = os.path.join(build, "spare_kernels")
    sos = glob.glob(os.path.join(pkg_dir, "_C_cuda*.so"))
    if not sos:
        print(f"FAIL: no spare_kernels/_C_cuda*.so under {build} (did the build fail? see above)")
        return 1
    import torch
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU present: {torch.cuda.is_available()}")
    if torch.version.cuda is None:
        print("FAIL: this torch is not a CUDA build")
        return 1
    stub = types.ModuleType("spare_kernels")
    stub.__path__ = [pkg_dir]
    sys.modules["spare_kernels"] = stub
    t0 = time.perf_counter()
    mod = importlib.import_module("spare_kernels._C_cuda")
    print(f"import spare_kernels._C_cuda: ok in {time.perf_counter() - t0:.2f} s ({mod.__file__}, "
          f"{os.path.getsize(mod.__file__) / 2**20:.1f} MiB)")

    ops = _load_file("_spare_registry", os.path.join(ROOT, "spare_kernels", "backends", "registry.py")).OPS
    fmt = _load_file("_spare_maskfmt", os.path.join(ROOT, "spare_kernels", "maskfmt.py"))
    schemas = {str(s.name): s for s in torch._C._jit_get_all_schemas() if str(s.name).startswith(NS + "::")}
    failures = []
    print(f"\ntorch.ops.{NS}: {len(schemas)} ops")
    for name in sorted(schemas):
        keys = [k for k in ("CUDA", "CPU", "Meta", "CompositeImplicitAutograd", "CompositeExplicitAutograd")
                if torch._C._dispatch_has_kernel_for_dispatch_key(name, k)]
        print(f"  {name.split('::')[1]:32s} [{', '.join(keys) or 'no kernel'}]  {schemas[name]}")
    for op in ops:
        q = f"{NS}::{op}"
        if q not in schemas or not hasattr(torch.ops.spare_kernels_cuda, op):
            failures.append(f"{op}: not defined")
        elif not torch._C._dispatch_has_kernel_for_dispatch_key(q, "CUDA"):
            failures.append(f"{op}: defined, but no CUDA kernel registered")
    if f"{NS}::wire_format" not in schemas:
        failures.append("wire_format: not defined")
    else:
        got = list(torch.ops.spare_kernels_cuda.wire_format())
        want = [fmt.NONE, fmt.ELEMENT, fmt.BLOCK, fmt.ROW, fmt.BITS_PER_BYTE, int(fmt.LSB_FIRST)]
        print(f"\nwire_format() = {got}; spare_kernels/maskfmt.py: {want}")
        if got != want:
            failures.append(f"wire_format() {got} != maskfmt.py {want}")
    if failures:
        print("\nFAIL:\n  " + "\n  ".join(failures))
        return 1
    print(f"\nOK: all {len(ops)} backend ops (with CUDA kernels) and wire_format are in torch.ops.{NS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
