"""``neuronreg overlap``: how the neuron sets of a model's languages overlap."""

from __future__ import annotations

import click

from . import _options as o
from ._output import json_result, result, setup_logging, status


@click.command(name="overlap")
@click.argument("model")
@o.languages_option("Languages to compare, in the order of the table [default: every language selected for MODEL, "
                    "by script].")
@o.out_option("Folder for overlap.json, jaccard.csv, shared_core.csv, overlap.png and per_layer.png.", required=True)
@o.which_selection_options
@click.option("--against", default=None,
              help="Also compare with this other selection of MODEL (a name, or a top rate such as 0.05 or 5%): how "
                   "each language's mask sits inside it.")
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def overlap_cmd(ctx, model, languages, out, selection, which_top_rate, against, registry, as_json, quiet):
    """Compare the languages' neurons of a model: Jaccard matrix, neurons per layer, shared core.

    Reads the selected neurons of MODEL's languages from the registry (no model is loaded) and
    prints the Jaccard index |A ∩ B| / |A ∪ B| of every pair of languages and the shared core
    (neurons held by at least k of the languages, for every k). Writes the matrix and the counts
    as JSON and CSV, the heatmap (languages grouped by script) and neurons per layer as PNG.

    With --against, also how each language's mask of the chosen selection sits inside its mask of
    the other one (e.g. how the 1% set sits inside the 5% set).

    \b
    Example:
        neuronreg overlap smollm2-135m --out overlap/
        neuronreg overlap mistral-nemo --languages sw,mt,is,en --out overlap/ --json
        neuronreg overlap mistral-nemo --top-rate 0.01 --against 0.05 --out overlap/
    """
    from ..files import output_folder
    from ..overlap import containment, overlap
    from ..store.masks import find_masks
    from ._tables import core_line, jaccard_table

    setup_logging(quiet)
    output_folder(out)
    manifest, reg = o.manifest(ctx), o.registry(registry)
    names = o.names(languages)
    found = find_masks(model, names, selection=o.selection(selection, which_top_rate), registry=reg,
                       manifest=manifest)
    name, masks = found.model, found.masks
    report = overlap(masks, manifest, order=found.languages if names else None)
    inside = None
    if against is not None:
        other = reg.selection(name, o.selection(against))
        theirs = find_masks(name, [c for c in found.languages if c in other.languages], selection=other.name,
                            registry=reg, manifest=manifest).masks
        inside = {"selection": found.selection, "against": other.name,
                  "languages": {lang: c.to_json() for lang, c in containment(masks, theirs).items()}}
        report.extra = {"containment": inside}
    paths = report.save(out)
    if as_json:
        json_result(report.to_json())
    else:
        result(f"selection {found.selection} of {name}")
        for line in jaccard_table(report):
            result(line)
        result()
        result(core_line(report))
        if inside is not None:
            result()
            result(f"{found.selection} inside {inside['against']}: {'language':<10} {'neurons':>8} {'inside':>8} "
                   f"{'share':>7} {'jaccard':>8}")
            for lang, c in inside["languages"].items():
                share = "-" if c["contained"] is None else f"{c['contained']:.2f}"
                result(f"{'':<{len(found.selection) + len(inside['against']) + 9}}{lang:<10} {c['small']:>8} "
                       f"{c['shared']:>8} {share:>7} {c['jaccard']:>8.2f}")
    status(quiet, f"Wrote {', '.join(str(p) for p in paths.values())}")


COMMANDS = [overlap_cmd]
