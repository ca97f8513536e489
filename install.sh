#!/usr/bin/env bash
# Install pytest-llmperf (editable) with its test tools into the current Python.
# torch is installed only when it is missing, and then as the pinned CPU build: Gaudi, Neuron
# and CUDA nodes keep the torch their SDK ships.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[dev]"
