#!/usr/bin/env bash
# The project's GPU checks in one go, for a lent GPU machine with its own PyTorch and no network: the
# CUDA tests (fused counting kernel, chunked loss, steering, selective checkpointing and the 4-bit base
# on CUDA), then the GPU benchmark (scripts/bench_gpu.py: issues 13 and 24). neuronreg is not installed
# there: it is imported from this checkout. Under 8 minutes on an H100/H200 (tests about 1, benchmark
# about 5-6; each capped by TESTS_S / BENCH_S, the benchmark's own sections by BUDGET_S).
#
#   bash scripts/gpu_checks.sh              # writes $OUT (default .cache/gpu): logs and bench_gpu.json
#   BENCH_ARGS=--skip-finetune bash scripts/gpu_checks.sh   # the tests and the counting benchmark only
#
# bitsandbytes (the 4-bit base) is not on the lent machines and they have no network: put its wheel in
# .whl/ of the checkout that travels (ignored by git; 43 MB, manylinux, any Python 3):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl bitsandbytes==0.50.2
# and carry .whl; it is installed below into /tmp/site. Without it the 4-bit rows say so and the rest runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.cache/gpu}
mkdir -p "$OUT" /tmp/neuronreg-shim
ln -sfn "$PWD/registry" /tmp/neuronreg-shim/neuronreg
export PYTHONPATH=/tmp/neuronreg-shim PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
PY=${PYTHON:-python3}
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1 && ! $PY -c "import bitsandbytes" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/bitsandbytes-*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi -L | tee "$OUT/device.txt"
$PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), torch.cuda.device_count(), 'GPU(s)')" | tee -a "$OUT/device.txt"
$PY -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$OUT/device.txt"
timeout "${TESTS_S:-120}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_steering.py \
  tests/test_checkpointing.py tests/test_quantize.py 2>&1 | tee "$OUT/gpu-tests.log"
timeout "${BENCH_S:-360}" $PY scripts/bench_gpu.py --budget-s "${BUDGET_S:-300}" --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/bench_gpu.log"
