"""The one table that turns library errors into what the command line says.

A library error carries its message (what went wrong) and a ``fix`` (a name for the remedy); the
message is printed as it is and the fix becomes a hint in the command line's own terms (its flags
and commands). Nothing else in the CLI writes an error message for a library exception.
"""

from __future__ import annotations

import errno

from ..errors import NeuronregError, UnknownLanguage, UnknownModel

# fix -> hint, in CLI terms.
HINTS = {
    "again": "Run publish again.",
    "base": "Pass --base with the folder (or Hub id) of that model.",
    "busy": "Wait for it to finish; if it died on another machine, delete its lock file.",
    "checkpointing": "Give --checkpointing none, full, mlp, or a memory budget in GiB (e.g. 20).",
    "compute": "Run 'neuronreg compute MODEL LANG...' first (or pass --registry).",
    "compute_or_fetch": "Run 'neuronreg compute MODEL LANG...' first, or fetch published neurons ('neuronreg fetch "
                        "MODEL LANG -o mask.parquet') and pass --mask mask.parquet.",
    "config_name": "Use --name to store the model under another name (its datasets configs are NAME and "
                   "NAME-SELECTION).",
    "corpus": "Give --corpus a folder of <language>.txt/.jsonl/.parquet files, or 'hf'.",
    "dense_run": "An ffn or full run is a whole model: evaluate or release it as it is.",
    "device": "Pass --device cpu, or a device this machine has.",
    "diverged": "Lower --lr, or clip gradients (--clip 1.0).",
    "empty_mask": "Select with a higher --top-rate, or train --subset ffn.",
    "force": "Add --force to count it again, or use another --registry.",
    "identifier": "Choose --from and --to among the languages the identifier knows (docs/steering.md).",
    "languages": "Run 'neuronreg languages' to list them, or add it to the manifest.",
    "layers": "Give --layers as FIRST-LAST or a comma-separated list, e.g. 20-29 or 0-3,20-29.",
    "later": "Try again later.",
    "login": "Log in with 'hf auth login', set HF_TOKEN, or pass --token.",
    "manifest": "Check --manifest or $NEURONREG_MANIFEST.",
    "mask_file": "Give the mask file of that language with --mask.",
    "mask_model": "Use the mask of this model (or --name to pick the registry entry).",
    "memory": "Use a smaller --dtype, or a machine with more memory.",
    "merge_dtype": "Add --merged, or drop --merge-dtype.",
    "method_options": "Drop the options of another subset (--lora-r, --lora-alpha, --lora-dropout: lora; "
                      "--target-modules: lora, ia3), or choose the subset they belong to.",
    "model_size": "Pass --layers and --intermediate-size (and --hidden-size for the share of parameters).",
    "model_source": "Give the model's Hub id or local folder as MODEL.",
    "models": "Give a manifest alias ('neuronreg models'), a Hub id like org/name, a local folder, or a name "
              "'neuronreg ls' shows.",
    "more_text": "Give more text, a smaller --seq-len, or --eval-data.",
    "name": "Use --name to store it under another name.",
    "network": "Check your network, or set HF_HUB_OFFLINE=1 to use cached files.",
    "offline": "Unset HF_HUB_OFFLINE to reach the Hub (or fetch it once while online).",
    "other_base": "Pass --allow-other-base to apply it anyway.",
    "out": "Choose another --out.",
    "overwrite": "Use another --out, or --overwrite to start again.",
    "prompts": "Give PROMPT arguments, or --prompts FILE with one prompt per line.",
    "quantize": "Train --subset lape, random, lora or ia3 on a 4-bit base, or drop --quantize.",
    "quantize_merged": "Drop --merged; merge later (neuronreg release --merged, or load_sparse_model(run, "
                       "merge=True)).",
    "recompute": "Delete it and run 'neuronreg compute' again (with --force).",
    "recount": "Count the language again: 'neuronreg compute MODEL LANG --corpus ... --force' (the same settings).",
    "registry": "Choose another with --registry or $NEURONREG_REGISTRY.",
    "revision": "Check --revision (a branch name git accepts).",
    "run_folder": "Give the folder that 'neuronreg finetune --out' wrote.",
    "same_text": "Give held-out text the masks never saw, or pass --allow-same-text.",
    "select": "Run 'neuronreg select' again.",
    "selection": "Choose one with --selection NAME or --top-rate RATE ('neuronreg ls' lists them).",
    "selection_name": "Choose one with --selection NAME ('neuronreg ls' lists them).",
    "steer_languages": "Name the languages with --deactivate and/or --activate (generate), --from and --to "
                       "(steer-eval); --mode additive needs both.",
    "strength": "Give strengths as numbers, e.g. --strength 1.5 or --strengths 0,0.5,1,2,4.",
    "subset": "Choose --subset lape, random, ffn, full, lora or ia3 (or a method you registered).",
    "tag": "Choose another --tag.",
    "target_modules": "Name linear projections of the model with --target-modules a,b,c, or leave it out for the "
                      "MLP projections.",
    "text_field": "Name the column with --text-field.",
    "upgrade": "Upgrade neuronreg (pip install -U neuronreg).",
    "write_token": "Use a token with write access (--token).",
}

# Errors whose remedy follows from their type alone.
TYPE_FIXES = ((UnknownLanguage, "languages"), (UnknownModel, "models"))


def hint_for(exc: NeuronregError) -> str | None:
    fix = exc.fix or next((fix for kind, fix in TYPE_FIXES if isinstance(exc, kind)), None)
    return HINTS.get(fix) if fix else None


def message(exc: BaseException) -> str | None:
    """The one-line message for an expected error, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, NeuronregError):
        hint = hint_for(exc)
        text = f"{exc.message} {hint}" if hint else exc.message
    elif isinstance(exc, MemoryError):
        text = f"Out of memory. {HINTS['memory']}"
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS,
                                                    errno.EPERM):
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror}{where}. Nothing was left half-written; free space or fix the permissions and run " \
               "the command again."
    else:
        return None
    return " ".join(text.split())
