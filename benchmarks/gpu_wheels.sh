#!/usr/bin/env bash
# Assembles .whl/ (git-ignored): diffusers and exactly what it needs that the lent GPU machines lack, as
# CPython 3.12 manylinux x86-64 wheels, for benchmarks/gpu_check.sh to install offline there (those
# machines reach no network). Then checks that the set is closed (every requirement of every wheel, for
# Python 3.12 on Linux x86-64, is either on the GPU image or in .whl/) and that .whl/ and the working
# tree that travels with it stay within their budgets.
#
#   benchmarks/gpu_wheels.sh          (PYTHON: the interpreter whose pip downloads; default .venv/bin/python)
#
# The device tool carries the tracked and untracked-not-ignored files plus the paths named in `carry`
# (64 MiB in all): pass carry [".whl"] to it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

# What the GPU image holds (DESIGN §4: Python 3.12.3, torch 2.11.0+cu130, triton 3.6.0, ...), as pip
# names. filelock is not on the image's list but comes with torch (a dependency of every torch release).
GPU_HAS="torch triton safetensors pytest pytest-benchmark hypothesis peft accelerate transformers numpy pillow
requests regex huggingface-hub filelock"
# diffusers as pyproject.toml pins it, and the part of its requirements the image lacks: importlib_metadata
# (declared; diffusers imports it only on Python < 3.8, but pip's resolver asks for it), which needs zipp
# and, below Python 3.15, lazy-importer.
WANT="diffusers==0.42.1 importlib_metadata zipp lazy-importer"
WHEELS_BUDGET_MB=32   # .whl/ alone (today ~6.2 MB: diffusers is 6.1 of it)
TREE_BUDGET_MB=56     # tree + .whl/, of the 64 MiB carried: 8 MiB left for what a session adds

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64 \
  --dest "$tmp" $WANT 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
n=$(ls "$tmp"/*.whl 2>/dev/null | wc -l)
[ "$n" -eq "$(echo $WANT | wc -w)" ] || { echo "gpu_wheels: expected $(echo $WANT | wc -w) wheels, got $n" >&2; exit 1; }
rm -rf .whl && mkdir .whl && mv "$tmp"/*.whl .whl/

# Closed: every requirement (no extras; markers for CPython 3.12 on Linux x86-64) on the image or here.
GPU_HAS="$GPU_HAS" "$PY" - <<'EOF'
import glob, os, re, sys, zipfile
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
have = {canonicalize_name(n) for n in os.environ["GPU_HAS"].split()}
wheels = sorted(glob.glob(".whl/*.whl"))
here = {canonicalize_name(os.path.basename(w).split("-")[0]) for w in wheels}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
    need = []
    for r in map(Requirement, reqs):
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        name = canonicalize_name(r.name)
        need.append(name + (" (image)" if name in have else " (.whl)" if name in here else " MISSING"))
        if name not in have and name not in here:
            missing.append(f"{os.path.basename(w)} needs {r}")
    print(f"{os.path.basename(w)}: {os.path.getsize(w) / 2**20:.2f} MiB; needs {', '.join(need) or 'nothing'}")
if missing:
    sys.exit("gpu_wheels: not closed:\n  " + "\n  ".join(missing))
print(f"closed: {len(wheels)} wheels, every requirement on the GPU image or in .whl/")
EOF

whl_bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((whl_bytes + tree_bytes))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo ".whl/: $(mib "$whl_bytes") (budget $WHEELS_BUDGET_MB MiB); working tree that travels: $(mib "$tree_bytes");" \
     "tree + .whl/: $(mib "$total") (budget $TREE_BUDGET_MB of the 64 MiB carried)"
[ "$whl_bytes" -le $((WHEELS_BUDGET_MB << 20)) ] || { echo "gpu_wheels: .whl/ over its budget" >&2; exit 1; }
[ "$total" -le $((TREE_BUDGET_MB << 20)) ] || { echo "gpu_wheels: tree + .whl/ over the budget" >&2; exit 1; }
