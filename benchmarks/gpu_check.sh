#!/usr/bin/env bash
# One call's worth of GPU checks for a lent device machine (see benchmarks/gpu_check.py).
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with network: wheels the device lacks -> .whl/
#   bash benchmarks/gpu_check.sh             # on the device machine: writes $OUT/gpu_check.json
#
# With the workplace's device tool: run(command="bash benchmarks/gpu_check.sh",
# carry=[".whl"], timeout_s=560). The device image has torch, timm, h5py, tifffile, einops and
# pytest but not OpenSlide; nothing can be downloaded there, so the wheels travel with the call.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  PY=${PYTHON:-python3}
  rm -rf .whl && mkdir -p .whl
  # The lent machine runs CPython 3.12 on x86-64 (manylinux).
  for spec in "openslide-python==1.4.7" "openslide-bin==4.0.1.2"; do
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "$spec" || exit 1
  done
  ls -la .whl
  exit 0
fi

OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# milkit.models / milkit.feature_extraction are installed from the top-level folders by
# pyproject's package-dir; on this throwaway copy of the tree, links do the same without pip.
[ -e milkit/models ] || ln -s ../models milkit/models
[ -e milkit/feature_extraction ] || ln -s ../feature_extraction milkit/feature_extraction
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,utilization.gpu --format=csv || true
timeout 540 python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
