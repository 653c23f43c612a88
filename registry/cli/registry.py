"""Commands over the local registry: compute, select, ls, show; and the manifest's languages, models."""

from __future__ import annotations

import click

from . import _options as o
from ._output import json_result, result, setup_logging, status


@click.command(name="compute")
@click.argument("model")
@click.argument("languages", nargs=-1)
@o.languages_option("Languages to count (like LANGUAGES); sets too: @ntrex, @seed12, @all.", name="more_langs")
@click.option("--corpus", default="hf", show_default=True,
              help="A folder with one <language>.txt/.jsonl/.parquet per language, 'hf' for the manifest's Hub "
                   "corpus (GlotCC-V1), or hf:DATASET[:CONFIG].")
@o.tokens_option("13M", "Tokens to count per language (e.g. 500k, 2M, 100M).")
@o.seq_len_option(1024)
@o.batch_size_option(8)
@o.device_map_option
@o.model_source_options
@click.option("--select-over", "select_langs", multiple=True,
              help="Languages to select over, comma-separated [default: every language counted for the model].")
@o.selection_options
@click.option("--checkpoint-tokens", default="1M", show_default=True, help="Save progress every so many tokens.")
@click.option("--force", is_flag=True, help="Recount languages already in the registry.")
@click.option("--strict", is_flag=True, help="Stop when a language has no text, instead of skipping it.")
@o.default_option
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def compute_cmd(ctx, model, languages, more_langs, corpus, tokens, seq_len, batch_size, dtype, device, device_map,
                token, trust_remote_code, name, text_field, select_langs, top_rate, filter_rate, bar_ratio,
                checkpoint_tokens, force, strict, make_default, registry, as_json, quiet):
    """Count how often each MLP neuron fires on each language's text, then select LAPE neurons.

    MODEL is a manifest alias (neuronreg models), a Hub id, a local folder or a registry name.
    LANGUAGES are codes, names (sw, swa, Swahili) or sets (@ntrex: every NTREX-128 language,
    @seed12: the seed paper's 12, @all; neuronreg languages --sets). Counts are stored per language
    and reused: a language already counted with the same settings is skipped, one without text is
    skipped with a warning (--strict: an error), and an interrupted run resumes from its last
    checkpoint. Before counting, it says how much and about how long.

    Under torchrun, every process counts a share of the rows and the counts are summed exactly.

    \b
    Example:
        neuronreg compute ./my-model en de sw --corpus ./texts --tokens 2M --registry ./reg
        neuronreg compute mistral-nemo sw mt is --corpus hf
        neuronreg compute mistral-nemo --languages @ntrex --corpus hf
        torchrun --nproc-per-node 8 -m neuronreg compute mistral-nemo @seed12 --corpus hf
    """
    from ..lape.compute import CountSettings, compute
    from ._tables import compute_json, selection_line

    setup_logging(quiet)
    settings = CountSettings(corpus=corpus, tokens=o.tokens(tokens), seq_len=seq_len, batch_size=batch_size,
                             text_field=text_field,
                             checkpoint_tokens=o.tokens(checkpoint_tokens, "Checkpoint interval"))
    wanted = list(languages) + list(more_langs)
    if not wanted:
        raise click.UsageError("Name the languages to count: LANGUAGES or --languages (e.g. sw mt, or @seed12).")
    report = compute(model, wanted, settings=settings, params=o.params(top_rate, filter_rate, bar_ratio),
                     load=o.load(dtype, device, token, trust_remote_code, device_map), manifest=o.manifest(ctx),
                     registry=o.registry(registry), select_languages=o.names(select_langs), name=name, force=force,
                     default=make_default, strict=strict)
    selection = report.selection
    if selection is None:
        return  # a rank other than 0 under torchrun: rank 0 reports
    default = o.registry(registry).index().models[report.model.name].default
    if as_json:
        json_result(compute_json(report, default))
        return
    result(f"{'language':<10} {'status':<10} {'tokens':>12} {'neurons':>8}")
    for row in report.languages:
        neurons = len(selection.neurons[row.code]) if row.code in selection.neurons else "-"
        result(f"{row.code:<10} {row.status:<10} {row.tokens:>12,} {neurons:>8}")
    for code in report.skipped:
        result(f"{code:<10} {'skipped':<10} {0:>12,} {'-':>8}")
    status(quiet, selection_line(selection, default, of=report.model.describe()) + f" Registry: {report.registry}")


