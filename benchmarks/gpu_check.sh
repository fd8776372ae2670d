#!/usr/bin/env bash
# The project's GPU check, for a fresh GPU machine with no network (torch with CUDA, triton, nvcc, ninja,
# pytest, peft...; no diffusers: benchmarks/gpu_wheels.sh puts it and what it needs in .whl/, carried
# with the working tree). Run from anywhere; it works in the repository root:
#
#   benchmarks/gpu_check.sh OUTDIR               the check on a GPU (the plan's gpu_s column, <= 8 min)
#   benchmarks/gpu_check.sh --rehearsal OUTDIR   what of it needs no GPU (rehearsal_s; `make gpu-rehearsal`)
#   benchmarks/gpu_check.sh --plan               print the plan and check its budget
#
# One plan for both modes (PLAN below): each step runs in its own process under its own time limit, a
# failed or timed-out step is recorded and the next one still runs, and the gpu_s limits (plus GRACE
# seconds each, the kill's grace) add up to at most BUDGET. Each step writes OUTDIR/<step>.log; at the end
# summary.txt (and summary.json) list every step's status and seconds. The benchmark sections write
# gpu_<section>.json; the report step merges them into gpu_check.json, gpu_table.json (the registry's
# per-shape choice, --write-table) and table.md. Exit status: 0 when every step passed.
#
# PYTHON (default python3) is the interpreter; the package is used in place (PYTHONPATH), not installed.
set -uo pipefail

BUDGET=480   # seconds: the device time a task gets is 15 min, machine start and transfers included
GRACE=1      # timeout's --kill-after: SIGTERM, then SIGKILL one second later

# step            gpu_s  rehearsal_s  what ('-': not run in that mode)
PLAN='
env                  10      30  versions: nvidia-smi, python, torch, triton; the GPU arch
wheels               20     120  .whl/ installed offline (diffusers and what it needs); diffusers imports
import                -      60  spare_kernels, its triton backend, diffusers and peft import; backends per device
build               100      60  _C and _C_cuda (this GPU arch) built in parallel; no _C_cuda fails loudly. Rehearsal: a required CUDA build refuses this CPU torch
selfcheck            30       -  python -m spare_kernels.selfcheck --quick on cuda (and reference): every op against the reference
pytest_cuda          40       -  pytest -m gpu without the triton-parametrised tests (the cuda backend: nothing compiled at run time)
pytest_collect        -     180  pytest -m gpu --collect-only: finds the GPU tests, no collection error
bench_cold           55       -  warmup (or the first call): the Triton JIT compile-and-tune time; then first step vs warm step
pytest_triton        40       -  pytest -m gpu -k triton
aot                   -    1500  the AOT table (registers, spills, shared memory) under this triton for sm_90
predict               -      60  the cost model bounds of the design shapes on an H100
cpu_smoke             -     300  benchmarks.gpu --device cpu --smoke: the design, cold and topk sections run end to end
bench_design         40       -  the four design shapes: every scheme, every backend, measured / bound
bench_saliency       25       -  sample_abs against one bf16-in fp32-out dW GEMM
bench_topk           20       -  exact top-k over 860 M scores against torch.cat + kthvalue
bench_step           40       -  whole SD-1.5 training step: spare, lora, spare-reference
bench_run            30       -  a whole SPARE run (10 steps) against spare-reference
report               10      60  results merged: gpu_check.json, gpu_table.json, table.md
'

PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SELF="$ROOT/benchmarks/gpu_check.sh"

plan_rows() {   # name gpu_s rehearsal_s, one per line
  printf '%s\n' "$PLAN" | awk 'NF >= 3 { print $1, $2, $3 }'
}

check_plan() {   # the gpu_s limits plus their grace within BUDGET; every row well-formed
  plan_rows | awk -v budget="$BUDGET" -v grace="$GRACE" '
    { if ($2 != "-" && $2 !~ /^[0-9]+$/ || $3 != "-" && $3 !~ /^[0-9]+$/) { print "bad plan row: " $0; bad = 1 }
      if ($2 != "-") { sum += $2 + grace; n++ } }
    END { printf "plan: %d GPU steps, limits %d s + %d x %d s grace = %d s of a %d s budget\n", n, sum - n * grace, n, grace, sum, budget
          exit (bad || sum > budget) }'
}

# ------------------------------------------------------------------------------------------- steps
# Each runs in its own bash process (the runner's timeout), in $ROOT, with OUT, MODE, PY and STATE set;
# a step that changes the environment for later steps appends `export` lines to $STATE.

