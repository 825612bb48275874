#!/usr/bin/env bash
# One short GPU run that proves the GPU path: correctness on CUDA, then the fused op, the tree's
# attention and whole steps against TRL, in ONE device call (at most 9 minutes: give the run timeout_s 590).
#
#   bash benchmarks/gpu_suite.sh prepare     # here, once per checkout: wheels -> .whl/, model -> .gpu_model/
#   SDFT_SUITE_REV=<commit> bash benchmarks/gpu_suite.sh   # there: the device tool's run, carry [".whl", ".gpu_model"]
#   SDFT_SUITE_DRY=1 OUT=/tmp/suite bash benchmarks/gpu_suite.sh    # here: the same plumbing, tiny sizes, CPU
#
# The device machine has its own torch and Triton (KINDS.md); sdft's pure-Python peers travel as wheels
# pinned to this checkout's versions, installed under /tmp/site. SmolLM2-135M's weights (540 MB) cannot
# travel: its config and tokenizer do, and the weights are drawn there with seed 0
# (benchmarks/random_model.py). Sections run in order, each under its own time limit, and each leaves
# its results in $OUT at once, so a run cut short still returns what it finished:
#   $OUT/suite.log       everything printed
#   $OUT/summary.md      each section's table, in order
#   $OUT/results.tgz     the result files (.json + .md) for benchmarks/results/
# The GPU's settings are never touched (no clocks, no reset).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
        transformers==5.24.0 accelerate==1.16.0 peft==0.21.2)

if [ "${1:-}" = prepare ]; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}" || exit 1
  python benchmarks/random_model.py pack .gpu_model || exit 1
  du -sh .whl .gpu_model
  exit 0
fi

DRY=${SDFT_SUITE_DRY:-}
: "${OUT:?set OUT to the folder results go to}"
mkdir -p "$OUT"
RES=$(mktemp -d)/results   # result files, tarred into $OUT after each section
mkdir -p "$RES"
LOG="$OUT/suite.log"
SUMMARY="$OUT/summary.md"
: >"$LOG"
REV=${SDFT_SUITE_REV:-$(git rev-parse --short HEAD 2>/dev/null || echo '?')}  # the device's copy has no .git
echo "# GPU suite $(date -u +%FT%TZ) at $REV${DRY:+ (dry run on CPU)}" >"$SUMMARY"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${SDFT_SUITE_PYTHON:-python3}

say() { echo "$*" | tee -a "$LOG"; }
pack() { tar -czf "$OUT/results.tgz" -C "$(dirname "$RES")" results; }
# section NAME SECONDS CMD...: runs CMD under a limit, logs it, appends its result tables to the summary
section() {
  local name=$1 limit=$2; shift 2
  [ -n "$DRY" ] && limit=$((limit * 3))  # the dry run's CPU is far slower than the GPU the limits are for
  local t0=$SECONDS
  say "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "=== $name: rc $rc in $((SECONDS - t0))s"
  { echo; echo "## $name: rc $rc, $((SECONDS - t0)) s"; echo; } >>"$SUMMARY"
  pack
}
tables() { for f in "$@"; do [ -f "$f" ] && { cat "$f"; echo; } >>"$SUMMARY"; done; pack; }

# --- set-up: the wheels, the model --------------------------------------------------------------
if [ ! -f .gpu_model/config.json ]; then  # fail in seconds, not after every section failed on it
  say "no .gpu_model/ here: run 'bash benchmarks/gpu_suite.sh prepare' first, and carry .whl and .gpu_model"
  exit 1
