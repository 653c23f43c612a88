"""``neuronreg finetune``: train only one language's neurons (or a baseline subset) on its text.

A thin command over :mod:`neuronreg.finetune`; it registers itself on the root group when imported.
"""

from __future__ import annotations

import click

from .cli import (
    _manifest,
    _registry,
    _setup_logging,
    cli,
    model_source_options,
    device_option,
    model_name_option,
    quiet_option,
    registry_option,
    text_field_option,
    token_option,
    trust_remote_code_option,
)


@click.command(name="finetune")
@click.argument("model")
@click.argument("language")
@click.option("--data", required=True,
              help="Training text: a folder with one <language>.txt/.jsonl/.parquet per language (like --corpus).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: delta.safetensors, neuronreg_delta.json, checkpoint.pt while running.")
@click.option("--mask", "mask_source", type=click.Path(), default=None,
              help="Registry folder holding the language's neurons, or one mask .parquet file (neuronreg fetch -o) "
                   "[default: --registry].")
@click.option("--subset", type=click.Choice(["lape", "random", "ffn", "full"]), default="lape", show_default=True,
              help="lape: the language's neurons; random: as many per layer, drawn with --seed; ffn: all MLP "
                   "weights; full: all weights.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True, help="Rows per micro-batch.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Length of packed rows.")
@click.option("--tokens", default="100M", show_default=True, help="Read at most this much training text.")
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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the data order and random subset.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Weights' dtype (auto: bfloat16 on CUDA, float32 on CPU); deltas are always float32.")
@device_option
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute activations in backward to save memory.")
@click.option("--merged", is_flag=True, help="Also save the merged full model (save_pretrained) in OUT/merged.")
@click.option("--overwrite", is_flag=True, help="Start again in a folder that holds a run.")
@model_source_options
@registry_option
@quiet_option
@click.pass_context
def finetune_cmd(ctx, model, language, data, out, mask_source, subset, steps, batch_size, grad_accum, seq_len, tokens,
                 lr, weight_decay, clip, schedule, warmup_steps, eval_every, eval_data, checkpoint_every, seed, dtype,
                 device, gradient_checkpointing, merged, overwrite, text_field, name, trust_remote_code, token,
                 registry, quiet):
    """Train only LANGUAGE's neurons of MODEL on its text (sparse fine-tuning), or a baseline subset.

    For each of the language's neurons, its gate and up rows and its down column are trained as
    small row-sparse deltas; everything else is frozen, and optimizer state scales with the
    neurons. The run folder gets delta.safetensors (the best validation checkpoint) and
    neuronreg_delta.json; an interrupted run resumes from its last checkpoint when the same
    command is run again. Load the result with neuronreg.load_sparse_model(OUT).

    \b
    Example:
        neuronreg finetune ./my-model sw --mask ./reg --data ./texts --steps 200 --out runs/sw
        neuronreg finetune ./my-model sw --subset random --mask ./reg --data ./texts --out runs/sw-rand
        neuronreg finetune llama-3.1-8b mt --data ./texts --seq-len 512 --grad-accum 8 --merged --out runs/mt
    """
    from .corpus import parse_tokens
    from .finetune import FinetuneSettings, finetune

    _setup_logging(quiet)
    settings = FinetuneSettings(
        data=data, out=out, subset=subset, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
        seq_len=seq_len, tokens=parse_tokens(tokens), lr=lr, weight_decay=weight_decay, clip=clip,
        warmup_steps=warmup_steps, schedule=schedule, eval_every=eval_every, eval_data=eval_data,
        checkpoint_every=checkpoint_every, seed=seed, dtype=dtype, device=device,
        gradient_checkpointing=gradient_checkpointing, text_field=text_field, merged=merged)
    from pathlib import Path

    source = Path(mask_source) if mask_source and Path(mask_source).is_file() else _registry(mask_source or registry)
    result = finetune(model, language, manifest=_manifest(ctx), registry=source,
                      settings=settings, name=name, overwrite=overwrite, quiet=quiet,
                      trust_remote_code=trust_remote_code, token=token)
    config = result.config
    click.echo(f"{'step':>6} {'train_loss':>10} {'val_loss':>10}")
    for point in result.curve:
        train = f"{point['train_loss']:.4f}" if "train_loss" in point else "-"
        click.echo(f"{point['step']:>6} {train:>10} {point['val_loss']:>10.4f}")
    if not quiet:
        share = 100 * config["trainable_share"]
        click.echo(f"Trained {config['trainable_parameters']:,} weights ({share:.3f}% of the "
                   f"model, subset {config['subset']}); best validation loss at step {config['best_step']}; wrote "
                   f"{result.out}", err=True)


cli.add_command(finetune_cmd)


@click.command(name="evaluate")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, help="Held-out text: a folder with one <language>.txt/.jsonl/.parquet each.")
@click.option("--languages", "langs", multiple=True,
              help="Languages to measure (comma-separated) [default: the language the run trained].")
@click.option("--tokens", default="100k", show_default=True, help="Held-out tokens per language.")
@click.option("--seq-len", type=click.IntRange(min=2), default=512, show_default=True, help="Length of packed rows.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Rows per forward pass.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="Weights' dtype [default: the run's].")
@device_option
@text_field_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@trust_remote_code_option
@token_option
@quiet_option
@click.pass_context
def evaluate_cmd(ctx, run, data, langs, tokens, seq_len, batch_size, dtype, device, text_field, as_json,
                 trust_remote_code, token, quiet):
    """Perplexity per language before and after a finetune run, on held-out text.

    Loads the run's base model, then the base with the run's delta merged, and measures the mean
    next-token loss on each language's held-out text (packed like the training text).

    \b
    Example:
        neuronreg evaluate runs/sw --data ./heldout --languages sw,en
    """
    import json

    from .cli import _split_languages
    from .corpus import parse_tokens
    from .finetune import evaluate_run

    _setup_logging(quiet)
    result = evaluate_run(run, data, _split_languages(langs), manifest=_manifest(ctx), tokens=parse_tokens(tokens),
                          seq_len=seq_len, batch_size=batch_size, dtype=dtype, device=device, text_field=text_field,
                          token=token, trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps({"run": str(result.run), "trained_language": result.language, "scores": result.scores},
                              indent=2))
        return
    for line in result.lines():
        click.echo(line)


cli.add_command(evaluate_cmd)


@click.command(name="release")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.option("--repo", required=True, help="Model repo on the Hub (org/name); created if missing.")
@click.option("--merged", is_flag=True, help="Also upload the merged full model at the repo root (for serving).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("-m", "--message", default=None, help="Commit message.")
@token_option
@quiet_option
def release_cmd(run, repo, merged, private, message, token, quiet):
    """Publish a finetune run to a Hub model repo in ONE commit: delta, its JSON and a model card.

    With --merged the merged full model (config.json, safetensors, tokenizer) goes to the repo root
    too, so transformers and serving engines load the repo directly.
    neuronreg.load_sparse_model(REPO) downloads only the delta and applies it to the base model.

    \b
    Example:
        neuronreg release runs/sw --repo acme/tiny-sw-lape
        neuronreg release runs/sw --repo acme/tiny-sw-lape --merged --private
    """
    from .release import release

    result = release(run, repo, merged=merged, private=private, token=token, message=message)
    if not quiet:
        click.echo(f"Uploaded {len(result.files)} file(s) in one commit: {', '.join(result.files)}", err=True)
    click.echo(result.url or f"{repo}@{result.commit}")


cli.add_command(release_cmd)