step_env() {
  if [ "$MODE" = gpu ]; then nvidia-smi || echo "nvidia-smi: not found"; fi
  "$PY" - <<'EOF'
import platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
EOF
  "$PY" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(torch|triton|diffusers|peft|transformers|accelerate|huggingface.hub|safetensors|numpy|pytest|hypothesis|ninja|setuptools)=' || true
  command -v nvcc >/dev/null && nvcc --version | tail -2
}

step_wheels() {
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -c "import diffusers" 2>/dev/null; then echo "no .whl/, diffusers already importable"; return 0; fi
    echo "no .whl/ (benchmarks/gpu_wheels.sh makes it; carry it to the GPU machine) and diffusers does not import"
    return 1
  fi
  ls -l .whl/
  # Resolve against what is installed (the wheels supply only what is missing); a system Python that
  # refuses pip (PEP 668) is told to go ahead: the machine is a fresh one for this check.
  if PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --no-index --find-links .whl --no-compile \
       --disable-pip-version-check diffusers; then
    echo "installed with dependency resolution"
  else
    # A version conflict with the image's packages (e.g. an older huggingface-hub than diffusers asks
    # for): the wheels alone, unresolved, into a folder of their own on PYTHONPATH; the import decides.
    echo "!! resolution failed: installing .whl/ with --no-deps into $STATE.site"
    "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check --target "$STATE.site" .whl/*.whl || return 1
    echo "export PYTHONPATH=\"\$PYTHONPATH:$STATE.site\"" >>"$STATE"
    export PYTHONPATH="$PYTHONPATH:$STATE.site"
  fi
  "$PY" -c "import diffusers; from diffusers import UNet2DConditionModel, DDPMScheduler; print('diffusers', diffusers.__version__, diffusers.__file__)" || return 1
  if [ "$MODE" = rehearsal ]; then   # the GPU run's fallback, tried too: the wheels alone on PYTHONPATH
    local t; t=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$t" .whl/*.whl &&
      PYTHONPATH="$t:$PYTHONPATH" "$PY" -c "import diffusers; assert diffusers.__file__.startswith('$t'), diffusers.__file__; from diffusers import UNet2DConditionModel; print('fallback (--no-deps --target) imports', diffusers.__file__)"
    local rc=$?; rm -rf "$t"; return $rc
  fi
}

step_import() {
  "$PY" - <<'EOF'
import json
import diffusers, peft
import spare_kernels as sk
import spare_kernels.backends.triton  # noqa: F401  (the kernel modules load: decorators, tile tables)
from spare_kernels.backends import registry
print("diffusers", diffusers.__version__, "peft", peft.__version__)
print("runnable: cpu", registry.runnable("cpu"), "cuda", registry.runnable("cuda"))
print(json.dumps(sk.backend_info()["unavailable"], indent=1))
EOF
}

_arch() {   # the GPU's compute capability as nvcc wants it (90 for an H100 / H200); 90 without a GPU
  "$PY" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))" 2>/dev/null || echo 90
}

_cuda_ext_check() {   # spare_kernels._C_cuda exists, loads and registered its ops
  "$PY" - <<'EOF'
import glob, sys
import torch
so = glob.glob("spare_kernels/_C_cuda*.so")
try:
    import spare_kernels._C_cuda  # noqa: F401
    ops = [n for n in dir(torch.ops.spare_kernels_cuda) if not n.startswith("_")]
    print("spare_kernels._C_cuda:", so, "ops:", ops)
    sys.exit(0 if ops else 1)
except Exception as e:  # noqa: BLE001
    bar = "!" * 100
    print(f"{bar}\n!! spare_kernels._C_cuda is MISSING or does not load ({type(e).__name__}: {e});\n"
          f"!! files: {so}. The cuda backend cannot run: every cuda result below is void.\n{bar}")
    sys.exit(1)
EOF
}

