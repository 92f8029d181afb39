#!/usr/bin/env bash
# The prepared GPU check of the profiling harness, sized for a short lease of one H100/H200 (benchmarks/README.md,
# "On a lent GPU"). Two halves:
#
#   bash benchmarks/device.sh wheels        # HERE (with pip access): the pure-Python wheels the GPU image lacks,
#                                           # into .whl/ (git-ignored; carry it: carry=[".whl"])
#   bash benchmarks/device.sh run PLAN      # THERE (GPU machine, repo root): install, build, measure into $OUT
#
# PLANs (each stops starting new work after BUDGET_S seconds, default 420, and writes its files as it goes):
#   core   kernels (official shapes, then the sweep) + SD3.5-M-shaped phases of fast and baseline
#   rest   SD3.5-M phases of every `fast -X` + FLUX.1-dev-shaped phases of fast and baseline
#   all    the whole harness (needs far more than one 10-minute call: use core + rest, then --merge)
# Then, here: python benchmarks/step_time.py --merge <core json> <rest json>   (one report, one set of targets)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0)

case "${1:-}" in
wheels)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || exit 1
    ls -la .whl
    exit 0 ;;
run) ;;
*) echo "usage: bash benchmarks/device.sh wheels | run core|rest|all" >&2; exit 2 ;;
esac

PLAN=${2:-core}
OUT=${OUT:-benchmarks/results/_device}
BUDGET_S=${BUDGET_S:-420}
mkdir -p "$OUT"
LOG="$OUT/device_${PLAN}.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device.sh: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
python3 -c "import torch, triton, diffusers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, \
'gpu', torch.cuda.get_device_name())" || { echo "device.sh: a package is missing (carry .whl: device.sh wheels)"; exit 1; }

# awm_fast.kernels lives in kernels/ (pyproject package-dir): an editable install maps it; the CUDA extension
# (the "cuda" backend of the kernel table) is built in place with a time cap, and the run goes on without it.
AWM_FAST_NO_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || { echo "device.sh: pip install -e . failed"; exit 1; }
if [ "$PLAN" != rest ]; then
    start=$(date +%s)
    MAX_JOBS=16 timeout 240 python3 setup.py -q build_ext --inplace >"$OUT/build_ext.txt" 2>&1 \
        && echo "device.sh: awm_fast._C built in $(( $(date +%s) - start )) s" \
        || echo "device.sh: awm_fast._C not built (see build_ext.txt): no 'cuda' kernel rows"
fi

left() { echo $(( BUDGET_S - SECONDS > 30 ? BUDGET_S - SECONDS : 30 )); }  # SECONDS: time since this script began
harness() { python3 benchmarks/step_time.py --out "$OUT" --budget-s "$(left)" "$@"; }
case "$PLAN" in
core) harness --model sd35m --variants fast,baseline --tag core ;;
rest) harness --only phases --model sd35m --variants toggles --tag rest
      harness --only phases --model flux --variants fast,baseline --tag rest ;;
all)  harness --tag all ;;
*) echo "device.sh: unknown plan $PLAN (core | rest | all)"; exit 2 ;;
esac
