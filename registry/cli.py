"""The ``neuronreg`` command line: thin Click commands over the library.

Results go to stdout; progress, warnings and errors to stderr. Library errors become one-line
messages here and nowhere else (set NEURONREG_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from . import __version__
from .errors import NeuronregError

DEBUG_ENV = "NEURONREG_DEBUG"


class NeuronregGroup(click.Group):
    """Turns expected errors into ``Error: ...`` on stderr with exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NeuronregError as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            if _other_rank():
                sys.exit(1)  # under torchrun every rank fails alike; rank 0 alone says why
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted. Run the same command again to resume from the last checkpoint.", err=True)
            sys.exit(130)


def _other_rank() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("neuronreg")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


# -- options shared by several commands ---------------------------------------------------------
def registry_option(f):
    return click.option(
        "--registry", type=click.Path(file_okay=False), envvar="NEURONREG_REGISTRY", default=None,
        help="Local registry folder [env NEURONREG_REGISTRY; default ~/.cache/neuronreg/registry].",
    )(f)


def quiet_option(f):
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars or status lines (stderr).")(f)


def selection_options(f):
    f = click.option("--bar-ratio", type=float, default=0.95, show_default=True,
                     help="Quantile of all activation probabilities above which a selected neuron belongs to a language.")(f)
    f = click.option("--filter-rate", type=float, default=0.95, show_default=True,
                     help="Quantile a neuron's activation probability must exceed for some language.")(f)
    f = click.option("--top-rate", type=float, default=0.01, show_default=True,
                     help="Share of all neurons to select (the seed paper released 0.05).")(f)
    return f


def repo_option(required: bool = False, help: str = "Dataset repo on the Hub (org/name)."):
    def decorate(f):
        return click.option("--repo", required=required, default=None, help=help)(f)

    return decorate


def revision_option(f):
    return click.option("--revision", default=None, help="Branch, tag or commit on the Hub [default: main].")(f)


def token_option(f):
    return click.option("--token", default=None,
                        help="Hub token [default: HF_TOKEN or your Hub login]; never printed.")(f)


def device_option(f):
    return click.option("--device", default=None, help="cuda, cuda:1, cpu ... [default: cuda when present, else cpu].")(f)


def text_field_option(f):
    return click.option("--text-field", default=None,
                        help="Field holding the text in .jsonl/.parquet/Hub corpora [default: text].")(f)


def model_name_option(f):
    return click.option("--name", default=None,
                        help="Name of the model in the registry [default: its alias, Hub id or folder name].")(f)


def trust_remote_code_option(f):
    return click.option("--trust-remote-code", is_flag=True,
                        help="Run the model repository's own Python code (off by default).")(f)


def model_source_options(f):
    """How a model is found and loaded: its registry name, its text field, remote code, token."""
    for option in (token_option, trust_remote_code_option, model_name_option, text_field_option):
        f = option(f)
    return f


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def _manifest(ctx: click.Context):
    from .manifest import load_manifest

    return load_manifest(ctx.obj.get("manifest"))


def _registry(path):
    from .store import LocalRegistry

    return LocalRegistry(path)


def _params(top_rate, filter_rate, bar_ratio):
    from .selection import SelectionParams

    return SelectionParams(top_rate=top_rate, filter_rate=filter_rate, activation_bar_ratio=bar_ratio)


def _status(quiet: bool, message: str) -> None:
    if not quiet:
        click.echo(message, err=True)


def _split_languages(values) -> list[str] | None:
    if not values:
        return None
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


@click.group(cls=NeuronregGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="neuronreg")
@click.option("--manifest", type=click.Path(dir_okay=False), envvar="NEURONREG_MANIFEST", default=None,
              help="A manifest.json of your own [env NEURONREG_MANIFEST; default: the packaged one].")
