"""Commands that move masks in and out: publish and fetch (the Hub), import and export (the LAPE
authors' files)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from . import _options as o
from ._output import json_result, result, setup_logging, status


@click.command(name="publish")
@click.argument("models", nargs=-1)
@o.repo_option(required=True, help="Dataset repo on the Hub (org/name); created if missing.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@o.commit_options
@click.option("-m", "--message", default=None, help="Commit message.")
@o.token_option
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def publish_cmd(ctx, models, repo, private, tag, revision, create_pr, message, token, registry, as_json, quiet):
    """Publish the local registry (or some MODELS of it) to a Hub dataset repo in ONE commit.

    Uploads each model's neuron files, raw counts and a plot, and a dataset card whose configs make
    `datasets.load_dataset(REPO, MODEL, split=LANG)` work. Publishing what is already there makes
    no commit; a failed publish leaves the repo as it was.

    \b
    Example:
        neuronreg publish --repo acme/lape-neurons
        neuronreg publish mistral-nemo --repo acme/lape-neurons --private --tag v1.0
    """
    from ..store.hub import publish

    setup_logging(quiet)
    outcome = publish(o.registry(registry), repo, list(models) or None, private=private, tag=tag, revision=revision,
                      create_pr=create_pr, token=token, message=message, manifest=o.manifest(ctx))
    if as_json:
        json_result(asdict(outcome))
        return
    there = f"{outcome.present} file(s), {_bytes(outcome.present_bytes)}, already there"
    if not outcome.changed:
        status(quiet, f"{repo} already holds this registry ({there}): no commit made.")
    else:
        status(quiet, f"Uploaded {len(outcome.uploaded)} file(s) ({_bytes(outcome.sent_bytes)} sent; {there}), "
                      f"deleted {len(outcome.deleted)}, in one commit.")
    result(outcome.pull_request or outcome.url or f"{repo}@{outcome.commit}")


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


@click.command(name="fetch")
@click.argument("model")
@click.argument("language")
@o.which_selection_options
@o.repo_option(help="Dataset repo on the Hub [default: the manifest's registry repo].")
@o.revision_option
@click.option("--format", "fmt", type=click.Choice(["parquet", "json", "pt", "safetensors"]), default=None,
              help="File format [default: from -o's suffix; json on stdout without -o].")
@o.out_option("Where to write the mask [default: its JSON on stdout].", folder=False, old_output=True)
@o.token_option
@o.json_option
@o.quiet_option
@click.pass_context
def fetch_cmd(ctx, model, language, selection, which_top_rate, repo, revision, fmt, out, token, as_json, quiet):
    """Fetch one language's neurons from the Hub (only that file, through the Hub cache).

    Prints a summary on stderr (neurons per layer, total, share of parameters, source commit) and
    writes the mask: parquet (as published), json, pt (the LAPE authors' list[layer] -> LongTensor)
    or safetensors; without -o, its JSON goes to stdout. With -o, stdout gets the file's path (with
    --json, the path and the summary as JSON). A second fetch, and HF_HUB_OFFLINE=1, are served from
    the cache.

    \b
    Example:
        neuronreg fetch mistral-nemo sw
        neuronreg fetch mistral-nemo sw --top-rate 0.05 -o sw.parquet
        neuronreg fetch mistral-nemo sw --repo acme/lape-neurons --revision v1.0 --format pt -o sw.pt
    """
    from ..mask import format_from_suffix
    from ..store.masks import find_masks
    from ._tables import format_share

    setup_logging(quiet)
    if out is None and fmt not in (None, "json"):
        raise click.UsageError(f"--format {fmt} writes a binary file: give -o FILE.")
    manifest = o.manifest(ctx)
    repo = repo or manifest.registry_repo
    found = find_masks(model, [language], selection=o.selection(selection, which_top_rate), repo=repo,
                       revision=revision, manifest=manifest, token=token)
    mask = found.one()
    status(quiet, f"{found.model} {mask.language} ({found.selection}): {len(mask)} neurons, "
                  f"{format_share(mask.share_of_parameters())} of parameters, "
                  f"from {repo}@{mask.source.commit[:12]}")
    status(quiet, "per layer: " + " ".join(str(n) for n in mask.counts_per_layer()))
    if out is None:
        result(json.dumps(mask.to_json()))  # the mask itself is the result, --json or not
        return
    path = mask.save(out, fmt or format_from_suffix(Path(out)))
    if as_json:
        json_result({"path": str(path), "model": found.model, "language": mask.language,
                     "selection": found.selection, "neurons": len(mask), "per_layer": mask.counts_per_layer(),
                     "share_of_parameters": mask.share_of_parameters(), "source": mask.source.to_dict()})
        return
    result(str(path))


@click.command(name="import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_spec", required=True,
              help="Model (alias, Hub id or registry name) the masks belong to.")
@click.option("--languages", required=True, help="The file's languages, in its order (comma-separated).")
@click.option("--top-rate", type=float, default=None, help="The top rate the masks were made with (recorded).")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Layer count, if the model is not in the "
                                                                         "manifest.")
@click.option("--intermediate-size", type=click.IntRange(min=1), default=None, help="MLP width, likewise.")
@click.option("--hidden-size", type=click.IntRange(min=1), default=None, help="Hidden size (for the share of "
                                                                               "parameters).")
@o.name_option
@o.default_option
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def import_cmd(ctx, path, model_spec, languages, top_rate, layers, intermediate_size, hidden_size, name, make_default,
               registry, as_json, quiet):
    """Import a LAPE neuron file (list[language][layer] -> LongTensor, .pt/.pth) into the registry.

    The files of the LAPE authors and of the seed paper hold no language names: give them in the
    file's order. Imported entries have no counts; their provenance says they were imported.

    \b
    Example:
        neuronreg import llama-3.1-5.pt --model llama-3.1-8b --top-rate 0.05 \\
            --languages mt,af,is,cy,mk,lv,lt,sl,sk,et,ka,ne
    """
    from ..resolve import languages as resolve_languages
    from ..store.authors import import_lape, model_shape

    setup_logging(quiet)
    manifest, reg = o.manifest(ctx), o.registry(registry)
    shape = model_shape(model_spec, manifest, num_layers=layers, intermediate_size=intermediate_size,
                        hidden_size=hidden_size, name=name, registry=reg)
    masks = import_lape(Path(path), shape, resolve_languages(languages, manifest), reg, top_rate, default=make_default)
    selection = next(iter(masks.values())).source.selection
    default = reg.index().models[shape.name].default == selection
    if as_json:
        json_result({"model": shape.name, "registry": str(reg.root), "selection": selection, "default": default,
                     "num_layers": shape.num_layers, "intermediate_size": shape.intermediate_size,
                     "neurons": {code: len(mask) for code, mask in masks.items()}})
        return
    result(f"{'language':<10} {'neurons':>8}")
    for code, mask in masks.items():
        result(f"{code:<10} {len(mask):>8}")
    status(quiet, f"Imported {len(masks)} languages of {model_spec} as {shape.name} into {reg.root} (selection "
                  f"{selection}{', the default' if default else ''})")


@click.command(name="export")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["lape-pt"]), default="lape-pt", show_default=True,
              help="lape-pt: the authors' list[language][layer] -> LongTensor.")
@o.out_option("File to write.", required=True, folder=False, old_output=True)
@o.languages_option("Languages and their order [default: the selection's order].")
@o.which_selection_options
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def export_cmd(ctx, model, fmt, out, languages, selection, which_top_rate, registry, as_json, quiet):
    """Export a model's masks to the LAPE authors' format, for their scripts.

    \b
    Example:
        neuronreg export llama-3.1-8b --format lape-pt -o llama-3.1-5.pt
    """
    from ..store.authors import export_lape, save_lape
    from ..store.masks import find_masks

    setup_logging(quiet)
    found = find_masks(model, o.names(languages), selection=o.selection(selection, which_top_rate),
                       registry=registry, manifest=o.manifest(ctx))
    masks, codes = export_lape(found, in_given_order=bool(languages))
    save_lape(masks, Path(out))
    if as_json:
        json_result({"path": str(out), "format": fmt, "model": found.model, "selection": found.selection,
                     "languages": codes, "neurons": {code: len(found.masks[code]) for code in codes}})
        return
    result(str(out))
    status(quiet, f"Wrote {len(codes)} languages of {found.model} ({found.selection}) in this order: "
                  f"{','.join(codes)}")


COMMANDS = [publish_cmd, fetch_cmd, import_cmd, export_cmd]
