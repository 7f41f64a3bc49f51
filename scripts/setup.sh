#!/usr/bin/env bash
# Create .venv with the pinned CPU torch wheel and install MedDiffusionLib with every extra.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# Pin the CPU wheel first so that no dependency pulls a multi-GB CUDA build of torch.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[all]"
