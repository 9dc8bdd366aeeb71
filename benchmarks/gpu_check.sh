#!/usr/bin/env bash
# The whole GPU check in one command, on a machine whose Python already has torch (CUDA),
# timm, einops, pytest and hypothesis but may download nothing:
#
#     bash benchmarks/gpu_check.sh OUTPUT_DIR [--budget-s 450] [--only STAGES] [--dry-run]
#
# Wheels of xformers and nvidia-cuda-runtime-cu12 brought along in .whl/ (see
# docs/benchmarks.md) are installed into a scratch folder, never into the system. The
# project runs from this tree through PYTHONPATH, not from a pip install.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUTPUT_DIR [--dry-run] [--budget-s SECONDS]}"
shift
python="${PYTHON:-python3}"
# xformers and the CUDA 12 runtime its _C.so links (torch builds for CUDA 13 ship only their own), from
# wheels brought along in .whl/, into a scratch folder: vitblocks loads that runtime before importing xformers
wheels=$(ls .whl/xformers-*.whl .whl/nvidia_cuda_runtime_cu12-*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    site="${TMPDIR:-/tmp}/vitblocks-gpu-check-site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" $wheels && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$python" -c "import xformers" 2>/dev/null; then
    echo "note: xformers is not importable and no .whl/xformers-*.whl was brought along" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" -m benchmarks.gpu_check "$out" "$@"
