"""How results look on stdout: the library returns records, and every table the command line prints is
made here from them (one owner for presentation)."""

from __future__ import annotations

import math

from ..progress import duration


# -- numbers ------------------------------------------------------------------------------------------------
def number(value: float, sign: bool = False) -> str:
    """Three significant digits, never in exponent notation: 1234 -> 1,234; 0.01234 -> 0.0123."""
    if not math.isfinite(value):
        return str(value)
    plus = "+" if sign else ""
    if value == 0:
        return f"{plus}0" if sign else "0"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:{plus},.{digits}f}"


def share(value: float) -> str:
    """A value in [0, 1] with two significant digits (three from 0.1 up), never in exponent notation:
    0 -> 0, 1 -> 1.00, 0.1234 -> 0.123, 0.01234 -> 0.012, 0.0001234 -> 0.00012."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    digits = max(2, 1 - math.floor(math.log10(abs(value))) + (abs(value) >= 0.1))
    return f"{value:.{digits}f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.3g}%"


def format_share(value: float | None) -> str:
    """A share of the model's parameters: '0.951%' ('n/a' when unknown)."""
    return "n/a" if value is None else f"{100 * value:.3f}%"


# -- ablate -------------------------------------------------------------------------------------------------
def ablation_table(report) -> list[str]:
    """The perplexity-change table: rows the switched-off masks, columns the evaluated languages."""
    width = max(10, *(len(lang) + 2 for lang in report.languages))
    labels = {row: f"{row} ({len(report.masks[row]):,})" for row in report.rows}
    first = max(12, *(len(label) + 1 for label in labels.values()))
    lines = [f"{'perplexity':<{first}}" + "".join(f"{lang:>{width}}" for lang in report.languages)]
    lines.append(f"{'baseline':<{first}}" + "".join(f"{number(report.baseline[lang].perplexity):>{width}}"
                                                   for lang in report.languages))
    lines.append("change with the neurons of ... switched off (neurons):")
    for row in report.rows:
        lines.append(f"{labels[row]:<{first}}" + "".join(f"{number(report.delta(row, lang), sign=True):>{width}}"
                                                        for lang in report.languages))
    return lines


def verdict_line(verdict, baseline: float, ablated: float) -> str:
    column = "n/a" if verdict.strongest_rival is None else (
        f"{'yes' if verdict.own_hurts_most else 'NO'} (next: {verdict.strongest_rival} "
        f"{percent(verdict.rival_relative)})")
    row = "n/a" if verdict.most_hurt_other is None else (
        f"{'yes' if verdict.hurts_own_most else 'NO'} (next: {verdict.most_hurt_other} "
        f"{percent(verdict.other_relative)})")
    control = "" if verdict.random_relative is None else f"; random neurons {percent(verdict.random_relative)}"
    return (f"{verdict.language}: own neurons off: perplexity {number(baseline)} -> {number(ablated)} "
            f"({percent(verdict.own_relative)}); of all masks its own hurts it most: {column}; its mask hurts it "
            f"more than any other language: {row}{control}")


def ablation_summary(report) -> list[str]:
    verdicts = report.verdicts()
    lines = [verdict_line(verdict, report.baseline[lang].perplexity, report.ablated[lang][lang].perplexity)
             for lang, verdict in verdicts.items()]
    if len(verdicts) > 1:
        column = sum(v.own_hurts_most for v in verdicts.values())
        row = sum(v.hurts_own_most for v in verdicts.values())
        lines.append(f"Of {len(verdicts)} languages, {column} {'is' if column == 1 else 'are'} hurt most by "
                     f"{'its' if column == 1 else 'their'} own mask (of all masks, relative change), and "
                     + (f"{row} language's mask hurts its own language" if row == 1 else
                        f"{row} languages' masks hurt their own language") + " more than any other.")
    return lines


