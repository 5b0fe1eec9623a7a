#!/usr/bin/env bash
# Create .venv and install evl-hf with its training and test extras, offline-friendly.
# torch/torchvision are pinned first: a bare `torch` requirement on an empty environment can pull a different
# multi-GB build, and torchvision must match torch exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[testing]"
