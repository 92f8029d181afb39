#!/usr/bin/env bash
# The prepared GPU check of the profiling harness, sized for a short lease of one H100/H200 (benchmarks/README.md,
# "On a lent GPU"). Two halves:
#
#   bash benchmarks/device.sh wheels        # HERE (with pip access): the pure-Python wheels the GPU image lacks,
#                                           # into .whl/ (git-ignored; carry it: carry=[".whl"])
#   bash benchmarks/device.sh run PLAN      # THERE (GPU machine, repo root): install, build, measure into $OUT
#
# PLANs (each stops starting new work after BUDGET_S seconds, default 420, and writes its files as it goes):
#   core   SD3.5-M-shaped phases of fast and baseline (while awm_fast._C builds), then --quick kernels (official
#          shapes, the >= 64 MB cases): every input of the six targets. With a 15-minute lease, this is the call.
#   rest   SD3.5-M phases of every `fast -X`, FLUX.1-dev-shaped phases of fast and baseline, the full kernel set
#          with the 1 GB sweep
#   all    the whole harness (needs far more than one 10-minute call: use core + rest, then --merge)
# Then, here: python benchmarks/step_time.py --merge <the JSON files>   (one report, one set of targets)
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=(diffusers==0.42.1 importlib_metadata==8.7.0 peft==0.21.2)  # as tested here; the GPU image lacks diffusers

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

# awm_fast.kernels lives in kernels/ (pyproject package-dir): an editable install maps it. The CUDA extension (the
# "cuda" rows of the kernel table) builds in place in the background while the phases run, with a time cap; the
# kernel section starts after it, with or without it.
AWM_FAST_NO_EXT=1 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || { echo "device.sh: pip install -e . failed"; exit 1; }
build_ext() {
    local start=$SECONDS
    MAX_JOBS=8 timeout 300 python3 setup.py -q build_ext --inplace >"$OUT/build_ext.log" 2>&1 \
        && echo "device.sh: awm_fast._C built in $(( SECONDS - start )) s" \
        || echo "device.sh: awm_fast._C not built (build_ext.log): no 'cuda' kernel rows"
}

KERNEL_RESERVE_S=150  # of BUDGET_S, kept for the kernel section of `core`
# The harness writes JSON + Markdown after every variant into $RUN, and CSV + plots at its end; the files are packed
# into one archive when the plan ends (the device tool returns at most 8 files: a killed call still returns the
# checkpoints, at most 2 per harness run, and the logs).
RUN="$OUT/run"
left() { echo $(( BUDGET_S - SECONDS > 30 ? BUDGET_S - SECONDS : 30 )); }  # SECONDS: time since this script began
harness() { python3 benchmarks/step_time.py --out "$RUN" "$@"; }
case "$PLAN" in
core) build_ext & builder=$!
      harness --quick --only phases --model sd35m --variants fast,baseline --tag core \
          --budget-s $(( $(left) > KERNEL_RESERVE_S + 60 ? $(left) - KERNEL_RESERVE_S : 60 ))
      wait $builder
      harness --quick --only kernels --tag core --budget-s "$(left)" ;;
rest) harness --only phases --model sd35m --variants toggles --tag rest --budget-s "$(left)"
      harness --only phases --model flux --variants fast,baseline --tag rest --budget-s "$(left)"
      harness --only kernels --tag sweep --budget-s "$(left)" ;;
all)  build_ext; harness --tag all --budget-s "$(left)" ;;
*) echo "device.sh: unknown plan $PLAN (core | rest | all)"; exit 2 ;;
esac
tar -czf "$OUT/step_time_$PLAN.tgz" -C "$RUN" . && rm -rf "$RUN" \
    && echo "device.sh: results packed into step_time_$PLAN.tgz (tar -xzf it, then step_time.py --merge the JSON files)"
