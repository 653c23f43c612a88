"""Commands that make and publish fine-tuning runs: finetune, compose, release."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import click

from . import _options as o
from ._output import json_result, result, setup_logging, status


def merge_dtype_option(help: str):
    return click.option("--merge-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
                        help=help)


@click.command(name="finetune")
@click.argument("model")
@click.argument("language")
@click.option("--data", required=True,
              help="Training text: a folder with one <language>.txt/.jsonl/.parquet per language (like --corpus).")
@o.out_option("Run folder: delta.safetensors, neuronreg_delta.json, checkpoint.pt while running.", required=True)
@click.option("--mask", "mask_source", type=click.Path(), default=None,
              help="Registry folder holding the language's neurons, or one mask file (.parquet/.json/.safetensors, "
                   "as neuronreg fetch -o writes) [default: --registry].")
@o.which_selection_options
@click.option("--subset", default="lape", show_default=True, metavar="METHOD",
              help="lape: the language's neurons; random: as many per layer, drawn with --seed; ffn: all MLP "
                   "weights; full: all weights; lora / ia3: a PEFT adapter on the MLP projections (baselines).")
@click.option("--lora-r", type=click.IntRange(min=1), default=None, show_default="32",
              help="LoRA rank (--subset lora).")
@click.option("--lora-alpha", type=click.FloatRange(min=0, min_open=True), default=None, show_default="64",
              help="LoRA alpha (scaling alpha / r) (--subset lora).")
@click.option("--lora-dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
              show_default="0.1", help="Dropout on the LoRA input (--subset lora).")
@click.option("--target-modules", default=None, metavar="A,B,C",
              help="Modules the lora / ia3 adapter adapts, as PEFT matches them (a module name or its ending) "
                   "[default: the MLP projections: gate_proj,up_proj,down_proj for gated MLPs, the two "
                   "projections of plain ones].")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Optimizer steps.")
@o.batch_size_option(2, help="Rows per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@o.seq_len_option(512, minimum=2)
@o.tokens_option("100M", "Read at most this much training text.")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="AdamW learning rate.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True,
              help="AdamW decoupled weight decay (on the trainable weights only: the deltas).")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Gradient-norm clip (0: none).")
@click.option("--schedule", type=click.Choice(["constant", "linear", "cosine"]), default="constant",
              show_default=True, help="Learning-rate decay after warmup.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True,
              help="Linear warmup steps.")
@click.option("--eval-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Evaluate the validation loss every so many steps (the best evaluation is kept).")
@click.option("--eval-data", default=None,
              help="Validation text folder [default: the last 2% of the training rows].")
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=None,
              help="Checkpoint every so many steps [default: --eval-every].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the order of the training rows, of --subset random's neurons and of LoRA's dropout.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward to save memory "
              "(--checkpointing full).")
@click.option("--checkpointing", default=None, metavar="none|full|mlp|GiB",
              help="What the backward pass recomputes: none, full (every layer), mlp (only the MLP intermediates), "
                   "or a memory budget in GiB that chooses per layer [default: none].")
@click.option("--chunked-loss/--no-chunked-loss", default=None,
              help="Compute the loss over the vocabulary a few hundred tokens at a time, never holding the full "
                   "logits [default: when a batch's logits would take more than 256 MiB in float32].")
@o.device_map_option
@click.option("--quantize", type=click.Choice(["4bit"]), default=None,
              help="Store the frozen base's decoder projections in 4 bits (NF4, needs bitsandbytes) while training; "
                   "the float32 deltas or adapter apply to the full-precision base.")
@click.option("--merged", is_flag=True, help="Also save the merged full model (save_pretrained) in OUT/merged.")
@merge_dtype_option("Dtype of the merged weights (--merged) and of a dense run's saved weights "
                    "[default: the model's --dtype]; float32 keeps every bit of the training.")
@click.option("--overwrite", is_flag=True, help="Start again in a folder that holds a run.")
@o.model_source_options
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def finetune_cmd(ctx, model, language, data, out, mask_source, selection, which_top_rate, subset, lora_r, lora_alpha,
                 lora_dropout, target_modules, steps, batch_size, grad_accum, seq_len, tokens, lr, weight_decay, clip,
                 schedule, warmup_steps, eval_every, eval_data, checkpoint_every, seed, dtype, device,
                 gradient_checkpointing, checkpointing, chunked_loss, device_map, quantize, merged, merge_dtype,
                 overwrite,
                 text_field, name, trust_remote_code, token, registry, as_json, quiet):
    """Train only LANGUAGE's neurons of MODEL on its text (sparse fine-tuning), or a baseline subset.

    For each of the language's neurons, its gate and up rows and its down column are trained as
    small row-sparse deltas; everything else is frozen, and optimizer state scales with the
    neurons. The run folder gets delta.safetensors (the best validation checkpoint) and
    neuronreg_delta.json; an interrupted run resumes from its last checkpoint when the same
    command is run again. Load the result with neuronreg.load_sparse_model(OUT).

    The seed paper's baselines: --subset random, ffn, full, and lora / ia3 (a PEFT adapter on the
    MLP projections; OUT holds adapter_config.json and adapter_model.safetensors, which
    peft.PeftModel.from_pretrained loads). Whatever --dtype, the optimizer updates float32
    weights (deltas, adapters, or float32 master copies of dense weights). --merged reports what
    merging into --merge-dtype rounded away.

    Under torchrun, every process trains on its share of each batch (--batch-size rows each) and
    only the trained weights' gradients are exchanged; rank 0 writes the run folder.

    \b
    Example:
        neuronreg finetune ./my-model sw --mask ./reg --data ./texts --steps 200 --out runs/sw
        neuronreg finetune ./my-model sw --subset random --mask ./reg --data ./texts --out runs/sw-rand
        neuronreg finetune ./my-model sw --subset lora --lora-r 32 --data ./texts --out runs/sw-lora
        neuronreg finetune ./my-model sw --dtype bfloat16 --merged --merge-dtype float32 --mask ./reg \\
            --data ./texts --out runs/sw-bf16
        neuronreg finetune llama-3.1-8b mt --data ./texts --seq-len 512 --grad-accum 8 --merged --out runs/mt
        torchrun --nproc-per-node 8 -m neuronreg finetune llama-3.1-8b mt --data ./texts --out runs/mt
    """
    from ..finetune.config import FinetuneSettings
    from ..finetune.training import finetune

    setup_logging(quiet)
    options = {key: value for key, value in (("r", lora_r), ("alpha", lora_alpha), ("dropout", lora_dropout),
                                             ("target_modules", o.names(target_modules) or ()
                                              if target_modules is not None else None)) if value is not None}
    if gradient_checkpointing and checkpointing not in (None, "full"):
        raise click.UsageError("--gradient-checkpointing is --checkpointing full; give one of them.")
    settings = FinetuneSettings(
        data=data, out=out, subset=subset, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
        seq_len=seq_len, tokens=o.tokens(tokens), lr=lr, weight_decay=weight_decay, clip=clip,
        warmup_steps=warmup_steps, schedule=schedule, eval_every=eval_every, eval_data=eval_data,
        checkpoint_every=checkpoint_every, seed=seed,
        checkpointing=checkpointing or ("full" if gradient_checkpointing else "none"), chunked_loss=chunked_loss,
        quantize=quantize,
        text_field=text_field, merged=merged, merge_dtype=merge_dtype, options=options)
    mask_file = Path(mask_source) if mask_source and Path(mask_source).is_file() else None
    run = finetune(model, language, settings, load=o.load(dtype, device, token, trust_remote_code, device_map),
                   registry=o.registry(registry if mask_file or not mask_source else mask_source), mask=mask_file,
                   selection=o.selection(selection, which_top_rate), manifest=o.manifest(ctx), name=name,
                   overwrite=overwrite)
    if not run.is_main:
        return  # a rank other than 0 under torchrun: rank 0 reports
    config = run.config
    if as_json:
        json_result({"out": str(run.out), "resumed_from": run.resumed_from, "curve": run.curve,
                     "config": config.to_dict()})
    else:
        _curve(run.curve)
    status(quiet, f"Trained {config.trainable_parameters:,} weights ({100 * config.trainable_share:.3f}% of the "
                  f"model, subset {config.subset}); best validation loss at step {config.best_step}; wrote {run.out}")
    if config.merge is not None:
        status(quiet, config.merge.describe())


def _curve(curve: list[dict]) -> None:
    result(f"{'step':>6} {'train_loss':>10} {'val_loss':>10}")
    for point in curve:
        train = f"{point['train_loss']:.4f}" if "train_loss" in point else "-"
        result(f"{point['step']:>6} {train:>10} {point['val_loss']:>10.4f}")


@click.command(name="release")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@o.repo_option(required=True, help="Model repo on the Hub (org/name); created if missing.")
@click.option("--merged", is_flag=True, help="Also upload the merged full model at the repo root (for serving).")
@merge_dtype_option("Dtype of the merged weights (--merged) [default: as RUN/merged was merged, else the "
                    "model's dtype]; float32 keeps every bit of the training.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--license", default=None, help="The card's licence id (e.g. apache-2.0) [default: the base model's, "
              "as the manifest records it].")
@click.option("--base-model", default=None, metavar="ORG/NAME",
              help="The Hub id of a base the run knows only as a local folder: the card's base_model, the adapter's "
                   "base_model_name_or_path and the card's snippets name it.")
@o.commit_options
@click.option("-m", "--message", default=None, help="Commit message.")
@o.token_option
@o.json_option
@o.quiet_option
def release_cmd(run, repo, merged, merge_dtype, private, license, base_model, revision, tag, create_pr, message, token,
                as_json, quiet):
    """Publish a finetune run to a Hub model repo in ONE commit: delta, its JSON and a model card.

    With --merged the merged full model (config.json, safetensors, tokenizer) goes to the repo root
    too, so transformers and serving engines load the repo directly; what merging rounded away is
    reported. neuronreg.load_sparse_model(REPO) downloads only the delta and applies it to the
    base model. A lora / ia3 run is published as a PEFT adapter repo (in adapter/ with --merged).

    \b
    Example:
        neuronreg release runs/sw --repo acme/tiny-sw-lape
        neuronreg release runs/sw --repo acme/tiny-sw-lape --merged --private
        neuronreg release runs/sw-v2 --repo acme/tiny-sw-lape --tag v2 --create-pr
    """
    from ..finetune.release import release

    setup_logging(quiet)
    outcome = release(run, repo, merged=merged, private=private, token=token, message=message,
                      merge_dtype=merge_dtype, revision=revision, tag=tag, create_pr=create_pr, license=license,
                      base_model=base_model)
    if as_json:
        json_result({**asdict(outcome), "merge": outcome.merge.to_dict() if outcome.merge is not None else None})
        return
    if outcome.merge is not None:
        status(quiet, outcome.merge.describe())
    if outcome.license is None:
        status(quiet, "The card has no license: the base model's is not known. Give --license.")
    if not outcome.uploaded:
        status(quiet, f"{repo} already holds this release ({len(outcome.files)} files): no commit made.")
    else:
        kept = len(outcome.files) - len(outcome.uploaded)
        status(quiet, f"Uploaded {len(outcome.uploaded)} file(s) in one commit: {', '.join(outcome.uploaded)}"
                      + (f" ({kept} already there)" if kept else ""))
    result(outcome.pr_url or outcome.url or f"{repo}@{outcome.commit}")


@click.command(name="compose")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@o.out_option("The composed run's folder.", required=True)
@click.option("--rule", type=click.Choice(["sum", "mean", "first"]), default="sum", show_default=True,
              help="Where several runs change one neuron (or weight): the sum of their changes, their mean, or the "
                   "first run's.")
@click.option("--overwrite", is_flag=True, help="Replace a run in --out.")
@o.json_option
@o.quiet_option
def compose_cmd(runs, out, rule, overwrite, as_json, quiet):
    """Compose several languages' RUNS of one base into one run (one model for several languages).

    Row-sparse runs (lape, or random) compose into one delta over the union of their neurons; where
    two runs trained the same neuron the --rule decides, and the collisions are counted per layer.
    LoRA runs on the same modules compose into one adapter (the sum or mean of their updates), dense
    runs by task arithmetic (base + the sum or mean of their changes). The result is a run folder:
    evaluate, analyze, report, release and load_sparse_model take it. Runs of different kinds or
    bases, lape with random, and IA3 are refused (docs/compose.md says why).

    \b
    Example:
        neuronreg compose runs/sw-lape runs/yo-lape runs/hi-lape -o runs/sw+yo+hi
        neuronreg evaluate runs/sw+yo+hi runs/*-lape --data ./heldout --languages sw,yo,hi,en
        neuronreg report runs/sw+yo+hi runs/*-lape -o report/
    """
    from ..finetune.compose import compose

    setup_logging(quiet)
    done = compose(list(runs), out, rule=rule, overwrite=overwrite)
    composition = done.config.composition
    if as_json:
        json_result({"out": str(done.out), "rule": rule, "parts": [p.to_dict() for p in composition.parts],
                     "collisions": composition.collisions, "collided_weights": composition.collided_weights,
                     "trainable_parameters": done.config.trainable_parameters})
        return
    result(f"{'part':<28} {'subset':<7} {'language':<9} {'weights':>12}")
    for part in composition.parts:
        result(f"{part.run:<28} {part.subset:<7} {part.language.code:<9} {part.trainable_parameters:>12,}")
    if done.collisions is not None:
        result(f"neurons trained by two runs or more, per layer: {' '.join(map(str, done.collisions))} "
               f"(total {sum(done.collisions):,}; rule {rule})")
    elif composition.collided_weights is not None:
        result(f"weights changed by two runs or more: {composition.collided_weights:,} (rule {rule})")
    status(quiet, f"Composed {len(composition.parts)} runs into {done.out}: {done.config.trainable_parameters:,} "
                  "weights")


COMMANDS = [finetune_cmd, release_cmd, compose_cmd]
