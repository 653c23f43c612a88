#!/usr/bin/env bash
# The project's GPU checks in one go, for a lent GPU machine with its own PyTorch and no network:
# the CUDA tests (fused counting kernel, chunked loss, steering on CUDA), then the GPU benchmark
# (issue 13's tables). neuronreg is not installed there: it is imported from this checkout.
#
#   bash scripts/gpu_checks.sh              # writes $OUT (default .cache/gpu): logs and bench_gpu.json
#   BENCH_ARGS=--skip-finetune bash scripts/gpu_checks.sh   # the tests and the counting benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.cache/gpu}
mkdir -p "$OUT" /tmp/neuronreg-shim
ln -sfn "$PWD/registry" /tmp/neuronreg-shim/neuronreg
export PYTHONPATH=/tmp/neuronreg-shim PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
PY=${PYTHON:-python3}
nvidia-smi -L | tee "$OUT/device.txt"
$PY -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
timeout "${TESTS_S:-170}" $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_steering.py \
  2>&1 | tee "$OUT/gpu-tests.log"
timeout "${BENCH_S:-330}" $PY scripts/bench_gpu.py --budget-s "${BUDGET_S:-270}" --json "$OUT/bench_gpu.json" ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/bench_gpu.log"
