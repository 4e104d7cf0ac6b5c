#!/usr/bin/env bash
# One prepared GPU run (issue 13): the zoo's full-size models on one CUDA device, in at
# most 8 minutes, written to bench/results/gpu.md (see bench/gpu_check.py).
#
#   bench/gpu_check.sh            # on a CUDA machine
#   bench/gpu_check.sh --dry-run  # the same Python on the CPU, tiny models (a rehearsal)
#
# Needs a Python with CUDA builds of torch==2.13.0 and onnxruntime-gpu (PYTHON, default
# .venv/bin/python); without the CUDA execution provider the ORT rows run on the CPU EP
# and say so. Nothing is downloaded: the zoo's weights are random.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [[ "${1:-}" != "--dry-run" ]]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: no CUDA device visible to torch: nothing measured" \
             "(bench/gpu_check.sh --dry-run rehearses on the CPU)" >&2
        exit 2
    fi
fi
# 480 s: the issue's 8 minutes; the Python stops starting models after --budget-s (420 s).
exec timeout 480 "$PY" -m bench.gpu_check "$@"
