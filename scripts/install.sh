#!/usr/bin/env bash
# Creates .venv and installs neuronreg with its test dependencies. torch is pinned to the CPU
# build (an unpinned torch pulls several GB of CUDA packages); on a GPU machine install the torch
# you need first and drop the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]"