@click.command(name="select")
@click.argument("model")
@o.languages_option("Languages to select over [default: all counted for the model].", name="select_langs")
@o.selection_options
@o.default_option
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def select_cmd(ctx, model, select_langs, top_rate, filter_rate, bar_ratio, make_default, registry, as_json, quiet):
    """Select neurons from stored counts, with other parameters or languages. No model needed.

    Each selection is kept next to the model's others, named by how it was made (top1, top5,
    top5-f90-b90, top1-mt-sw with --languages): selecting again with the same parameters replaces
    that one selection only. The model's first selection is its default (--default to change).

    \b
    Example:
        neuronreg select mistral-nemo --top-rate 0.05
        neuronreg select mistral-nemo --top-rate 0.01 --default
        neuronreg select mistral-nemo --languages sw,mt,is
    """
    from ..lape.compute import select
    from ._tables import selection_json, selection_line

    setup_logging(quiet)
    reg = o.registry(registry)
    selection = select(model, registry=reg, params=o.params(top_rate, filter_rate, bar_ratio),
                       languages=o.names(select_langs), manifest=o.manifest(ctx), default=make_default)
    default = reg.index().models[next(iter(selection.neurons.values())).model].default
    if as_json:
        json_result(selection_json(selection, default))
        return
    result(f"{'language':<10} {'neurons':>8}")
    for lang in selection.languages:
        result(f"{lang:<10} {len(selection.neurons[lang]):>8}")
    status(quiet, selection_line(selection, default))


@click.command(name="ls")
@o.repo_option(help="List a Hub dataset repo instead of the local registry (from its card alone: one small "
                    "download, served from the Hub cache when offline).")
@o.revision_option
@o.token_option
@o.registry_option
@o.json_option
@o.quiet_option
def ls_cmd(repo, revision, token, registry, as_json, quiet):
    """List what the registry holds: models, their selections, counted and selected languages.

    One row per selection (the model's default marked *): its neurons, how it was made and its
    languages (the count, then the codes, shortened when there are many; --json lists them all).

    \b
    Example:
        neuronreg ls
        neuronreg ls --registry ./reg --json
        neuronreg ls --repo acme/lape-neurons
    """
    from ._tables import language_list

    setup_logging(quiet)
    if repo:
        from ..store.hub import read_remote_index

        index, counted, where = read_remote_index(repo, revision=revision, token=token), {}, repo
    else:
        reg = o.registry(registry)
        index, where = reg.index(), str(reg.root)
        counted = {model: reg.counted_languages(model) for model in reg.models()}
    rows = []
    for model in sorted(set(index.models) | set(counted)):
        entries = index.entries(model)
        rows.append({"model": model, "counted": counted.get(model, []),
                     "default": entries[0].name if entries else None,
                     "selections": [{"name": e.name, "method": e.method, "top_rate": e.top_rate,
                                     "filter_rate": e.filter_rate, "activation_bar_ratio": e.activation_bar_ratio,
                                     "over": e.over, "languages": e.languages, "neurons": e.neurons}
                                    for e in entries]})
    if as_json:
        json_result({"registry": where, "models": rows})
        return
    if not rows:
        status(quiet, f"{where} is empty." + ("" if repo else " Run 'neuronreg compute' to fill it."))
        return
    result(f"{'model':<28} {'selection':<16} {'neurons':>8}  {'made by':<24} languages")
    for row in rows:
        if not row["selections"]:
            result(f"{row['model']:<28} {'-':<16} {'-':>8}  {'counts only':<24} {language_list(row['counted'])}")
        for position, sel in enumerate(row["selections"]):
            label = sel["name"] + (" *" if position == 0 else "")
            total = sum(sel["neurons"].values()) if sel["neurons"] else "?"
            how = "imported" if sel["method"] == "imported" else f"LAPE top rate {sel['top_rate']}"
            result(f"{row['model'] if position == 0 else '':<28} {label:<16} {total:>8}  {how:<24} "
                   f"{language_list(sel['languages'])}")
    status(quiet, "* the model's default selection; neurons: summed over its languages (a neuron can belong to "
                  "several); datasets configs: MODEL (its default) and MODEL-SELECTION")