step_build() {
  local cc; cc=$(_arch)
  if [ "$MODE" = rehearsal ]; then
    # What the GPU run asks of setup.py, on this CPU torch: SPARE_KERNELS_BUILD_CUDA=1 must refuse (no
    # silent build without _C_cuda), and the check after the build must see no _C_cuda.
    local tmp; tmp=$(mktemp -d)
    if SPARE_KERNELS_BUILD_CPU=0 SPARE_KERNELS_BUILD_CUDA=1 SPARE_KERNELS_CUDA_ARCHS="$cc" \
         "$PY" setup.py -q build_ext --build-lib "$tmp/lib" --build-temp "$tmp/tmp" >"$tmp/log" 2>&1; then
      cat "$tmp/log"; echo "!! SPARE_KERNELS_BUILD_CUDA=1 on a CPU torch did not fail"; return 1
    fi
    cat "$tmp/log"; rm -rf "$tmp"
    if _cuda_ext_check; then echo "!! _C_cuda loads on a CPU torch?"; return 1; fi
    echo "rehearsal: the required CUDA build refused this CPU torch and the _C_cuda check failed loudly: as intended"
    return 0
  fi
  echo "building for sm_$cc: _C (csrc/cpu) and _C_cuda (csrc/cuda) in parallel, separate build folders"
  # nvcc on one arch and the host compiler side by side: the build takes the longer of the two, not the sum
  SPARE_KERNELS_BUILD_CPU=1 SPARE_KERNELS_BUILD_CUDA=0 MAX_JOBS=8 \
    "$PY" setup.py build_ext --inplace --build-lib build/gpu-cpu --build-temp build/gpu-cpu/tmp >"$OUT/build_cpu.log" 2>&1 &
  local cpu_pid=$!
  SPARE_KERNELS_BUILD_CPU=0 SPARE_KERNELS_BUILD_CUDA=1 SPARE_KERNELS_CUDA_ARCHS="$cc" MAX_JOBS=16 \
    "$PY" setup.py build_ext --inplace --build-lib build/gpu-cuda --build-temp build/gpu-cuda/tmp >"$OUT/build_cuda.log" 2>&1
  local rc_cuda=$?
  wait "$cpu_pid"; local rc_cpu=$?
  echo "_C build: exit $rc_cpu (build_cpu.log); _C_cuda build: exit $rc_cuda (build_cuda.log)"
  [ $rc_cuda -eq 0 ] || tail -40 "$OUT/build_cuda.log"
  [ $rc_cpu -eq 0 ] || tail -20 "$OUT/build_cpu.log"
  _cuda_ext_check || return 1
  # every backend op defined with a CUDA kernel, the wire format equal to maskfmt.py (make cuda-ext's check)
  "$PY" tools/check_cuda_ext.py build/gpu-cuda || return 1
  [ $rc_cpu -eq 0 ] && [ $rc_cuda -eq 0 ]
}

# cuda (and the reference, the harness's own check) only: triton's JIT stays cold for bench_cold; the
# triton backend's grid runs in pytest_triton (tests/test_gpu.py parametrises it over every backend)
step_selfcheck() { "$PY" -m spare_kernels.selfcheck --quick --backend cuda reference; }

# -m gpu after pyproject's addopts ("-m 'not slow and not interp'"): the last -m is the one pytest takes
_pytest_gpu() { "$PY" -m pytest -q -m gpu -p no:cacheprovider "$@" tests; }

step_pytest_cuda() { _pytest_gpu -k "not triton" --junitxml="$OUT/pytest_cuda.xml"; }

step_pytest_triton() { _pytest_gpu -k triton --junitxml="$OUT/pytest_triton.xml"; }

step_pytest_collect() {
  local log; log=$(mktemp)
  _pytest_gpu --collect-only | tee "$log" | tail -15
  local n; n=$(grep -E -o '^[0-9]+(/[0-9]+)? tests? (selected|collected)' "$log" | head -1 | grep -E -o '^[0-9]+')
  if grep -q -E '^(ERROR|E  )|[0-9]+ errors?( |$)' "$log"; then echo "!! collection errors"; rm -f "$log"; return 1; fi
  rm -f "$log"
  if [ -z "$n" ] || [ "$n" -lt 1 ]; then echo "!! no GPU test collected"; return 1; fi
  echo "collected $n GPU tests"
}

step_aot() {
  local cc; cc=$(_arch)
  "$PY" -m spare_kernels.backends.triton.aot --arch "$cc" --jobs "$(nproc)" --quiet --json "$OUT/aot_sm$cc.json"
}

step_predict() { "$PY" -m benchmarks.gpu --predict --profile h100; }

step_cpu_smoke() {
  "$PY" -m benchmarks.gpu --device cpu --smoke --reps 1 --sections design cold topk --out "$OUT/gpu_cpu_smoke.json"
}

