"""``neuronreg ablate``: switch off each language's neurons and measure perplexity on every language.

A thin command over :mod:`neuronreg.ablation`; it registers itself on the root group when imported.
"""

from __future__ import annotations

import click

from .cli import (
    device_option,
    _manifest,
    _registry,
    _setup_logging,
    _split_languages,
    cli,
    model_source_options,
    quiet_option,
    registry_option,
)


@click.command(name="ablate")
@click.argument("model")
@click.option("--languages", "langs", multiple=True,
              help="Languages whose neurons to switch off and on which to measure (comma-separated) "
                   "[default: every language selected for MODEL].")
@click.option("--data", required=True,
              help="Held-out text: a folder with one <language>.txt/.jsonl/.parquet per language, NOT the text the "
                   "masks were computed from.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for ablation.json, ablation.csv, measurements.csv and ablation.png.")
@click.option("--tokens", default="100k", show_default=True, help="Held-out tokens to evaluate per language.")
@click.option("--seq-len", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Length of the packed token rows.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Rows per forward pass.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random control mask.")
@click.option("--exclusive", is_flag=True,
              help="Switch off only the neurons of a language that no other of the languages holds.")
@click.option("--allow-same-text", is_flag=True,
              help="Evaluate even on the very text a mask was computed from (with a warning).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Weights' dtype (auto: bfloat16 on CUDA, float32 on CPU).")
@device_option
@model_source_options
@registry_option
@quiet_option
@click.pass_context
def ablate_cmd(ctx, model, langs, data, out, tokens, seq_len, batch_size, seed, exclusive, allow_same_text, dtype,
               device, text_field, name, trust_remote_code, token, registry, quiet):
    """Switch off each language's neurons in turn and measure perplexity on every language.

    For every language's mask in the registry, and for a random control mask with the mean count
    per layer, the neurons' activations are set to zero during the forward pass (the weights are
    not touched) and perplexity and bits per character are measured on each language's held-out
    text. Prints the perplexity-change table and, per language, whether switching off its own
    neurons hurts it more than the others (own increase / others' mean increase).

    \b
    Example:
        neuronreg ablate smollm2-135m --languages en,de,fr,es,ru,zh --data ./heldout --out ablation/
        neuronreg ablate ./my-model --data ./heldout --out ablation/ --tokens 20k --registry ./reg
    """
    from .ablation import AblationSettings, ablate, output_folder, save_report, table_lines
    from .corpus import parse_tokens

    _setup_logging(quiet)
    output_folder(out)
    settings = AblationSettings(data=data, tokens=parse_tokens(tokens), seq_len=seq_len, batch_size=batch_size,
                                dtype=dtype, device=device, text_field=text_field, seed=seed,
                                allow_same_text=allow_same_text, exclusive=exclusive)
    report = ablate(model, _split_languages(langs), manifest=_manifest(ctx), registry=_registry(registry),
                    settings=settings, name=name, quiet=quiet, trust_remote_code=trust_remote_code, token=token)
    paths = save_report(report, out)
    for line in table_lines(report):
        click.echo(line)
    click.echo()
    for line in report.summary_lines():
        click.echo(line)
    if not quiet:
        click.echo(f"Wrote {', '.join(str(p) for p in paths.values())}", err=True)


cli.add_command(ablate_cmd)
