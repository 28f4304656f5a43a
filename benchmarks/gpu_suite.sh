#!/usr/bin/env bash
# One-command GPU suite (benchmarks/gpu_suite.py; --help lists the options):
#
#   bash benchmarks/gpu_suite.sh               # one CUDA GPU, under 8 minutes; writes
#                                              # gpu_suite_out/ (or $OUT): summary.md, .json, logs
#   bash benchmarks/gpu_suite.sh --cpu-check   # the tiny CPU rehearsal of every part
#
# It runs with the active environment's python; PYTHON=/path/to/python picks another.
set -euo pipefail
python_bin="${PYTHON:-}"
if [[ -z "$python_bin" ]]; then
    if command -v python >/dev/null 2>&1; then
        python_bin=python
    elif command -v python3 >/dev/null 2>&1; then
        python_bin=python3
    else
        echo "gpu_suite: no python on PATH; activate lrkd's environment or set PYTHON" >&2
        exit 2
    fi
fi
exec "$python_bin" "$(dirname "${BASH_SOURCE[0]}")/gpu_suite.py" "$@"
