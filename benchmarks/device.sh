#!/usr/bin/env bash
# The prepared GPU check of the profiling harness, sized for one call of a short lease of one H100/H200
# (benchmarks/README.md, "On a lent GPU"). Two halves:
#
#   bash benchmarks/device.sh wheels        # HERE (with pip access): the pure-Python wheels the GPU image lacks
#                                           # (diffusers, importlib_metadata, peft as tested, setuptools >= 77 and
#                                           # wheel for the editable install), into .whl/ (git-ignored; carry it)
#   bash benchmarks/device.sh run [PLAN]    # THERE (GPU machine, repo root): install, measure into $OUT
#
# PLAN core (the default; ONE call: give it timeout_s ~590, it ends its own work by TOTAL_S=560 s):
#   install (carried wheels into $SITE, editable install without the CUDA extension: no build in this call)
#   1 smoke       python -m benchmarks.smoke: attention backend fwd+bwd (a failing one falls back along the
#                 priority list), NaN check of the LoRA gradients, CUDA-graph capture of a rollout step
#                 (torch.cuda.graph, under set_sync_debug_mode("error")), compiled block fwd+bwd; each independent
#   2 fast_eager  the SD3.5-M-shaped phases the preset runs, fast path with eager blocks (`fast -compile_blocks`:
#                 bf16, shared batch, best attention, fused ops, CUDA graphs; no compile wait)
#   3 baseline    the same phases of the official code path (benchmarks/_official.py)
#   4 fast        the same phases of the fast path, compiled (the cold compile, up to ~250 s, is in this stage)
#   5 kernels     fused loss and SDE step at the >= 64 MB shapes (torch, torch.compile, Triton)
#   6 shared      the training phase of `fast -shared_batch` (the fast row of stage 4 is its other half)
# Stages 2 and 3 measure the fast path against the baseline within ~6 minutes whatever the compile costs; every
# phase's row is saved as soon as it is measured, so a stage cut at its limit keeps the phases it finished. The
# model FLOPs are counted once per call on the meta device (the first harness stage writes $RUN/<model>.flops,
# the later ones read it).
# PLAN rest (a second lease): every other `fast -X` row, FLUX.1-dev-shaped fast/baseline, the 1 GB kernel sweep.
#
# Every stage runs under its own time limit (min(its cap, what is left of TOTAL_S)); a stage that fails or times out
# is logged and the next one starts. The harness runs write into $RUN (outside $OUT); after every stage, and every
# 20 s in the background, they are packed into $OUT/step_time_PLAN.tgz, so $OUT holds at most 4 files (this log,
# smoke.json, the archive, a partial archive being written) and a call cut short still returns every stage done.
# Back here: mkdir -p gpu && tar -xzf step_time_core.tgz -C gpu && python benchmarks/step_time.py --merge gpu/*.json
#
# Dry run on a machine without a GPU (every stage but the measurements themselves): DRY_RUN=1 runs the harness
# stages with `--device cpu --tiny --compile` (the fast stage compiles its blocks with inductor on the CPU; kernels
# without the 64 MB filter) and the smoke test on the CPU with `--compile-backend inductor` (CUDA-only checks report
# "skipped"); PY=/path/to/python picks the interpreter (default python3; tests/benchmarks/test_device_sh.py
# passes a stub that only records its calls), SITE the wheels' target folder, TOTAL_S the call's length, SCALE a
# factor on every stage cap and on TOTAL_S (inductor's cold CPU compile on a loaded 2-core machine: SCALE=4).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0 peft==0.21.2 setuptools==80.9.0 wheel==0.45.1)

case "${1:-}" in
wheels)
    mkdir -p .whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    ls -la .whl
    exit 0 ;;
run) ;;
*) echo "usage: bash benchmarks/device.sh wheels | run [core|rest]" >&2; exit 2 ;;
esac

PLAN=${2:-core}
case "$PLAN" in core|rest) ;; *) echo "device.sh: unknown plan $PLAN (core | rest)" >&2; exit 2 ;; esac
OUT=${OUT:-benchmarks/results/_device}
SCALE=${SCALE:-1}             # every stage cap and the call's length x SCALE (a dry run on a slow or loaded CPU)
TOTAL_S=${TOTAL_S:-$(( 560 * SCALE ))}  # the whole call, install included; the tool's timeout_s ~30 s above it
PACK_RESERVE_S=${PACK_RESERVE_S:-10}   # kept at the end for the last packing
MIN_STAGE_S=${MIN_STAGE_S:-20}         # a stage with less time left than this does not start
SITE=${SITE:-/tmp/site}
WHEEL_DIR=${WHEEL_DIR:-.whl}  # the carried wheels
RUN=${RUN:-/tmp/awm_fast_step_time_$PLAN}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
rm -rf "$RUN" && mkdir -p "$RUN"
LOG="$OUT/device_$PLAN.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if [ "$DRY_RUN" = 1 ]; then
    DEV="--device cpu --tiny --compile"; SMOKE_DEV="--device cpu --compile-backend inductor"; MIN_MB=0
    echo "device.sh: DRY RUN (CPU stand-ins for the GPU stages: nothing here is a GPU measurement)"
