"""``neuronreg ablate``: switch off each language's neurons and measure perplexity on every language."""

from __future__ import annotations

import click

from . import _options as o
from ._output import result, setup_logging, status


@click.command(name="ablate")
@click.argument("model")
@o.languages_option("Languages whose neurons to switch off and on which to measure [default: every language "
                    "selected for MODEL].")
@click.option("--data", required=True,
              help="Held-out text: a folder with one <language>.txt/.jsonl/.parquet per language, NOT the text the "
                   "masks were computed from.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for ablation.json, ablation.csv, measurements.csv and ablation.png.")
@o.tokens_option("100k", "Held-out tokens to evaluate per language.")
@o.seq_len_option(1024)
@o.batch_size_option(4)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random control mask.")
@click.option("--exclusive", is_flag=True,
              help="Switch off only the neurons of a language that no other of the languages holds.")
@click.option("--allow-same-text", is_flag=True,
              help="Evaluate even on the very text a mask was computed from (with a warning).")
@o.which_selection_options
@o.dtype_option
@o.device_option
@o.model_source_options
@o.registry_option
@o.quiet_option
@click.pass_context
def ablate_cmd(ctx, model, languages, data, out, tokens, seq_len, batch_size, seed, exclusive, allow_same_text,
               selection, which_top_rate, dtype, device, text_field, name, trust_remote_code, token, registry, quiet):
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
    from ..evaluation.ablation import AblationSettings, ablate, save_report, table_lines
    from ..files import output_folder

    setup_logging(quiet)
    output_folder(out)
    settings = AblationSettings(data=data, tokens=o.tokens(tokens), seq_len=seq_len, batch_size=batch_size,
                                dtype=dtype, device=device, text_field=text_field, seed=seed,
                                allow_same_text=allow_same_text, exclusive=exclusive, selection=selection,
                                top_rate=which_top_rate)
    report = ablate(model, o.names(languages), manifest=o.manifest(ctx), registry=o.registry(registry),
                    settings=settings, name=name, quiet=quiet, trust_remote_code=trust_remote_code, token=token)
    paths = save_report(report, out)
    for line in table_lines(report):
        result(line)
    result()
    for line in report.summary_lines():
        result(line)
    status(quiet, f"Wrote {', '.join(str(p) for p in paths.values())}")


COMMANDS = [ablate_cmd]