_bench() {   # one section of benchmarks.gpu in its own process, its own result file
  local sec=$1; shift
  "$PY" -m benchmarks.gpu --quick --sections "$sec" --out "$OUT/gpu_$sec.json" "$@"
}

step_bench_cold() { _bench cold; }
step_bench_design() { _bench design; }
step_bench_saliency() { _bench saliency; }
step_bench_topk() { _bench topk; }
step_bench_step() { _bench step --step-targets all; }   # every Linear and Conv2d: the 0.5x target's set
step_bench_run() { _bench run --run-steps 10; }

step_report() {
  local files=()
  for f in "$OUT"/gpu_*.json; do [ -f "$f" ] && files+=("$f"); done
  if [ ${#files[@]} -eq 0 ]; then echo "no benchmark results to merge"; [ "$MODE" = rehearsal ] && return 1; return 0; fi
  local table="$OUT/gpu_table.json"
  [ "$MODE" = rehearsal ] && table="$OUT/gpu_table_cpu_smoke.json"   # a CPU table is no registry input
  "$PY" -m benchmarks.gpu --from "${files[@]}" --out "$OUT/gpu_check.json" --write-table "$table" &&
    "$PY" -m benchmarks.gpu --report "$OUT/gpu_check.json" >"$OUT/table.md" || return 1
  head -60 "$OUT/table.md"   # (not `tee | head`: with pipefail, head's early exit fails the step)
}

# ------------------------------------------------------------------------------------------ runner
run_one() {   # run_one NAME: the step's function (in the child process the runner starts)
  # shellcheck disable=SC1090
  [ -f "$STATE" ] && . "$STATE"
  cd "$ROOT" || exit 1
  "step_$1"
}

main() {
  local mode=gpu out=""
  case "${1:-}" in
    --plan) check_plan; printf '%s\n' "$PLAN"; return $? ;;
    --rehearsal) mode=rehearsal; out=${2:-} ;;
    --run-one) MODE=$2 OUT=$3 STATE=$4; run_one "$5"; return $? ;;
    -h|--help|"") sed -n '2,20p' "$SELF"; return 2 ;;
    *) out=$1 ;;
  esac
  [ -n "$out" ] || { echo "usage: benchmarks/gpu_check.sh [--rehearsal] OUTDIR" >&2; return 2; }
  check_plan || { echo "the plan exceeds its budget: fix PLAN" >&2; return 2; }
  mkdir -p "$out" && out=$(cd "$out" && pwd)
  if [ "$mode" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "no CUDA device seen by $PY (torch's CUDA build and a GPU are needed; --rehearsal runs the rest)" >&2
    return 2
  fi
  local state; state=$(mktemp "${TMPDIR:-/tmp}/spare_gpu_check.XXXXXX")
  export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHON="$PY"
  export TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
  local col=2; [ "$mode" = rehearsal ] && col=3
  : >"$out/summary.txt"
  local status=0 t_all=$SECONDS name limit rc secs verdict json="["
  echo "gpu_check ($mode): $(date -u +%FT%TZ), results in $out" | tee -a "$out/summary.txt"
  while read -r name g r; do
    limit=$g; [ $col -eq 3 ] && limit=$r
    [ "$limit" = - ] && continue
    local t0=$SECONDS
    echo "--- $name (limit $limit s)"
    timeout --kill-after="$GRACE" "$limit" bash "$SELF" --run-one "$mode" "$out" "$state" "$name" >"$out/$name.log" 2>&1
    rc=$?; secs=$((SECONDS - t0))
    case $rc in 0) verdict=ok ;; 124|137) verdict="TIMEOUT" ;; *) verdict="FAIL($rc)" ;; esac
    [ $rc -eq 0 ] || status=1
    printf '%-16s %-9s %4d s  (limit %4d s)  %s.log\n' "$name" "$verdict" "$secs" "$limit" "$name" | tee -a "$out/summary.txt"
    [ $rc -eq 0 ] || tail -8 "$out/$name.log" | sed 's/^/    | /'
    json+="{\"step\": \"$name\", \"status\": \"$verdict\", \"seconds\": $secs, \"limit\": $limit},"
  done < <(plan_rows)
  echo "${json%,}]" >"$out/summary.json"
  rm -f "$state"; rm -rf "$state.site"
  echo "gpu_check ($mode): $((SECONDS - t_all)) s in all; $([ $status -eq 0 ] && echo 'every step passed' || echo 'FAILED steps above')" \
    | tee -a "$out/summary.txt"
  return $status
}

main "$@"