# -- overlap ------------------------------------------------------------------------------------------------
def jaccard_table(report) -> list[str]:
    """The Jaccard table, rows and columns in the report's language order (rows: code and neurons)."""
    labels = {lang: f"{lang} ({report.neurons(lang):,})" for lang in report.languages}
    first = max(12, *(len(label) + 1 for label in labels.values()))
    width = max(8, *(len(lang) + 2 for lang in report.languages))
    lines = [f"{'jaccard':<{first}}" + "".join(f"{lang:>{width}}" for lang in report.languages)]
    for a in report.languages:
        lines.append(f"{labels[a]:<{first}}" + "".join(f"{share(report.jaccard[a][b]):>{width}}"
                                                     for b in report.languages))
    return lines


def core_line(report) -> str:
    """The shared core: neurons held by at least k languages, for every k."""
    parts = [f">={k}: {n:,}" for k, n in enumerate(report.core.at_least, start=1)]
    return f"shared core (neurons held by at least k of the {len(report.languages)} languages): {', '.join(parts)}"


# -- steer-eval ---------------------------------------------------------------------------------------------
def steering_table(report) -> list[str]:
    """Per condition, the share of outputs in the target and the source language."""
    target, source = f"{report.target} (target)", f"{report.source} (source)"
    lines = [f"{'strength':<10}{target:>14}{source:>14}{'other':>8}{'distinct-2':>12}  most frequent"]
    for row in report.shares():
        common = ", ".join(f"{lang} {n}" for lang, n in list(row["languages"].items())[:3])
        lines.append(f"{row['condition']:<10}{row['target_share']:>14.0%}{row['source_share']:>14.0%}"
                     f"{row['other_share']:>8.0%}{row['distinct_2']:>12.2f}  {common}")
    return lines


# -- evaluate -----------------------------------------------------------------------------------------------
def heldout_lines(outcome) -> list[str]:
    rows = [f"{'language':<10} {'tokens':>9} {'ppl before':>11} {'ppl after':>10} {'change':>8} "
            f"{'bpc before':>11} {'bpc after':>10}"]
    for code, s in outcome.scores.items():
        mark = " (trained)" if code == outcome.language else ""
        rows.append(f"{code:<10} {s['tokens']:>9,} {s['base_perplexity']:>11.3f} {s['tuned_perplexity']:>10.3f} "
                    f"{100 * (s['tuned_perplexity'] / s['base_perplexity'] - 1):>+7.2f}% "
                    f"{s['base_bits_per_character']:>11.4f} {s['tuned_bits_per_character']:>10.4f}{mark}")
    return rows


def benchmark_lines(bench) -> list[str]:
    rows = [f"{'task':<34} {'metric':<14} {'base':>9} {'tuned':>9} {'change':>9}"]
    for name, result in bench.tuned.items():
        before = bench.base.get(name)
        for metric, value in result.metrics.items():
            if metric.endswith("_stderr") or "_stderr[" in metric:
                continue
            old = before.metrics.get(metric) if before else None
            change = f"{value - old:>+9.4f}" if old is not None else f"{'-':>9}"
            rows.append(f"{name:<34} {metric:<14} {'-' if old is None else f'{old:.4f}':>9} {value:>9.4f} {change}")
    return rows


# -- report -------------------------------------------------------------------------------------------------
def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _value(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.2f}"


def _signed(value: float) -> str:
    return f"{value:+.4f}" if abs(value) < 100 else f"{value:+,.2f}"


def report_markdown(report) -> list[str]:
    """The report as Markdown: a run's metric cell is its value and (its change against the base)."""
    head = ["run", "subset", "trainable", "share", "tokens", "steps", "wall time", *(m.key for m in report.metrics)]
    lines = ["| " + " | ".join(_md(h) for h in head) + " |",
             "|" + "|".join(["---", "---", *["---:"] * (len(head) - 2)]) + "|"]
    for row in report.rows():
        cells = [row.label, row.subset, _count(row.trainable_parameters),
                 "-" if row.trainable_share is None else f"{100 * row.trainable_share:.3f}%",
                 _count(row.train_tokens), _count(row.steps), duration(row.wall_seconds)]
        for m in report.metrics:
            value = row.metrics.get(m.key)
            change = report.change(row, m.key) if row is not report.base else None
            cells.append("-" if value is None else _value(value) + ("" if change is None else f" ({_signed(change)})"))
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return lines
