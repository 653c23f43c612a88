"""Commands that measure models and runs: ablate (switch off each language's neurons), evaluate (runs before
and after, held-out text and benchmarks), report (runs side by side, seed statistics) and analyze (alignment,
weight updates, training dynamics)."""

from __future__ import annotations

from pathlib import Path

import click

from . import _options as o
from ._output import json_result, result, setup_logging, status


@click.command(name="ablate")
@click.argument("model")
@o.languages_option("Languages whose neurons to switch off and on which to measure [default: every language "
                    "selected for MODEL].")
@click.option("--data", required=True,
              help="Held-out text: a folder with one <language>.txt/.jsonl/.parquet per language, NOT the text the "
                   "masks were computed from.")
@o.out_option("Folder for ablation.json, ablation.csv, measurements.csv and ablation.png.", required=True)
@o.tokens_option("100k", "Held-out tokens to evaluate per language.")
@o.seq_len_option(1024)
@o.batch_size_option(4)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random control mask.")
@click.option("--exclusive", is_flag=True,
              help="Switch off only the neurons of a language that no other of the languages holds.")
@click.option("--allow-same-text", is_flag=True,
              help="Evaluate even on the very text a mask was computed from (with a warning).")
@o.which_selection_options
@o.model_source_options
@o.registry_option
@o.json_option
@o.quiet_option
@click.pass_context
def ablate_cmd(ctx, model, languages, data, out, tokens, seq_len, batch_size, seed, exclusive, allow_same_text,
               selection, which_top_rate, dtype, device, text_field, name, trust_remote_code, token, registry, as_json,
               quiet):
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
    from ..evaluation.ablation import AblationSettings, ablate, save_report
    from ..files import output_folder
    from ._tables import ablation_summary, ablation_table

    setup_logging(quiet)
    output_folder(out)
    settings = AblationSettings(data=data, tokens=o.tokens(tokens), seq_len=seq_len, batch_size=batch_size,
                                text_field=text_field, seed=seed, allow_same_text=allow_same_text, exclusive=exclusive,
                                selection=o.selection(selection, which_top_rate))
    report = ablate(model, o.names(languages), settings=settings, load=o.load(dtype, device, token, trust_remote_code),
                    manifest=o.manifest(ctx), registry=o.registry(registry), name=name)
    paths = save_report(report, out)
    if as_json:
        json_result(report.to_json())  # what ablation.json holds
    else:
        for line in ablation_table(report):
            result(line)
        result()
        for line in ablation_summary(report):
            result(line)
    status(quiet, f"Wrote {', '.join(str(p) for p in paths.values())}")


@click.command(name="evaluate")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--data", default=None, help="Held-out text: a folder with one <language>.txt/.jsonl/.parquet each "
              "(needed unless --tasks).")
@click.option("--tasks", default=None, help="Benchmarks through lm-evaluation-harness, comma-separated: flores, "
              "belebele, sib200, english, or lm-eval task names; results go to RUN/eval/ (pip install "
              "'neuronreg[eval]').")
@click.option("--limit", type=float, default=None, help="At most this many examples per task (below 1: a share).")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None, help="Examples in the prompt [default: 0].")
@click.option("--include-path", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="A folder of lm-eval task YAML files of your own, for --tasks (repeatable).")
@click.option("--resume", is_flag=True, help="For --tasks: keep the scores already in each run's eval/ that were "
              "measured with the same settings, lm-eval version and base model after the run was made; measure "
              "only the rest.")