@click.pass_context
def cli(ctx, manifest):
    """Language-specific neurons (LAPE): compute them, keep them in a registry, share them.

    \b
    Example:
        neuronreg compute ./my-model en de sw --corpus ./texts --tokens 2M
        neuronreg show my-model sw
    """
    ctx.ensure_object(dict)
    ctx.obj["manifest"] = manifest


@cli.command(name="compute")
@click.argument("model")
@click.argument("languages", nargs=-1, required=True)
@click.option("--corpus", default="hf", show_default=True,
              help="A folder with one <language>.txt/.jsonl/.parquet per language, 'hf' for the manifest's Hub "
                   "corpus (GlotCC-V1), or hf:DATASET[:CONFIG].")
@click.option("--tokens", default="13M", show_default=True, help="Tokens to count per language (e.g. 500k, 2M, 100M).")
@click.option("--seq-len", type=click.IntRange(min=1), default=1024, show_default=True, help="Length of the packed token rows.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Rows per forward pass.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="Weights' dtype (auto: bfloat16 on CUDA, float32 on CPU).")
@device_option
@click.option("--device-map", default=None, type=click.Choice(["auto"]),
              help="Split one model too large for a GPU over all GPUs (needs accelerate).")
@text_field_option
@model_name_option
@click.option("--languages", "select_langs", multiple=True,
              help="Languages to select over (comma-separated) [default: all counted for the model].")
@selection_options
@click.option("--checkpoint-tokens", default="1M", show_default=True, help="Save progress every so many tokens.")
@click.option("--force", is_flag=True, help="Recount languages already in the registry.")
@trust_remote_code_option
@token_option
@registry_option
@quiet_option
@click.pass_context
def compute_cmd(ctx, model, languages, corpus, tokens, seq_len, batch_size, dtype, device, device_map, text_field, name,
                select_langs, top_rate, filter_rate, bar_ratio, checkpoint_tokens, force, trust_remote_code, token,
                registry, quiet):
    """Count how often each MLP neuron fires on each language's text, then select LAPE neurons.

    MODEL is a manifest alias (neuronreg models), a Hub id or a local folder. LANGUAGES are codes or
    names (sw, swa, Swahili). Counts are stored per language and reused: a language already counted
    with the same settings is skipped, and an interrupted run resumes from its last checkpoint.

    Under torchrun, every process counts a share of the rows and the counts are summed exactly.

    \b
    Example:
        neuronreg compute ./my-model en de sw --corpus ./texts --tokens 2M --registry ./reg
        neuronreg compute mistral-nemo sw mt is --corpus hf
        torchrun --nproc-per-node 8 -m neuronreg compute mistral-nemo sw mt is --corpus hf
    """
    from .compute import CountSettings, compute
    from .corpus import parse_tokens

    _setup_logging(quiet)
    settings = CountSettings(corpus=corpus, tokens=parse_tokens(tokens), seq_len=seq_len, batch_size=batch_size,
                             dtype=dtype, device=device, text_field=text_field,
                             checkpoint_tokens=parse_tokens(checkpoint_tokens), device_map=device_map)
    report = compute(
        model, list(languages), manifest=_manifest(ctx), registry=_registry(registry), settings=settings,
        params=_params(top_rate, filter_rate, bar_ratio), select_languages=_split_languages(select_langs), name=name,
        force=force, quiet=quiet, trust_remote_code=trust_remote_code, token=token,
    )
    selection = report.selection
    if selection is None:
        return  # a rank other than 0 under torchrun: rank 0 reports
    click.echo(f"{'language':<10} {'status':<10} {'tokens':>12} {'neurons':>8}")
    for result in report.languages:
        neurons = len(selection.neurons[result.code]) if result.code in selection.neurons else "-"
        click.echo(f"{result.code:<10} {result.status:<10} {result.tokens:>12,} {neurons:>8}")
    _status(quiet, f"Selected {selection.selected} neurons over {len(selection.languages)} languages of "
                   f"{report.model}; registry: {report.registry}")


@cli.command(name="select")
@click.argument("model")
@click.option("--languages", "select_langs", multiple=True,
              help="Languages to select over (comma-separated) [default: all counted for the model].")
@selection_options
@registry_option
@quiet_option
@click.pass_context
def select_cmd(ctx, model, select_langs, top_rate, filter_rate, bar_ratio, registry, quiet):
    """Select neurons again from stored counts, with other parameters or languages. No model needed.

    The model's neuron files are replaced by the new selection (counts are kept).

    \b
    Example:
        neuronreg select mistral-nemo --top-rate 0.05
        neuronreg select mistral-nemo --languages sw,mt,is
    """
    from .compute import resolve_languages, select

    _setup_logging(quiet)
    langs = _split_languages(select_langs)
    if langs:
        langs = [lang.code for lang in resolve_languages(langs, _manifest(ctx))]
    selection = select(model, registry=_registry(registry), params=_params(top_rate, filter_rate, bar_ratio),
                       languages=langs)
    click.echo(f"{'language':<10} {'neurons':>8}")
    for lang in selection.languages:
        click.echo(f"{lang:<10} {len(selection.neurons[lang]):>8}")
    _status(quiet, f"Selected {selection.selected} neurons (threshold {selection.filter_threshold:.6g}, "
                   f"bar {selection.activation_bar:.6g}).")


@cli.command(name="ls")
@registry_option
@json_option
def ls_cmd(registry, as_json):
    """List what the registry holds: models, counted and selected languages.

    \b
    Example:
        neuronreg ls
        neuronreg ls --registry ./reg --json
    """
    reg = _registry(registry)
    rows = []
    for model in reg.models():
        rows.append({"model": model, "counted": reg.counted_languages(model), "selected": reg.selected_languages(model)})
    if as_json:
        click.echo(json.dumps({"registry": str(reg.root), "models": rows}, indent=2))
        return
    if not rows:
        click.echo(f"The registry at {reg.root} is empty. Run 'neuronreg compute' to fill it.", err=True)
        return
    click.echo(f"{'model':<28} {'counted':>7} {'selected':>8}  languages")
    for row in rows:
        click.echo(f"{row['model']:<28} {len(row['counted']):>7} {len(row['selected']):>8}  {' '.join(row['counted'])}")


@cli.command(name="show")
@click.argument("model")
@click.argument("language")
@registry_option
@json_option
@click.pass_context
def show_cmd(ctx, model, language, registry, as_json):
    """Show one language's neurons: per layer, in total, and the share of parameters they train.

    \b
    Example:
        neuronreg show mistral-nemo sw
        neuronreg show mistral-nemo Swahili --json
    """
    from .summary import format_share, summarize

    reg = _registry(registry)
    code = _resolve_stored_language(ctx, reg, model, language)
    table, provenance = reg.read_neurons(model, code)
    summary = summarize(model, code, table, provenance)
    if as_json:
        click.echo(json.dumps({"model": model, "language": code, "neurons": summary.num_neurons,
                               "per_layer": summary.per_layer, "trainable_weights": summary.trainable_weights,
                               "share_of_parameters": summary.share, "provenance": provenance}, indent=2))
        return
    click.echo(f"{model} {code} ({provenance['language']['name']}): {summary.num_neurons} neurons, "
               f"{summary.trainable_weights:,} weights, {format_share(summary.share)} of parameters")
    click.echo(f"{'layer':>5} {'neurons':>8}")
    for layer, count in enumerate(summary.per_layer):
        click.echo(f"{layer:>5} {count:>8}")


def _resolve_stored_language(ctx, reg, model: str, language: str) -> str:
    """A code stored in the registry, or the manifest's canonical code for a name or other code."""
    if language in reg.selected_languages(model):
        return language
    from .errors import UnknownLanguage

    try:
        return _manifest(ctx).language(language).code
    except UnknownLanguage:
        return language


@cli.command(name="languages")
@json_option
@click.pass_context
def languages_cmd(ctx, as_json):
    """List the manifest's languages with their codes, script and default corpus.

    \b
    Example:
        neuronreg languages | grep -i swahili
    """
    manifest = _manifest(ctx)
    if as_json:
        click.echo(json.dumps([{"code": l.code, "name": l.name, "iso639_3": l.iso639_3, "flores200": l.flores200,
                                "script": l.script, "corpus_config": l.corpus_config} for l in manifest.languages],
                              indent=2, ensure_ascii=False))
        return
    for lang in manifest.languages:
        click.echo(f"{lang.code:<8} {lang.iso639_3:<4} {lang.flores200 or '-':<9} {lang.script:<5} {lang.name}")


@cli.command(name="models")
@click.pass_context
def models_cmd(ctx):
    """List the manifest's model aliases with their Hub ids and sizes.

    \b
    Example:
        neuronreg models
    """
    for alias, entry in _manifest(ctx).models.items():
        click.echo(f"{alias:<16} {entry.hub_id:<36} {entry.num_layers:>3} x {entry.intermediate_size}")


@cli.command(name="publish")
@click.argument("models", nargs=-1)
@repo_option(required=True, help="Dataset repo on the Hub (org/name); created if missing.")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--tag", default=None, help="Tag the published commit (e.g. v1.0).")
@revision_option
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("-m", "--message", default=None, help="Commit message.")
@token_option
@registry_option
@quiet_option
def publish_cmd(models, repo, private, tag, revision, create_pr, message, token, registry, quiet):
    """Publish the local registry (or some MODELS of it) to a Hub dataset repo in ONE commit.

    Uploads each model's neuron files, raw counts and a plot, and a dataset card whose configs make
    `datasets.load_dataset(REPO, MODEL, split=LANG)` work. Publishing what is already there makes
    no commit; a failed publish leaves the repo as it was.

    \b
    Example:
        neuronreg publish --repo acme/lape-neurons
        neuronreg publish mistral-nemo --repo acme/lape-neurons --private --tag v1.0
    """
    from .hub import publish

    result = publish(_registry(registry), repo, list(models) or None, private=private, tag=tag, revision=revision,
                     create_pr=create_pr, token=token, message=message)
    if not result.changed:
        _status(quiet, f"{repo} already holds this registry: no commit made.")
    else:
        _status(quiet, f"Uploaded {len(result.uploaded)} file(s), deleted {len(result.deleted)} in one commit.")
    click.echo(result.pull_request or result.url or f"{repo}@{result.commit}")


@cli.command(name="fetch")
@click.argument("model")
@click.argument("language")
@repo_option(help="Dataset repo on the Hub [default: the manifest's registry repo].")
@revision_option
@click.option("--format", "fmt", type=click.Choice(["parquet", "json", "pt", "safetensors"]), default=None,
              help="File format [default: from -o's suffix; json on stdout without -o].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Where to write the mask.")
@token_option
@quiet_option
@click.pass_context
def fetch_cmd(ctx, model, language, repo, revision, fmt, output, token, quiet):
    """Fetch one language's neurons from the Hub (only that file, through the Hub cache).

    Prints a summary on stderr (neurons per layer, total, share of parameters, source commit) and
    writes the mask: parquet (as published), json, pt (the LAPE authors' list[layer] -> LongTensor)
    or safetensors. A second fetch, and HF_HUB_OFFLINE=1, are served from the cache.

    \b
    Example:
        neuronreg fetch mistral-nemo sw
        neuronreg fetch mistral-nemo sw --repo acme/lape-neurons --revision v1.0 --format pt -o sw.pt
    """
    from .hub import fetch_mask
    from .mask import format_from_suffix
    from .summary import format_share, summarize

    manifest = _manifest(ctx)
    code = _language_code(manifest, language)
    repo = repo or manifest.registry_repo
    mask = fetch_mask(model, code, repo=repo, revision=revision, token=token)
    summary = summarize(model, code, mask.table, mask.provenance)
    _status(quiet, f"{model} {code}: {len(mask)} neurons, {format_share(summary.share)} of parameters, from "
                   f"{repo}@{mask.source['commit'][:12]}")
    _status(quiet, "per layer: " + " ".join(str(n) for n in summary.per_layer))
    if output is None:
        if fmt not in (None, "json"):
            raise click.UsageError(f"--format {fmt} writes a binary file: give -o FILE.")
        click.echo(json.dumps(mask.to_json()))
        return
    path = mask.save(output, fmt or format_from_suffix(Path(output)))
    click.echo(str(path))


@cli.command(name="import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model_spec", required=True, help="Model alias or Hub id the masks belong to.")
@click.option("--languages", required=True, help="The file's languages, in its order (comma-separated).")
@click.option("--top-rate", type=float, default=None, help="The top rate the masks were made with (recorded).")
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Layer count, if the model is not in the manifest.")
@click.option("--intermediate-size", type=click.IntRange(min=1), default=None, help="MLP width, likewise.")
@click.option("--hidden-size", type=click.IntRange(min=1), default=None, help="Hidden size (for the share of parameters).")
@click.option("--name", default=None, help="Name of the model in the registry [default: its alias].")
@registry_option
@quiet_option
@click.pass_context
def import_cmd(ctx, path, model_spec, languages, top_rate, layers, intermediate_size, hidden_size, name, registry, quiet):
    """Import a LAPE neuron file (list[language][layer] -> LongTensor, .pt/.pth) into the registry.

    The files of the LAPE authors and of the seed paper hold no language names: give them in the
    file's order. Imported entries have no counts; their provenance says they were imported.

    \b
    Example:
        neuronreg import llama-3.1-5.pt --model llama-3.1-8b --top-rate 0.05 \\
            --languages mt,af,is,cy,mk,lv,lt,sl,sk,et,ka,ne
    """
    from .compute import resolve_languages
    from .formats import import_lape, model_shape

    manifest = _manifest(ctx)
    shape = model_shape(model_spec, manifest, num_layers=layers, intermediate_size=intermediate_size,
                        hidden_size=hidden_size, name=name)
    langs = resolve_languages(_split_languages([languages]), manifest)
    sizes = import_lape(Path(path), shape, langs, _registry(registry), top_rate)
    click.echo(f"{'language':<10} {'neurons':>8}")
    for code, n in sizes.items():
        click.echo(f"{code:<10} {n:>8}")
    _status(quiet, f"Imported {len(sizes)} languages of {shape.name} into {_registry(registry).root}")


@cli.command(name="export")
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["lape-pt"]), default="lape-pt", show_default=True,
              help="lape-pt: the authors' list[language][layer] -> LongTensor.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="File to write.")
@click.option("--languages", default=None, help="Languages and their order [default: the selection's order].")
@registry_option
@quiet_option
@click.pass_context
def export_cmd(ctx, model, fmt, output, languages, registry, quiet):
    """Export a model's masks to the LAPE authors' format, for their scripts.

    \b
    Example:
        neuronreg export llama-3.1-8b --format lape-pt -o llama-3.1-5.pt
    """
    from .formats import export_lape, save_lape

    langs = None
    if languages:
        langs = [_language_code(_manifest(ctx), lang) for lang in _split_languages([languages])]
    masks, codes = export_lape(_registry(registry), model, langs)
    save_lape(masks, Path(output))
    click.echo(str(output))
    _status(quiet, f"Wrote {len(codes)} languages in this order: {','.join(codes)}")


def _language_code(manifest, language: str) -> str:
    return manifest.language(language).code


def main() -> None:
    cli(prog_name="neuronreg")


# Commands that live in their own modules register themselves on `cli` when imported.
from . import cli_ablate  # noqa: E402,F401  ablate
from . import cli_finetune  # noqa: E402,F401  finetune, evaluate, release
