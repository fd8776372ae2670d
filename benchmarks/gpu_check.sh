#!/usr/bin/env bash
# The project's GPU check, for a fresh GPU machine (torch with CUDA, triton, nvcc, pytest; no network;
# diffusers and peft may be missing: wheels in .whl/ at the repository root are installed first).
#   benchmarks/gpu_check.sh OUTDIR
# Builds the package in place, then: the AOT register/spill table for this GPU's arch, the self-check
# (every op on every backend against the reference), the GPU tests (pytest -m gpu) and the quick GPU
# benchmark. Writes env.txt, build.log, aot.txt, selfcheck.txt, pytest_gpu.txt, bench.txt,
# gpu_quick.json, gpu_table.json (the per-shape backend choice it measured) and table.md to OUTDIR. Each step has its own time limit so the whole script ends
# within 8 minutes; a failing step is recorded and the next one still runs.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() {   # step NAME SECONDS LOGFILE COMMAND...
  local name=$1 secs=$2 log=$3; shift 3
  local t0=$SECONDS
  timeout "$secs" "$@" >"$out/$log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (log $log)" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}
{ nvidia-smi; "$py" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$out/env.txt" 2>&1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/spare_site .whl/*.whl >>"$out/env.txt" 2>&1
  export PYTHONPATH="$PYTHONPATH:/tmp/spare_site"
fi
cc=$("$py" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || echo 90)
# Both native extensions, built in place against this torch: _C (CPU) and _C_cuda (the cuda backend,
# for this GPU's arch only: one nvcc pass per file instead of two).
step build 120 build.log env SPARE_KERNELS_BUILD_CUDA=1 SPARE_KERNELS_CUDA_ARCHS="$cc" MAX_JOBS=16 "$py" setup.py build_ext --inplace
# Registers and spills of every Triton specialisation under this machine's triton, for its own arch
# (CI compiles with triton 3.8; the two versions allocate registers differently).
step aot 45 aot.txt "$py" -m spare_kernels.backends.triton.aot --arch "$cc" --jobs 16
step selfcheck 100 selfcheck.txt "$py" -m spare_kernels.selfcheck
step pytest_gpu 90 pytest_gpu.txt "$py" -m pytest -q -m gpu -p no:cacheprovider tests
# step and run need diffusers (and the lora anchor peft): only when they import
sections="layers saliency topk"
"$py" -c "import diffusers, peft" 2>/dev/null && sections="$sections step run"
step bench 125 bench.txt "$py" -m benchmarks.gpu --quick --sections $sections --out "$out/gpu_quick.json" \
  --write-table "$out/gpu_table.json"
[ -f "$out/gpu_quick.json" ] && "$py" -m benchmarks.gpu --report "$out/gpu_quick.json" >"$out/table.md" 2>&1
exit $status