@click.command(name="show")
@click.argument("model")
@click.argument("language")
@o.which_selection_options
@o.repo_option(help="Show a mask of a Hub dataset repo (downloads that file and the card) instead of the local "
                    "registry.")
@o.revision_option
@o.token_option
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def show_cmd(ctx, model, language, selection, which_top_rate, repo, revision, token, registry, as_json, quiet):
    """Show one language's neurons: per layer, in total, and the share of parameters they train.

    The selection is named as the registry (or the repo's card) names it, and marked when it is the
    model's default.

    \b
    Example:
        neuronreg show mistral-nemo sw
        neuronreg show mistral-nemo Swahili --top-rate 0.05 --json
        neuronreg show mistral-nemo sw --repo acme/lape-neurons
    """
    from ..store.masks import find_masks
    from ._tables import format_share

    setup_logging(quiet)
    found = find_masks(model, [language], selection=o.selection(selection, which_top_rate), repo=repo,
                       revision=revision, registry=registry, manifest=o.manifest(ctx), token=token)
    name, mask = found.model, found.one()
    chosen, default = _selection_name(found, repo, revision, token, registry)
    code = mask.language
    share = mask.share_of_parameters()
    per_layer = mask.counts_per_layer()
    if as_json:
        json_result({"model": name, "language": code, "selection": chosen, "default": chosen == default,
                     "neurons": len(mask), "per_layer": per_layer, "trainable_weights": mask.trainable_weights(),
                     "share_of_parameters": share, "provenance": mask.provenance.to_dict()})
        return
    weights = mask.trainable_weights()
    label = chosen + (", the default" if chosen == default else "")
    result(f"{name} {code} ({mask.provenance.language.name}): {len(mask)} neurons, "
           f"{'n/a' if weights is None else f'{weights:,}'} weights, {format_share(share)} of parameters "
           f"[selection {label}]")
    result(f"{'layer':>5} {'neurons':>8}")
    for layer, count in enumerate(per_layer):
        result(f"{layer:>5} {count:>8}")


def _selection_name(found, repo, revision, token, registry) -> tuple[str, str | None]:
    """The name of the selection ``found`` came from, and the name of the model's default selection
    (None where it cannot be known: a repo's card not at hand offline). A repo's default file does not say
    its selection's name; the card does."""
    from ..errors import HubError

    if repo is None:
        return found.selection, o.registry(registry).index().models[found.model].default
    from ..store.hub import read_remote_index

    try:
        index = read_remote_index(repo, revision=revision, token=token)
    except HubError:
        return found.selection, None
    default = index.models[found.model].default if found.model in index.models else None
    return (default if found.selection == "default" and default else found.selection), default