fi
if [ -d .whl ]; then
  for whl in .whl/*.whl; do   # one at a time: a wheel this Python cannot take costs only itself
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$whl" \
      >>"$LOG" 2>&1 || say "wheel $whl: not installed"
  done
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  # a carried package that does not import against the machine's own packages is dropped for the machine's
  for mod in transformers accelerate peft datasets trl liger_kernel; do
    if ! $PY -c "import $mod" >>"$LOG" 2>&1; then
      say "carried $mod does not import here: using the machine's own"
      rm -rf /tmp/site/"$mod" /tmp/site/"$mod"-*.dist-info
    fi
  done
fi
MODEL=/tmp/sdft-random-smollm2
$PY benchmarks/random_model.py init .gpu_model "$MODEL" >>"$LOG" 2>&1 || say "random model: failed"
export SDFT_BENCH_MODEL=$MODEL
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 || true
  $PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for m in ("triton", "transformers", "accelerate", "peft", "trl", "datasets", "liger_kernel"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), mod.__file__)
    except Exception as err:
        print(m, "MISSING", type(err).__name__, str(err)[:200])
EOF
} 2>&1 | tee -a "$LOG" | sed 's/^/    /' >>"$SUMMARY"

# --- sizes: the real ones on the GPU, tiny ones for the dry run ---------------------------------
if [ -n "$DRY" ]; then
  TESTS=(tests/kernels/test_gpu_divergence.py tests/runtime/test_mixed_precision.py
         tests/prefix/test_tree_attention.py tests/runtime/test_inference_placement.py -k "cuda or bf16 or gpu")
  PYTEST_FLAGS=()
  DIV=(--n 64 --reps 1 --impls sdft naive gemm_floor)
  DIV_SHAPES=(smollm2)
  SWEEP=(--completions 4 --layers 1 --reps 1)
  STEP=(--sides sdft trl --steps 2)
  STEP_SETTINGS=(short_g4)
  STEP32=(--settings short_g4 --sides sdft --steps 2)
  ROWS=(--prompts 4 --groups 2 --steps 8 --reps 1)
else
  TESTS=(tests/kernels tests/prefix/test_tree_attention.py tests/runtime/test_mixed_precision.py
         tests/runtime/test_inference_placement.py)
  # the CPU's compile checks for other GPUs stay on the CPU: minutes of ptxas, nothing the GPU proves
  PYTEST_FLAGS=(-m "not compiles_for_gpus")
  # pytest-xdist: the Triton compiles run on 12 CPU cores at once; pytest-timeout: no test hangs the run
  $PY -c "import xdist" 2>/dev/null && PYTEST_FLAGS+=(-n 12)
  $PY -c "import pytest_timeout" 2>/dev/null && PYTEST_FLAGS+=(--timeout 150)
  DIV=(--n 4096 16384 --reps 10)
  DIV_SHAPES=(smollm2 qwen)
  SWEEP=(--completions 8 24 56 120 248 504 --reps 5)
  STEP=(--sides trl sdft --steps 4)
  STEP_SETTINGS=(short_g8 long_g8)
  STEP32=(--settings long_g8 --sides sdft --steps 4)
  ROWS=(--prompts 16 --groups 8 --steps 256 --reps 1)
fi

# --- 1. correctness on the device: kernels vs float64, flex vs dense (values, gradients), bf16 runs --
section "tests on the device" 130 $PY -m pytest -q -p no:cacheprovider "${PYTEST_FLAGS[@]}" "${TESTS[@]}"
grep -E "passed|failed|error" "$LOG" | tail -3 | sed 's/^/    /' >>"$SUMMARY"; pack

# --- 2. the fused op: sdft vs naive, TRL's loss helpers, liger, and the four GEMMs alone ----------
for shape in "${DIV_SHAPES[@]}"; do  # a file per head shape: one cut short loses only itself
  section "fused divergence, $shape head" $([ "$shape" = qwen ] && echo 60 || echo 45) $PY benchmarks/bench_divergence.py \
    --shapes "$shape" "${DIV[@]}" --out "$RES" --stem "divergence_suite_$shape"
  tables "$RES/divergence_suite_$shape.md"
done

# --- 3. the tree's attention by packed width: where the block mask starts to pay (FLEX_MIN_NODES) --
# (the table is rewritten after every width)
section "tree attention sweep" 90 $PY benchmarks/bench_tree_attention.py --sweep "${SWEEP[@]}" --out "$RES" \
  --stem tree_attention_sweep_suite
tables "$RES/tree_attention_sweep_suite.md"

# --- 4. whole steps against TRL at bf16 (TRL's default), and our step at fp32 for the record --------
for setting in "${STEP_SETTINGS[@]}"; do
  section "whole step vs TRL, $setting (bf16)" 60 $PY benchmarks/bench_trl.py --settings "$setting" "${STEP[@]}" \
    --precision bf16 --out "$RES" --stem "trl_step_suite_bf16_$setting"
  tables "$RES/trl_step_suite_bf16_$setting.md"
done
section "our step at fp32" 40 $PY benchmarks/bench_trl.py "${STEP32[@]}" --precision no --out "$RES" \
  --stem trl_step_suite_fp32
tables "$RES/trl_step_suite_fp32.md"

# --- 5. rollouts over prompt rows packed for the prefill alone vs for the decoding too (last: the least
# needed; the CPU measured 1.22x / 1.48x at G=1 / 4)
section "rollout rows" 50 $PY benchmarks/bench_rollout_rows.py "${ROWS[@]}" --out "$RES" --stem rollout_rows_suite
tables "$RES/rollout_rows_suite.md"

# --- 6. tile shapes on this GPU: the H100's measured shapes beside the two that spill less on sm_90
# (benchmarks/results/kernel_resources_triton39.md); GPU only, last: the least needed
if [ -z "$DRY" ]; then
  section "tile shapes, qwen head" 60 bash -c "set -o pipefail; $PY benchmarks/tune_tiles.py --shapes qwen --candidates 0 2 8 9 \
    | tee '$RES/tune_tiles_suite.log'"
  tables "$RES/tune_tiles_suite.log"
fi

say "suite done in ${SECONDS}s"
