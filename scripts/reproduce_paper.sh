#!/usr/bin/env bash
# The seed paper's experiment for one language, end to end (Gurgurov, van Genabith, Ostermann 2025):
# count LAPE neurons, select the top 1% and 5%, train the language's neurons and every baseline
# (random neurons, the FFN, the full model, LoRA, IA3) at the paper's settings, evaluate them all on
# the target language and English, and put them side by side.
#
#   scripts/reproduce_paper.sh MODEL LANG        # a GPU node with Hub access: GlotCC-V1 text, 13M tokens,
#                                                # lm-eval on FLORES-200, Belebele, SIB-200 and the English suite
#   scripts/reproduce_paper.sh --small [LANG]    # here, on CPU: SmolLM2-135M and NTREX-128 (../shared), minutes
#
# Settings (environment): OUT (default runs/paper-MODEL-LANG or docs/reproduction-smollm2 with --small),
# REGISTRY, STEPS, NEURONREG, and for the full run TOKENS (13M), TRAIN_TOKENS (100M), TOP_RATE (the
# selection trained: 0.05, the paper's for Mistral-Nemo; 0.01 for Llama-3.1). Every step resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
NEURONREG=${NEURONREG:-neuronreg}
command -v "$NEURONREG" >/dev/null || NEURONREG=.venv/bin/neuronreg

if [ "${1:-}" = "--small" ]; then
  LANG_CODE=${2:-sw}
  SHARED=${SHARED:-../shared}
  CACHE=.cache/reproduce-small
  OUT=${OUT:-docs/reproduction-smollm2}
  REGISTRY=${REGISTRY:-$CACHE/registry}
  STEPS=${STEPS:-40}
  MODEL=$CACHE/smollm2-135m-instruct
  mkdir -p "$CACHE/count" "$CACHE/train" "$CACHE/heldout" "$CACHE/flores/dev" "$CACHE/flores/devtest"
  [ -f "$MODEL/config.json" ] || .venv/bin/python scripts/smollm2.py "$MODEL" >/dev/null
  # NTREX-128 is line-aligned news in 128 languages: lines 1-1500 count the neurons and train; lines
  # 1501-1997 are held out; lines 1501-1600 also stand in for FLORES-200 (same layout, other text).
  for code in en "$LANG_CODE" de fr ru el ar hi; do
    ntrex=$($NEURONREG languages "$code" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["ntrex"])')
    src="$SHARED/corpora/ntrex/$ntrex.txt"
    head -n 1500 "$src" > "$CACHE/count/$code.txt"
    tail -n +1501 "$src" > "$CACHE/heldout/$code.txt"
    flores=$($NEURONREG languages "$code" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["flores200"])')
    sed -n 1501,1550p "$src" > "$CACHE/flores/dev/$flores.dev"
    sed -n 1551,1600p "$src" > "$CACHE/flores/devtest/$flores.devtest"
  done
  cp "$CACHE/count/$LANG_CODE.txt" "$CACHE/train/$LANG_CODE.txt"
  export NEURONREG_FLORES200_DIR=$CACHE/flores HF_HUB_OFFLINE=1
  $NEURONREG compute "$MODEL" en "$LANG_CODE" de fr ru el ar hi --name smollm2-135m-instruct --corpus "$CACHE/count" \
    --tokens 30k --seq-len 256 --top-rate 0.01 --registry "$REGISTRY" -q
  $NEURONREG select smollm2-135m-instruct --top-rate 0.05 --registry "$REGISTRY" -q
  TOP_RATE=${TOP_RATE:-0.05}
  TRAIN=(--data "$CACHE/train" --steps "$STEPS" --batch-size 4 --seq-len 128 --eval-every 10 --seed 0)
  EVALUATE=(--data "$CACHE/heldout" --languages "$LANG_CODE,en" --tokens 20k --seq-len 256 --tasks flores
            --limit 8)
  MODEL_ARGS=("$MODEL" --name smollm2-135m-instruct)
  # A 135M model barely translates into Swahili and 8 sentences are noise: plot held-out text instead.
  REPORT=(--tradeoff 'heldout_{lang}/bits_per_character')
else
  MODEL=${1:?usage: scripts/reproduce_paper.sh MODEL LANG | --small [LANG]}
  LANG_CODE=${2:?usage: scripts/reproduce_paper.sh MODEL LANG | --small [LANG]}
  OUT=${OUT:-runs/paper-$MODEL-$LANG_CODE}
  REGISTRY=${REGISTRY:-${NEURONREG_REGISTRY:-${XDG_DATA_HOME:-$HOME/.local/share}/neuronreg/registry}}  # the default (Linux)
  STEPS=${STEPS:-10000}
  TOP_RATE=${TOP_RATE:-0.05}
  # The seed pipeline: 13M tokens of GlotCC-V1 per language, the paper's 12 languages and the target.
  $NEURONREG compute "$MODEL" @seed12 "$LANG_CODE" --corpus hf --tokens "${TOKENS:-13M}" --top-rate 0.01 \
    --registry "$REGISTRY"
  $NEURONREG select "$MODEL" --top-rate 0.05 --registry "$REGISTRY" -q
  TRAIN=(--data hf --tokens "${TRAIN_TOKENS:-100M}" --steps "$STEPS" --batch-size 2 --seq-len 512
         --eval-every 500 --seed 0)
  EVALUATE=(--tasks flores,belebele,sib200,english --languages "$LANG_CODE,en")
  MODEL_ARGS=("$MODEL")
  REPORT=()
fi

mkdir -p "$OUT/runs"
# The paper's settings: AdamW, lr 1e-4 for the neurons and the adapters, 1e-5 for the FFN and full
# fine-tuning, weight decay 0.01, clip 1.0; every subset keeps float32 master weights.
todo=()
for subset in lape random ffn full lora ia3; do
  case $subset in ffn|full) lr=1e-5 ;; *) lr=1e-4 ;; esac
  run=$OUT/runs/$subset
  if [ ! -f "$run/neuronreg_delta.json" ]; then
    rm -f "$run/.evaluated"
    $NEURONREG finetune "${MODEL_ARGS[@]}" "$LANG_CODE" --subset "$subset" --top-rate "$TOP_RATE" \
      --mask "$REGISTRY" "${TRAIN[@]}" --lr "$lr" --out "$run" -q
  fi
  [ -f "$run/.evaluated" ] || todo+=("$run")
done
# One evaluate for every run not evaluated yet: the base model is measured once for all of them, and
# the benchmark scores a stopped evaluation already has are kept (--resume).
if [ ${#todo[@]} -gt 0 ]; then
  $NEURONREG evaluate "${todo[@]}" "${EVALUATE[@]}" --resume -q > /dev/null   # an interrupted one picks up
  for run in "${todo[@]}"; do touch "$run/.evaluated"; done
fi
$NEURONREG report "$OUT"/runs/* -o "$OUT" "${REPORT[@]}" > "$OUT/report.md.tmp"
mv "$OUT/report.md.tmp" "$OUT/report.md"
cat "$OUT/report.md"