@o.languages_option("Languages to measure [default: the language the run trained].")
@o.tokens_option("100k", "Held-out tokens per language.")
@o.seq_len_option(512, minimum=2)
@o.batch_size_option(4)
@click.option("--dtype", type=click.Choice(o.DTYPES), default=None, help="Weights' dtype [default: the run's].")
@o.device_option
@o.text_field_option
@click.option("--allow-other-base", is_flag=True, help="Apply the delta even if the base model's weights changed.")
@o.json_option
@o.trust_remote_code_option
@o.token_option
@o.quiet_option
@click.pass_context
def evaluate_cmd(ctx, runs, data, tasks, limit, num_fewshot, include_path, resume, languages, tokens, seq_len,
                 batch_size, dtype, device, text_field, allow_other_base, as_json, trust_remote_code, token, quiet):
    """Perplexity and bits per character per language before and after finetune RUNS, on held-out text.

    Loads each run's base model, measures it, puts the run's delta on it (unmerged: exact in any
    dtype) and measures again, with the same held-out measurement as ablate. Runs on the same base
    model share one measurement of it (each run's eval/base/ gets it).

    With --tasks, benchmarks through lm-evaluation-harness on the base model and on each run, in
    memory (docs/benchmarks.md).

    \b
    Example:
        neuronreg evaluate runs/sw --data ./heldout --languages sw,en
        neuronreg evaluate runs/sw-* --tasks flores,belebele,sib200,english --limit 100
        neuronreg evaluate runs/sw-* --tasks flores,belebele,sib200,english --resume   # after an interruption
    """
    from ..finetune.evaluate import BenchmarkSettings, HeldoutSettings, evaluate_runs
    from ._tables import benchmark_lines, heldout_lines

    setup_logging(quiet)
    if not data and not tasks:
        raise click.UsageError("Give --data (held-out text), --tasks (benchmarks), or both.")
    outcomes = evaluate_runs(
        runs, tasks=o.names([tasks]) if tasks else None, data=data, languages=o.names(languages),
        manifest=o.manifest(ctx), load=o.load(dtype, device, token, trust_remote_code),
        benchmark=BenchmarkSettings(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                    include_path=tuple(include_path), resume=resume),
        heldout=HeldoutSettings(tokens=o.tokens(tokens), seq_len=seq_len, batch_size=batch_size,
                                text_field=text_field),
        allow_other_base=allow_other_base)
    reports = []
    for folder, bench, outcome in outcomes:
        if as_json:
            reports.append({"run": str(folder), **({"trained_language": outcome.language, "scores": outcome.scores}
                                                   if outcome else {}),
                            **({"benchmarks": bench.as_dict()} if bench else {})})
            continue
        if len(runs) > 1:
            result(f"{'' if folder == Path(runs[0]) else chr(10)}== {folder}")
        for line in (benchmark_lines(bench) if bench else []) + (heldout_lines(outcome) if outcome else []):
            result(line)
    if as_json:  # one run: its object, as before; several: a list of them
        json_result(reports[0] if len(runs) == 1 else reports)





@click.command(name="report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@o.out_option("Folder for report.csv, report.json, one PNG per metric and tradeoff.png.", required=True)
@click.option("--tradeoff", "target", default=None, metavar="METRIC",
              help="The trained language's score on tradeoff.png, as the report names it; {lang} and {code} "
                   "stand for the language's code and FLORES-200 code, e.g. 'heldout_{lang}/bits_per_character' "
                   "[default: the first that every run has of FLORES-200 eng->X chrF++, Belebele, SIB-200, "
                   "held-out bits per character].")
@o.json_option
@o.quiet_option
def report_cmd(runs, out, target, as_json, quiet):
    """Compare fine-tuning RUNS of one base model in one table: the base model's row, then each run's.

    Per run: subset, trainable weights and their share of the model, training tokens (steps x batch x
    accumulation x seq-len), steps, wall time of its last session, and every score its folder holds
    (held-out perplexity and bits per character from 'evaluate --data', lm-eval scores from
    'evaluate --tasks') with the change against the base model. Markdown on stdout (--json: what
    report.json holds); CSV, JSON and plots (one per metric, and the trained language against
    English) in --out.

    Runs that differ only in their seed are grouped: per metric the mean change, sd and n; every two
    such groups of one language (two runs or more each) are compared with Welch's t-test (and its 95%
    interval) and an exact permutation test of the difference of means.

    \b
    Example:
        neuronreg report runs/sw-lape runs/sw-random runs/sw-ffn runs/sw-full -o report/
        neuronreg report runs/sw-* -o report/ --tradeoff 'heldout_{lang}/bits_per_character'
    """
    from ..evaluation.report import collect, save_report
    from ._tables import comparisons_markdown, interference_markdown, report_markdown, seed_groups_markdown

    setup_logging(quiet)
    report = collect(list(runs))
    paths = save_report(report, out, target=target)
    if as_json:
        json_result(report.as_dict())
        status(quiet, f"Wrote {len(paths)} files to {out}")
        return
    for line in report_markdown(report):
        result(line)
    groups = report.seed_groups()
    for block in (seed_groups_markdown(report, groups), comparisons_markdown(report.comparisons(groups), groups),
                  interference_markdown(report)):
        if block:
            result()
            for line in block:
                result(line)
    plotted = sum(m.key in paths for m in report.metrics)
    status(quiet, f"Wrote {len(paths)} files to {out}: report.csv, report.json, "
                  f"{plotted} metric plot(s){', tradeoff.png' if 'tradeoff' in paths else ''}")


@click.command(name="analyze")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--parallel", default=None,
              help="Line-aligned text for the alignment: a folder with one <language>.txt per language, line i the "
                   "same sentence in each (NTREX-128, or FLORES-200 devtest).")