else
    DEV=""; SMOKE_DEV=""; MIN_MB=64
fi
export PY OUT RUN SITE PLAN DEV WHEEL_DIR

pack() {  # every harness file so far into one archive, replaced atomically
    local part="$OUT/step_time_$PLAN.part$BASHPID.tgz"
    tar -czf "$part" -C "$RUN" . 2>/dev/null && mv -f "$part" "$OUT/step_time_$PLAN.tgz" || rm -f "$part"
}
stage() {  # stage NAME CAP_S COMMAND...: run under min(CAP_S, time left); log its status; pack
    local name=$1 cap=$(( $2 * SCALE )); shift 2
    local left=$(( TOTAL_S - PACK_RESERVE_S - SECONDS ))
    if (( left < MIN_STAGE_S )); then
        echo "=== device.sh: stage $name not run: the call's time is spent (${SECONDS} s of ${TOTAL_S})"
        echo "$name status=not-run seconds=0" >>"$RUN/stages.txt"
        return 0
    fi
    local limit=$(( cap < left ? cap : left )) start=$SECONDS rc
    echo "=== device.sh: stage $name (limit ${limit} s; ${SECONDS} s into the call)"
    STAGE_LIMIT=$limit timeout -k 5 "$limit" bash -c '"$@"' "$name" "$@"  # functions run in a child bash
    rc=$?
    local status=ok
    (( rc == 124 || rc == 137 )) && status=timeout
    (( rc != 0 && rc != 124 && rc != 137 )) && status=failed
    echo "=== device.sh: stage $name $status (rc $rc) in $(( SECONDS - start )) s"
    echo "$name status=$status rc=$rc seconds=$(( SECONDS - start )) limit=$limit" >>"$RUN/stages.txt"
    pack
}
harness() {  # the harness with this stage's time budget (no unit of work starts in its last 30 s)
    local budget=$(( STAGE_LIMIT > 60 ? STAGE_LIMIT - 30 : 30 ))
    # shellcheck disable=SC2086  # DEV: a word list
    "$PY" benchmarks/step_time.py --out "$RUN" --budget-s "$budget" $DEV "$@"
}
install() {
    if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEEL_DIR"/*.whl \
            || { echo "device.sh: installing the carried wheels failed"; return 1; }
    else
        echo "device.sh: no .whl/ carried (bash benchmarks/device.sh wheels, then carry .whl)"
    fi
    "$PY" -c "import setuptools, sys; v = setuptools.__version__; print('setuptools', v, setuptools.__file__); \
sys.exit(int(v.split('.')[0]) < 77)" || { echo "device.sh: setuptools >= 77 is needed (carry it in .whl)"; return 1; }
    # the package metadata (entry point, awm_fast.kernels); no CUDA extension build in this call
    AWM_FAST_NO_EXT=1 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
        || { echo "device.sh: pip install -e . failed"; return 1; }
    "$PY" -c "import torch, diffusers, peft, awm_fast.kernels, awm_fast.ops, benchmarks.step_time; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, \
'peft', peft.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
}

export -f pack harness install
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
( while sleep 20; do pack; done ) >/dev/null 2>&1 &
packer=$!
trap 'kill $packer 2>/dev/null' EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
stage install 120 install || true
if ! grep -q "^install status=ok" "$RUN/stages.txt"; then
    echo "device.sh: the install failed: nothing can be measured"; pack; exit 1
fi
case "$PLAN" in
core)
    stage smoke 75 "$PY" -m benchmarks.smoke --json "$OUT/smoke.json" $SMOKE_DEV
    stage fast_eager 100 harness --quick --only phases --model sd35m --phases preset --variants=-compile_blocks \
        --tag fast_eager
    stage baseline 130 harness --quick --only phases --model sd35m --phases preset --variants baseline --tag baseline
    stage fast 560 harness --quick --only phases --model sd35m --phases preset --variants fast --tag fast
    stage kernels 120 harness --quick --only kernels --min-mb "$MIN_MB" --tag kernels
    stage shared 560 harness --quick --only phases --model sd35m --variants=-shared_batch --phases train --tag shared ;;
rest)  # issue 27's levers first, in --quick as the core call's fast row they compare with
    stage levers 280 harness --quick --only phases --model sd35m --phases preset --variants +fp8,+merged_lora \
        --tag levers
    stage toggles 560 harness --only phases --model sd35m --phases preset --variants toggles --tag toggles
    stage flux 560 harness --only phases --model flux --phases preset --variants fast,baseline --tag flux
    stage sweep 560 harness --only kernels --tag sweep ;;
esac
kill $packer 2>/dev/null
pack
cat "$RUN/stages.txt"
echo "device.sh: results packed into $OUT/step_time_$PLAN.tgz (tar -xzf it, then step_time.py --merge the JSON files)"
