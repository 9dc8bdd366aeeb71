#!/usr/bin/env bash
# The whole GPU check in one command, on a machine whose Python already has torch (CUDA),
# timm, einops, pytest and hypothesis but may download nothing:
#
#     bash benchmarks/gpu_check.sh OUTPUT_DIR [--budget-s 450] [--only STAGES] [--dry-run]
#
# If xformers is not importable, a wheel of it brought along in .whl/ (see
# docs/benchmarks.md) is installed into a scratch folder, never into the system. The
# project runs from this tree through PYTHONPATH, not from a pip install.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/gpu_check.sh OUTPUT_DIR [--dry-run] [--budget-s SECONDS]}"
shift
python="${PYTHON:-python3}"
if ! "$python" -c "import xformers" 2>/dev/null; then
    wheel=$(ls .whl/xformers-*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheel" ]; then
        site="${TMPDIR:-/tmp}/vitblocks-gpu-check-site"
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "$wheel" && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "note: xformers is not importable and no .whl/xformers-*.whl was brought along" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$python" -m benchmarks.gpu_check "$out" "$@"
