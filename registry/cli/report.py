"""``neuronreg report``: one table across fine-tuning runs, with their base model and every score."""

from __future__ import annotations

import click

from . import _options as o
from ._output import result, setup_logging, status


@click.command(name="report")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
              help="Folder for report.csv, report.json, one PNG per metric and tradeoff.png.")
@click.option("--tradeoff", "target", default=None, metavar="METRIC",
              help="The trained language's score on tradeoff.png, as the report names it; {lang} and {code} "
                   "stand for the language's code and FLORES-200 code, e.g. 'heldout_{lang}/bits_per_character' "
                   "[default: the first that every run has of FLORES-200 eng->X chrF++, Belebele, SIB-200, "
                   "held-out bits per character].")
@o.quiet_option
def report_cmd(runs, out, target, quiet):
    """Compare fine-tuning RUNS of one base model in one table: the base model's row, then each run's.

    Per run: subset, trainable weights and their share of the model, training tokens (steps x batch x
    accumulation x seq-len), steps, wall time of its last session, and every score its folder holds
    (held-out perplexity and bits per character from 'evaluate --data', lm-eval scores from
    'evaluate --tasks') with the change against the base model. Markdown on stdout; CSV, JSON and
    plots (one per metric, and the trained language against English) in --out.

    \b
    Example:
        neuronreg report runs/sw-lape runs/sw-random runs/sw-ffn runs/sw-full -o report/
        neuronreg report runs/sw-* -o report/ --tradeoff 'heldout_{lang}/bits_per_character'
    """
    from ..evaluation.report import collect, save_report

    setup_logging(quiet)
    report = collect(list(runs))
    paths = save_report(report, out, target=target)
    for line in report.markdown():
        result(line)
    status(quiet, f"Wrote {len(paths)} files to {out}: report.csv, report.json, "
                  f"{len(report.metrics)} metric plot(s){', tradeoff.png' if 'tradeoff' in paths else ''}")


COMMANDS = [report_cmd]
