#!/usr/bin/env bash
# Fill the manifest's registry repo: for each model, count every NTREX-128 language on its GlotCC-V1
# text, select the top 1% (the default) and 5%, optionally import the authors' released files, and
# publish everything in one commit. Meant for a GPU node with Hub access; resumable at every step
# (counts resume from their checkpoints, languages already counted are kept, selections and
# publish are idempotent), so after an interruption run the same command again.
#
#   scripts/build_registry.sh                      # every model of the manifest
#   scripts/build_registry.sh mistral-nemo llama-3.1-8b
#
# Settings (environment):
#   LANGUAGES  languages or sets to count            [@ntrex]
#   CORPUS     --corpus of compute                    [hf]
#   TOKENS     tokens per language                    [13M]
#   TOP_RATES  selections to make, the first is the default  ["0.01 0.05"]
#   REPO       the Hub dataset repo                   [the manifest's registry_repo]
#   REGISTRY   the local registry folder              [neuronreg's default]
#   GPUS       processes per node under torchrun      [the number of GPUs; 1: no torchrun]
#   IMPORTS    a file of lines "FILE MODEL LANGUAGES RATE [OPTIONS]" (the authors' releases) to import too
#   NEURONREG  the command to run                     [neuronreg]
set -euo pipefail
NEURONREG=${NEURONREG:-neuronreg}
LANGUAGES=${LANGUAGES:-@ntrex}
CORPUS=${CORPUS:-hf}
TOKENS=${TOKENS:-13M}
TOP_RATES=${TOP_RATES:-"0.01 0.05"}
GPUS=${GPUS:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c "^GPU" || true)}
[ "${GPUS:-0}" -ge 1 ] 2>/dev/null || GPUS=1
REGISTRY_ARGS=()
[ -n "${REGISTRY:-}" ] && REGISTRY_ARGS=(--registry "$REGISTRY")
read -r -a RATES <<< "$TOP_RATES"

if [ $# -gt 0 ]; then
  MODELS=("$@")
else
  mapfile -t MODELS < <($NEURONREG models --json | python3 -c 'import json, sys; print("\n".join(json.load(sys.stdin)))')
fi
if [ -z "${REPO:-}" ]; then
  REPO=$(python3 -c 'import neuronreg; print(neuronreg.load_manifest().registry_repo)')
fi

echo "Building $REPO: ${#MODELS[@]} model(s), languages $LANGUAGES, $TOKENS tokens each, top rates ${RATES[*]}, $GPUS GPU(s)." >&2
ALIASES=()
for model in "${MODELS[@]}"; do
  $NEURONREG models "$model" >/dev/null 2>&1 && ALIASES+=("$model")
done
if [ ${#ALIASES[@]} -gt 0 ]; then
  echo "Estimated counting time (one GPU each; divide by $GPUS under torchrun):" >&2
  $NEURONREG models --estimate --languages "$LANGUAGES" --tokens "$TOKENS" "${ALIASES[@]}" >&2
fi

for model in "${MODELS[@]}"; do
  echo "== $model" >&2
  if [ "$GPUS" -gt 1 ]; then
    torchrun --nproc-per-node "$GPUS" -m neuronreg compute "$model" --languages "$LANGUAGES" --corpus "$CORPUS" \
      --tokens "$TOKENS" --top-rate "${RATES[0]}" "${REGISTRY_ARGS[@]}"
  else
    $NEURONREG compute "$model" --languages "$LANGUAGES" --corpus "$CORPUS" --tokens "$TOKENS" \
      --top-rate "${RATES[0]}" "${REGISTRY_ARGS[@]}"
  fi
  for rate in "${RATES[@]:1}"; do
    $NEURONREG select "$model" --top-rate "$rate" "${REGISTRY_ARGS[@]}" -q
  done
done

PUBLISH=("${MODELS[@]}")
if [ -n "${IMPORTS:-}" ]; then
  while read -r file model langs rate extra; do
    if [ -z "$file" ] || [ "${file:0:1}" = "#" ]; then continue; fi
    # shellcheck disable=SC2086  # extra holds further import options, e.g. --layers 32
    $NEURONREG import "$file" --model "$model" --languages "$langs" --top-rate "$rate" ${extra:-} \
      "${REGISTRY_ARGS[@]}" -q
    PUBLISH+=("$model")
  done < "$IMPORTS"
fi

$NEURONREG ls "${REGISTRY_ARGS[@]}" >&2
$NEURONREG publish "${PUBLISH[@]}" --repo "$REPO" "${REGISTRY_ARGS[@]}"
