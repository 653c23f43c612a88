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


def _group_labels(groups) -> list[str]:
    """Each group named by its subset and the settings in which it differs from the groups of the same
    subset (a LoRA group's options or a full run's learning rate say nothing a reader needs beside lape)."""
    labels = []
    for group in groups:
        same = [g for g in groups if g.settings.get("subset") == group.settings.get("subset")]
        keys = [k for k in dict.fromkeys(k for g in same for k in g.settings)
                if k != "subset" and len({json_key(g.settings.get(k)) for g in same}) > 1]
        labels.append(", ".join([str(group.settings.get("subset"))] + [f"{k}={group.settings.get(k)}" for k in keys]))
    return labels


def json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def seed_groups_markdown(report, groups) -> list[str]:
    """The runs that differ only in their seed: per metric the mean change against the base ± sd (n)."""
    if not any(g.n > 1 for g in groups):
        return []
    labels = _group_labels(groups)
    metrics = [m.key for m in report.metrics if any(m.key in g.summaries for g in groups)]
    lines = ["Runs that differ only in their seed: change against the base, mean ± sd (n runs)", "",
             "| group | n | " + " | ".join(_md(m) for m in metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for group, label in zip(groups, labels):
        cells = []
        for metric in metrics:
            summary = group.summaries.get(metric)
            cells.append("-" if summary is None else f"{_signed(summary.mean)} ± {summary.sd:.4f} ({summary.n})"
                         if summary.n > 1 else f"{_signed(summary.mean)} (1)")
        lines.append(f"| {_md(label)} | {group.n} | " + " | ".join(cells) + " |")
    return lines


def comparisons_markdown(comparisons, groups) -> list[str]:
    """Two seed groups compared per metric: difference of mean changes, Welch's t-test and the exact
    permutation test."""
    if not comparisons:
        return []
    names = dict(zip((json_key(g.settings) for g in groups), _group_labels(groups)))
    lines = ["Groups compared (first - second; Welch's t-test with its 95% interval; exact permutation test of the "
             "difference of means over every split of the runs)", "",
             "| metric | first | second | difference | 95% interval | t | df | p (Welch) | p (permutation) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in comparisons:
        w, p = c.welch, c.permutation
        interval = "-" if w is None else f"[{_signed(w.ci_low)}, {_signed(w.ci_high)}]"
        lines.append(f"| {_md(c.metric)} | {_md(names[json_key(c.first)])} | {_md(names[json_key(c.second)])} | "
                     f"{_signed(c.difference)} | {interval} | {'-' if w is None else f'{w.t:.2f}'} | "
                     f"{'-' if w is None else f'{w.df:.1f}'} | {'-' if w is None else f'{w.p:.3g}'} | "
                     f"{'-' if p is None else f'{p.p:.3g} ({p.splits} splits)'} |")
    return lines


# -- analyze ------------------------------------------------------------------------------------------------
def alignment_lines(report) -> list[str]:
    """Per model and language: the layer of best retrieval from the pivot and its accuracy, the mean over
    layers both ways, and the matched-minus-mismatched cosine gap at the best layer (centred)."""
    if not report.alignment:
        return []
    first = next(iter(report.alignment.values()))
    pivot, n = first[0].pivot, first[0].sentences
    lines = [f"alignment with {pivot} ({n} sentences, centred; chance {1 / n:.3f}):",
             f"{'model':<24} {'language':<9} {'best layer':>10} {'retrieval':>9} {'mean ' + pivot + '->x':>10} "
             f"{'mean x->' + pivot:>10} {'gap':>7}"]
    for label, rows in report.alignment.items():
        for code in dict.fromkeys(r.language for r in rows):
            mine = [r for r in rows if r.language == code]
            best = max(mine, key=lambda r: (r.retrieval_from_pivot, -r.layer))
            lines.append(f"{label:<24} {code:<9} {best.layer:>10} {best.retrieval_from_pivot:>9.3f} "
                         f"{sum(r.retrieval_from_pivot for r in mine) / len(mine):>10.3f} "
                         f"{sum(r.retrieval_to_pivot for r in mine) / len(mine):>10.3f} {best.gap:>7.3f}")
    return lines


def updates_lines(report) -> list[str]:
    """Per run: its MLP update's size relative to the base, how it spreads over neurons, and the share on the
    language's neurons against random ones."""
    runs = [run for run in report.runs if run.update is not None]
    if not runs:
        return []
    lines = [f"{'run':<24} {'subset':<7} {'||dW||/||W||':>12} {'touched':>9} {'top 1%':>7} {'gini':>6} "
             f"{'on its neurons':>14} {'random':>8} {'ratio':>6}"]
    for run in runs:
        u, spread, m = run.update, run.update.overall, run.mask_share
        top = "-" if spread.top_share is None else f"{spread.top_share:.2f}"
        gini = "-" if spread.gini is None else f"{spread.gini:.2f}"
        share = ("-", "-", "-") if m is None else (f"{m.share:.3f}", f"{m.expected:.3f}", f"{m.ratio:.1f}x")
        lines.append(f"{run.label:<24} {run.subset:<7} {u.relative:>12.2e} {spread.touched:>9,} {top:>7} {gini:>6} "
                     f"{share[0]:>14} {share[1]:>8} {share[2]:>6}" + (f"  ({run.mask_note})" if run.mask_note else ""))
    return lines


def dynamics_lines(report) -> list[str]:
    """Per run: validation loss at the start, its lowest (and when) and at the end; the step that covered 90%
    of the training loss's change; the last gradient norm."""
    runs = [run for run in report.runs if run.summary]
    if not runs:
        return []
    lines = [f"{'run':<24} {'val start':>9} {'val best':>9} {'at step':>7} {'val end':>8} {'train 90% at':>12} "
             f"{'grad norm end':>13}"]
    for run in runs:
        val, train, grad = (run.summary.get(k) for k in ("val_loss", "train_loss", "grad_norm"))
        best_step = "-" if val is None else val.minimum_step
        lines.append(f"{run.label:<24} {'-' if val is None else f'{val.start:.4f}':>9} "
                     f"{'-' if val is None else f'{val.minimum:.4f}':>9} {best_step:>7} "
                     f"{'-' if val is None else f'{val.end:.4f}':>8} "
                     f"{'-' if train is None or train.step_90 is None else train.step_90:>12} "
                     f"{'-' if grad is None else f'{grad.end:.3g}':>13}")
    return lines


def interference_markdown(report) -> list[str]:
    """Composed runs: per part, the change it made alone on its language (and on English), the composed run's
    change there, and the share kept."""
    rows = report.interference()
    if not rows:
        return []
    lines = ["Composed runs: what each part keeps (change against the base; kept = composed / alone)", "",
             "| composed | part | on | metric | alone | composed | kept |", "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        kept = "-" if r.kept is None else f"{r.kept:.2f}"
        on = r.language + (" (its own)" if r.role == "trained" else "")
        lines.append(f"| {_md(r.composed)} | {_md(r.part)} | {on} | {r.metric} | {_signed(r.alone)} | "
                     f"{_signed(r.composed_change)} | {kept} |")
    return lines


# -- languages ----------------------------------------------------------------------------------------------
def language_list(codes: list[str], width: int = 40) -> str:
    """Languages as their count and codes, as many codes as fit in ``width`` characters: '3: el en ru',
    '130: af am ar ... (+118)'."""
    head = f"{len(codes)}:"
    shown = []
    for i, code in enumerate(codes):
        rest = len(codes) - i - 1
        tail = f" ... (+{rest})" if rest else ""
        if len(" ".join([head, *shown, code])) + len(tail) > width and shown:
            return " ".join([head, *shown]) + f" ... (+{len(codes) - len(shown)})"
        shown.append(code)
    return " ".join([head, *shown])


# -- compute, select ----------------------------------------------------------------------------------------
def selection_line(selection, default: str | None, of: str | None = None) -> str:
    """What a selection holds, with its two numbers told apart: the neurons selected, and the table's sum over
    languages (a neuron belongs to every language whose activation probability passes the bar: to one, several
    or none)."""
    name = selection.entry.name
    pairs = sum(len(mask) for mask in selection.neurons.values())
    where = f" over {len(selection.languages)} languages" + (f" of {of}" if of else "")
    return (f"Selected {selection.selected:,} neurons{where} as selection {name}"
            f"{' (the default)' if name == default else ''}; per language {pairs:,} in all, as a neuron can belong "
            f"to several languages or to none (threshold {selection.filter_threshold:.6g}, bar "
            f"{selection.activation_bar:.6g}).")


def selection_json(selection, default: str | None) -> dict:
    """A Selection's fields: ``selected`` neurons, and ``neurons`` per language (whose sum can differ)."""
    from dataclasses import asdict

    name = selection.entry.name
    return {"name": name, "default": name == default, "languages": list(selection.languages),
            "params": asdict(selection.params), "num_layers": selection.num_layers,
            "intermediate_size": selection.intermediate_size, "filter_threshold": selection.filter_threshold,
            "activation_bar": selection.activation_bar, "selected": selection.selected,
            "neurons": {lang: len(mask) for lang, mask in selection.neurons.items()}}


def compute_json(report, default: str | None) -> dict:
    """A ComputeReport's fields: the model, the registry, each language's outcome, the skipped ones and the
    selection made."""
    model = report.model
    return {"model": model.name, "source": model.source, "revision": model.revision, "local": model.local,
            "registry": str(report.registry),
            "languages": [{"code": row.code, "status": row.status, "tokens": row.tokens} for row in report.languages],
            "skipped": dict(report.skipped), "selection": selection_json(report.selection, default)}