@click.command(name="languages")
@click.argument("names", nargs=-1)
@click.option("--sets", "show_sets", is_flag=True, help="List the language sets (@name) instead.")
@o.json_option
@o.quiet_option
@click.pass_context
def languages_cmd(ctx, names, show_sets, as_json, quiet):
    """List the manifest's languages (or NAMES of them, or sets) with codes, script, family and corpus.

    \b
    Example:
        neuronreg languages | grep -i swahili
        neuronreg languages @seed12
        neuronreg languages --sets
    """
    from ..resolve import languages

    setup_logging(quiet)
    manifest = o.manifest(ctx)
    if show_sets:
        sets = manifest.sets()
        if as_json:
            json_result({name: list(codes) for name, codes in sets.items()})
            return
        for name, codes in sets.items():
            shown = " ".join(codes[:20]) + (" ..." if len(codes) > 20 else "")
            result(f"@{name:<10} {len(codes):>4}  {shown}")
        return
    chosen = languages(names, manifest) if names else manifest.languages
    if as_json:
        json_result([{"code": lang.code, "name": lang.name, "iso639_3": lang.iso639_3, "flores200": lang.flores200,
                      "ntrex": lang.ntrex, "script": lang.script, "family": lang.family,
                      "corpus_config": lang.corpus_config, "corpus_note": lang.corpus_note} for lang in chosen])
        return
    for lang in chosen:
        result(f"{lang.code:<8} {lang.iso639_3:<4} {lang.flores200 or '-':<9} {lang.script:<5} {lang.name}")


@click.command(name="models")
@click.argument("aliases", nargs=-1)
@click.option("--estimate", is_flag=True,
              help="Estimate the GPU-hours of counting LANGUAGES x TOKENS for each model (from a measured H100 rate).")
@o.languages_option("Languages (or a set) for --estimate [default: @ntrex].")
@o.tokens_option("13M", "Tokens per language for --estimate.")
@o.json_option
@o.quiet_option
@click.pass_context
def models_cmd(ctx, aliases, estimate, languages, tokens, as_json, quiet):
    """List the manifest's model aliases with their Hub ids and sizes (or some ALIASES of them).

    With --estimate, how many H100 GPU-hours counting would take, scaled by each model's size from
    a measured rate (30.6k tokens/s for Llama-3.1-8B in bf16).

    \b
    Example:
        neuronreg models
        neuronreg models --estimate --languages @ntrex --tokens 13M
    """
    from ..lape.estimate import MEASURED
    from ..lape.estimate import estimate as estimated
    from ..resolve import language_codes

    setup_logging(quiet)
    manifest = o.manifest(ctx)
    models = {alias: entry for alias, entry in manifest.models.items() if not aliases or alias in aliases}
    unknown = [alias for alias in aliases if alias not in manifest.models]
    if unknown:
        raise click.UsageError(f"Not manifest aliases: {', '.join(unknown)} (neuronreg models lists them).")
    if estimate:
        codes = language_codes(o.names(languages) or ["@ntrex"], manifest)
        count = o.tokens(tokens)
        rows = [estimated(alias, entry.num_parameters, len(codes), count) for alias, entry in models.items()]
        if as_json:
            json_result({"measured": MEASURED, "languages": len(codes), "tokens": count,
                         "models": [{"model": r.model, "parameters": r.parameters, "tokens_per_s": r.tokens_per_s,
                                     "gpu_hours": r.gpu_hours} for r in rows]})
            return
        result(f"{'model':<16} {'parameters':>12} {'tokens/s':>10} {'GPU-hours':>10}   ({len(codes)} languages x "
               f"{count:,} tokens, one H100 each)")
        for r in rows:
            rate = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "?"
            hours = f"{r.gpu_hours:,.1f}" if r.gpu_hours is not None else "?"
            result(f"{r.model:<16} {(r.parameters or 0) / 1e9:>11.2f}B {rate:>10} {hours:>10}")
        return
    if as_json:
        json_result({alias: {"hub_id": e.hub_id, "num_layers": e.num_layers, "num_parameters": e.num_parameters,
                             "intermediate_size": e.intermediate_size, "hidden_size": e.hidden_size,
                             "mlp_layout": e.mlp_layout, "license": e.license} for alias, e in models.items()})
        return
    for alias, entry in models.items():
        result(f"{alias:<16} {entry.hub_id:<36} {entry.num_layers:>3} x {entry.intermediate_size}")


COMMANDS = [compute_cmd, select_cmd, ls_cmd, show_cmd, languages_cmd, models_cmd]
