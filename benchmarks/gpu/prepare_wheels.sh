#!/usr/bin/env bash
# Run HERE (with network), before a device run: put the wheels the GPU machine lacks into .whl/
# (gitignored), so that `run` with carry [".whl"] installs them there with no network.
#
# The machine (see /work/.library/device/KINDS.md) has torch 2.11 / transformers 5.17 / triton 3.6,
# timm, accelerate, peft, einops, ninja, psutil, py-cpuinfo, msgpack, nvidia-ml-py, matplotlib,
# tensorboard, pytest. It lacks what the check needs from here: deepspeed (training rows) with its
# pydantic stack and hjson, and fla-core (retention rows). open_clip, datasets, easy-vqa and
# lmms-eval are not needed by the check. The project itself is NOT carried as a wheel: run.sh maps
# the source tree onto the package layout there, so the code that runs is always the tree's.
#
# Versions: those pinned in requirements/lock.txt (all pure Python or cp312 wheels that do not
# depend on torch's version); fla-core is not in the lock (a `gpu` extra), so it is pinned here.
# deepspeed has only a source distribution on PyPI: it is built here into a pure-Python wheel
# with no precompiled ops (DS_BUILD_OPS=0; the check uses none of DeepSpeed's CUDA ops).
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST=${WHEEL_DIR:-.whl}
LOCK=requirements/lock.txt
PY=${PYTHON:-python3}  # any python with pip; the wheels target the machine's cp312, not this one
FLA_CORE_VERSION=0.6.0
LIMIT_MB=64  # the device tool's limit for everything that travels (tree + carried paths)
# what travels besides .whl: the tracked tree; leave room for it
TREE_BUDGET_MB=8

pin() {  # version of $1 in the lock, or fail loudly
    local v
    v=$(sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$LOCK" | head -1)
    [ -n "$v" ] || { echo "prepare_wheels: $1 is not pinned in $LOCK" >&2; exit 1; }
    echo "$v"
}

# Keep one version of each package: a stale second wheel stops the whole install there.
rm -rf "$DEST"
mkdir -p "$DEST"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
BINARY=(pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson)
specs=()
for name in "${BINARY[@]}"; do specs+=("$name==$(pin "$name")"); done
specs+=("fla-core==$FLA_CORE_VERSION")
echo "prepare_wheels: downloading ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${specs[@]}"

DS="deepspeed==$(pin deepspeed)"
echo "prepare_wheels: building $DS (source only on PyPI) into a pure-Python wheel"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary deepspeed -w "$DEST" "$DS"

# The tree's commit travels with the wheels (the device gets the files, not .git): the check reports it.
{ git rev-parse HEAD 2>/dev/null || echo unknown; echo "uncommitted changes: $(git status --porcelain 2>/dev/null | wc -l)"; } \
    > "$DEST/source.txt"

# Every wheel must install on the machine: pure Python, or CPython 3.12 on x86-64 Linux.
status=0
for whl in "$DEST"/*.whl; do
    case "$(basename "$whl")" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl|*-cp312-cp312-*x86_64*.whl) ;;
        *) echo "prepare_wheels: $(basename "$whl") will not install on cp312 x86-64" >&2; status=1 ;;
    esac
done
ls -l "$DEST" | awk 'NR > 1 {printf "%8.2f MiB  %s\n", $5 / 1048576, $9}'
total_kb=$(du -sk "$DEST" | cut -f1)
printf "prepare_wheels: %.2f MiB in %s (limit %d MiB for everything carried, tree included)\n" \
    "$(echo "$total_kb / 1024" | bc -l)" "$DEST" "$LIMIT_MB"
if [ "$total_kb" -gt $(( (LIMIT_MB - TREE_BUDGET_MB) * 1024 )) ]; then
    echo "prepare_wheels: too large to carry with the tree" >&2
    status=1
fi
exit $status
