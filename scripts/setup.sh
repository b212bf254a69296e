#!/usr/bin/env bash
# Create .venv with the project and its dev tools. torch goes first: a bare `torch` requirement
# would otherwise pull several GB of CUDA wheels on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e '.[dev]'
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, flwr, transformers; print("torch", torch.__version__, "flwr", flwr.__version__, "transformers", transformers.__version__)'))"
