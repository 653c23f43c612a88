"""``neuronreg overlap``: how the neuron sets of a model's languages overlap."""

from __future__ import annotations

import json

import click

from . import _options as o
from ._output import result, status


@click.command(name="overlap")
@click.argument("model")
@o.languages_option("Languages to compare, in the order of the table [default: every language selected for MODEL, "
                    "by script].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for overlap.json, jaccard.csv, shared_core.csv, overlap.png and per_layer.png.")
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def overlap_cmd(ctx, model, languages, out, registry, as_json, quiet):
    """Compare the languages' neurons of a model: Jaccard matrix, neurons per layer, shared core.

    Reads the selected neurons of MODEL's languages from the registry (no model is loaded) and
    prints the Jaccard index |A ∩ B| / |A ∪ B| of every pair of languages and the shared core
    (neurons held by at least k of the languages, for every k). Writes the matrix and the counts
    as JSON and CSV, the heatmap (languages grouped by script) and neurons per layer as PNG.

    \b
    Example:
        neuronreg overlap smollm2-135m --out overlap/
        neuronreg overlap mistral-nemo --languages sw,mt,is,en --out overlap/ --json
    """
    from ..evaluation.ablation import output_folder
    from ..evaluation.overlap import overlap
    from ..resolve import language_codes, resolve_model

    output_folder(out)
    manifest, reg = o.manifest(ctx), o.registry(registry)
    name = resolve_model(model, manifest, registry=reg).name
    names = o.names(languages)
    codes = language_codes(names, manifest, reg.selected_languages(name)) if names else reg.selected_languages(name)
    report = overlap(reg.read_masks(name, codes), manifest, order=codes if names else None)
    paths = report.save(out)
    if as_json:
        result(json.dumps(report.to_json(), indent=1, ensure_ascii=False))
    else:
        for line in report.table_lines():
            result(line)
        result()
        for line in report.core_lines():
            result(line)
    status(quiet, f"Wrote {', '.join(str(p) for p in paths.values())}")


COMMANDS = [overlap_cmd]
