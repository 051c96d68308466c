#!/usr/bin/env bash
# Fetch every wheel the GPU check needs that the lent H200's image lacks into .whl/ (ignored by git),
# then check that the set is complete and small enough to travel with the working tree (64 MiB a call).
#
#   bash benchmarks/gpu_wheels.sh          # from anywhere; needs the project venv (make setup) and PyPI
#
# What is carried and why: benchmarks/gpu_packages.py (versions = the venv's, i.e. what the tests ran).
#  - cp312 manylinux x86_64 or pure-Python wheels, --only-binary=:all:, --no-deps (the list is the closure);
#  - DeepSpeed has no wheel on PyPI: `pip wheel --no-deps --no-build-isolation` builds its sdist against the
#    venv's torch with no compiled ops (DS_BUILD_OPS=0), a py3-none-any wheel: the ops it could JIT-build
#    are not used (the engine runs torch's AdamW);
#  - Ray is not carried (its wheel alone is over 64 MiB): on the GPU the chain runs under torchrun.
# The folder is emptied first, so only one version of each package is there (two stop the install).
# Afterwards benchmarks/gpu_wheels_check.py resolves the roots offline against .whl plus the image's
# packages (`pip install --dry-run --no-index`), and the total size is printed.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WHL=${WHL_DIR:-.whl}
LIMIT_MIB=${LIMIT_MIB:-64}
[ -x "$PYTHON" ] || { echo "gpu_wheels: $PYTHON not found: run make setup first (it builds DeepSpeed against torch)"; exit 2; }

# manylinux tags pip must match exactly (see the device notes): newest first
PLATFORMS=()
for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done
TARGET=(--python-version 3.12 --implementation cp --abi cp312 "${PLATFORMS[@]}")

mapfile -t PINS < <("$PYTHON" benchmarks/gpu_packages.py pins)
mapfile -t BUILT < <("$PYTHON" benchmarks/gpu_packages.py built)

rm -rf "$WHL"
mkdir -p "$WHL"
echo "=== downloading ${#PINS[@]} wheels (cp312, manylinux x86_64)"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "${TARGET[@]}" -d "$WHL" "${PINS[@]}"

SDIST=$(mktemp -d)
trap 'rm -rf "$SDIST"' EXIT
for pin in "${BUILT[@]}"; do
    echo "=== building $pin from its sdist"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: -d "$SDIST" "$pin"
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WHL" "$SDIST"/*
    rm -f "$SDIST"/*
done

echo "=== completeness: offline resolve of the roots against $WHL + the image's packages"
"$PYTHON" benchmarks/gpu_wheels_check.py --wheels "$WHL"

total=$(du -cb "$WHL"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
count=$(find "$WHL" -type f -name '*.whl' | wc -l)
echo "=== $count wheels, $(( total / 1024 )) KiB; with the working tree ($(( tree / 1024 )) KiB):" \
     "$(( (total + tree) / 1024 / 1024 )) MiB of the ${LIMIT_MIB} MiB a call carries"
if (( total + tree > LIMIT_MIB * 1024 * 1024 )); then
    echo "gpu_wheels: over ${LIMIT_MIB} MiB: carry fewer wheels"
    exit 1
fi
