#!/usr/bin/env bash
# The GPU check, one call: on the device machine (its own python3, plus the wheels carried in .whl/),
# or anywhere with DRY_RUN=1 (tiny sizes on CPU, CUDA rows skipped). Writes gpu_check.json,
# gpu_check.md, gpu_check_rows.jsonl and gpu_check.log to $OUT. See benchmarks/gpu/README.md.
#
#   OUT=/tmp/out benchmarks/gpu/run.sh               # on the device machine (OUT is set there)
#   DRY_RUN=1 benchmarks/gpu/run.sh                  # here: the same script end to end on CPU
#   SECTIONS="training streaming" benchmarks/gpu/run.sh   # a rerun of some sections
#
# Variables: OUT (default outputs/gpu-check), DRY_RUN (1: CPU dry run), PYTHON (default python3),
# SECTIONS (default all), TOTAL_SECONDS (default: the driver's 510), WORK (scratch, default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-$REPO/outputs/gpu-check}
PY=${PYTHON:-python3}
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # absolute: we cd below
WORK=${WORK:-/tmp/gpu-check}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu_check.log"
: > "$LOG"
say() { echo "[run.sh] $*" | tee -a "$LOG"; }

# 1. Carried wheels (deepspeed, fla-core, pydantic, ...) into a private folder: never over the
#    machine's own packages. The dry run uses this machine's environment as it is.
SITE="$WORK/site"
if [ "$DRY_RUN" != 1 ]; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        say "no wheels in .whl/: run benchmarks/gpu/prepare_wheels.sh here and carry .whl"; exit 3
    fi
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        2>&1 | tee -a "$LOG" || { say "installing the carried wheels failed"; exit 3; }
fi

# 2. The project from this tree, laid out as pyproject.toml maps it (defocus_vlm.kernels = kernels/ ...).
"$PY" benchmarks/gpu/mirror_package.py "$WORK/src" 2>&1 | tee -a "$LOG" || { say "mapping the tree failed"; exit 3; }
export PYTHONPATH="$WORK/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

args=(--output-dir "$OUT" --repo "$REPO")
[ "$DRY_RUN" = 1 ] && args+=(--dry-run)
[ -n "${SECTIONS:-}" ] && args+=(--sections $SECTIONS)
[ -n "${TOTAL_SECONDS:-}" ] && args+=(--total-seconds "$TOTAL_SECONDS")
say "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)'), dry run: $DRY_RUN, out: $OUT"
# Not from the tree's root: its ./defocus_vlm (without the mapped subpackages) would shadow the mirror.
cd "$WORK"
"$PY" -c 'import sys; from defocus_vlm.cli import main; sys.exit(main(["bench", "gpu", *sys.argv[1:]]))' \
    "${args[@]}" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
