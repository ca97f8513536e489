#!/usr/bin/env bash
# Install pytest-llmperf (editable) with its test tools into the current Python.
# torch is installed only when it is missing, and then as the pinned CPU build: Gaudi, Neuron
# and CUDA nodes keep the torch their SDK ships. On such a plain CPU machine the engines'
# libraries come too (DeepSpeed, bitsandbytes: both run on CPU), so the suites and the tests
# exercise every engine; vendor nodes keep the DeepSpeed fork their SDK ships (Habana's).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
EXTRAS="dev"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch==2.13.0"
    EXTRAS="dev,deepspeed,bnb"
fi
"$PY" -m pip install -q -e ".[$EXTRAS]"