@o.languages_option("Languages to align with --pivot [default: the languages the runs trained].")
@click.option("--pivot", default="en", show_default=True, help="The language the others are aligned with.")
@click.option("--sentences", type=click.IntRange(min=2), default=200, show_default=True,
              help="Sentences (the first lines) of the parallel text; retrieval picks one among them.")
@click.option("--only", "parts", multiple=True, type=click.Choice(["alignment", "updates", "dynamics"]),
              help="Run only these analyses (repeatable) [default: all; alignment needs --parallel].")
@click.option("--draws", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Random masks drawn for the update-share control.")
@o.batch_size_option(8)
@o.which_selection_options
@o.out_option("Folder for analysis.json, alignment.csv, updates.csv, dynamics.csv and the plots.")
@o.json_option
@o.load_options
@o.registry_option
@o.quiet_option
@click.pass_context
def analyze_cmd(ctx, runs, parallel, languages, pivot, sentences, parts, draws, batch_size, selection, which_top_rate,
                out, as_json, token, trust_remote_code, device, dtype, registry, quiet):
    """What fine-tuning RUNS of one base changed: alignment, weight updates, training dynamics.

    Alignment (--parallel): per layer, how close each language's sentence representations are to the
    pivot's (mean over tokens of the residual stream after the layer): cosine of matched against
    mismatched pairs and retrieval accuracy both ways, for the base and every run. Weight updates:
    per layer and projection the norm of each run's update and its size relative to the base, how
    it spreads over neurons, and its share on the language's neurons (from --registry) against
    random neurons of the same count per layer (--selection: the same selection for every run; default:
    a lape or random run's own, the model's default for the others). Training dynamics: each run's
    per-step log.
    Tables on stdout; JSON, CSV and plots with --out.

    \b
    Example:
        neuronreg analyze runs/sw-* --parallel ../shared/corpora/ntrex --languages sw -o analysis/
        neuronreg analyze runs/sw-lape runs/sw-full --only updates --registry ./reg
    """
    from ..finetune.analyze import PARTS, AnalyzeSettings, analyze, save_analysis
    from ._tables import alignment_lines, dynamics_lines, updates_lines

    setup_logging(quiet)
    chosen = tuple(parts) or tuple(p for p in PARTS if p != "alignment" or parallel)
    settings = AnalyzeSettings(parallel=parallel, languages=tuple(o.names(languages) or ()) or None, pivot=pivot,
                               sentences=sentences, batch_size=batch_size, parts=chosen, draws=draws,
                               selection=None if selection is None and which_top_rate is None
                               else o.selection(selection, which_top_rate))
    report = analyze(list(runs), settings=settings, load=o.load(dtype, device, token, trust_remote_code),
                     registry=o.registry(registry), manifest=o.manifest(ctx))
    paths = save_analysis(report, out) if out else {}
    if as_json:
        json_result(report.to_dict())
    else:
        blocks = [b for b in (alignment_lines(report), updates_lines(report), dynamics_lines(report)) if b]
        for i, block in enumerate(blocks):
            if i:
                result()
            for line in block:
                result(line)
    if paths:
        status(quiet, f"Wrote {len(paths)} files to {out}")


COMMANDS = [ablate_cmd, evaluate_cmd, report_cmd, analyze_cmd]
