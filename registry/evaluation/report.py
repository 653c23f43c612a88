"""One table across fine-tuning runs: what each trained, at what cost, and every score it has, against
its base model.

A run folder holds its config (``neuronreg_delta.json``), and, once evaluated, ``eval/heldout.json``
(``evaluate --data``: perplexity and bits per character per language) and ``eval/<task>.json`` with
``eval/base/<task>.json`` (``evaluate --tasks``: lm-eval scores of the run and of its base model).
:func:`collect` reads them into a :class:`Report`: the base model's row, then one row per run, each
metric with its change against the base. :func:`save_report` writes it as CSV, JSON and one PNG per
metric plus a trade-off scatter (the trained language against English); :meth:`Report.markdown`
is the table for stdout. :func:`eval_results` gives a run's scores for a model card's ``model-index``.

Run configs are read typed and migrated (:func:`neuronreg.runs.read_run_config`), so a report takes
runs of every neuronreg version.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FinetuneError, NeuronregError, SettingsError
from ..files import atomic_write_json, atomic_write_text, output_folder
from ..limits import load_json
from ..provenance import now, tool_version
from ..runs import HELDOUT_FILE, RunConfig, read_run_config, results_folder, run_labels
from .benchmarks import ENGLISH_SUITE, PIVOT, TaskResult, read_results

log = logging.getLogger("neuronreg")

HELDOUT_METRICS = ("perplexity", "bits_per_character")  # lower is better
BASE_LABEL = "base"
ENGLISH = "en"


@dataclass(frozen=True)
class Metric:
    """One column of the report: ``task/metric`` (held-out text: ``heldout_<lang>/<metric>``)."""

    key: str
    task: str
    metric: str
    language: str | None
    higher_is_better: bool
    benchmark: str | None = None


@dataclass
class Row:
    """The base model's row, or one run's."""

    label: str
    subset: str  # "base" for the base model
    language: str | None = None  # the language the run trained
    flores200: str | None = None  # its FLORES-200 code
    trainable_parameters: int | None = None
    trainable_share: float | None = None
    train_tokens: int | None = None  # steps x batch x accumulation x seq-len: the rows its steps saw
    steps: int | None = None
    wall_seconds: float | None = None  # training time of the run's last session
    metrics: dict[str, float] = field(default_factory=dict)
    folder: Path | None = None
    config: RunConfig | None = field(default=None, repr=False)  # the run's config (None for the base's row)

    def as_dict(self) -> dict:
        return {"label": self.label, "subset": self.subset, "language": self.language,
                "trainable_parameters": self.trainable_parameters, "trainable_share": self.trainable_share,
                "train_tokens": self.train_tokens, "steps": self.steps, "wall_seconds": self.wall_seconds,
                "metrics": dict(self.metrics)}


@dataclass(frozen=True)
class Interference:
    """What a composed run keeps of one part: on ``language`` (the part's own, or English), the change of
    ``metric`` (held-out perplexity or bits per character, against the base) the part made alone, the
    change the composed run makes, and ``kept`` = composed / alone (1: all of it; above 1: more)."""

    composed: str
    part: str
    part_language: str
    language: str
    role: str  # "trained": the part's own language; "english"
    metric: str
    alone: float
    composed_change: float
    kept: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Report:
    base_model: dict  # name, id, revision of the model every run trained
    base: Row
    runs: list[Row]
    metrics: list[Metric]

    def change(self, row: Row, key: str) -> float | None:
        """``row``'s value of ``key`` minus the base's (None when either is missing)."""
        value, base = row.metrics.get(key), self.base.metrics.get(key)
        return None if value is None or base is None else value - base

    def rows(self) -> list[Row]:
        return [self.base, *self.runs]

    def interference(self) -> list[Interference]:
        """For every composed run whose parts are in the report (matched by folder name, subset and language):
        per part and held-out metric of the part's language, the change the part made alone, the change the
        composed run makes, and the share kept; and the change on English of the composed run beside each
        part's."""
        rows = []
        for composed in self.runs:
            composition = composed.config.composition if composed.config else None
            if composition is None:
                continue
            for part in composition.parts:
                alone = next((row for row in self.runs if row.folder is not None and row.folder.name == part.run
                              and row.subset == part.subset and row.language == part.language.code
                              and row is not composed), None)
                if alone is None:
                    continue
                for code, role in ((part.language.code, "trained"), (ENGLISH, "english")):
                    if role == "english" and code == part.language.code:
                        continue
                    for metric in HELDOUT_METRICS:
                        key = f"heldout_{code}/{metric}"
                        before, after = self.change(alone, key), self.change(composed, key)
                        if before is None or after is None:
                            continue
                        rows.append(Interference(composed.label, alone.label, part.language.code, code, role, metric,
                                                 before, after, after / before if before else None))
        return rows

    def seed_groups(self) -> list:
        """The runs grouped by everything but their seed (:func:`neuronreg.analysis.seeds.group_runs` over
        :func:`run_record`): per group and metric, n, mean, sd and a 95% t interval of the CHANGE against
        the base model."""
        from ..analysis.seeds import group_runs

        return group_runs([run_record(self, row) for row in self.runs], [m.key for m in self.metrics])

    def comparisons(self, groups: list | None = None) -> list:
        """Every two seed groups of one trained language with at least two runs each, on every metric both
        have: the difference of their mean changes, Welch's t-test (t, df, two-sided p, 95% interval) and
        the exact permutation test of the difference of means (two-sided p over every split of the runs)."""
        from ..analysis.seeds import compare_groups

        groups = self.seed_groups() if groups is None else groups
        found = []
        for i, first in enumerate(groups):
            for second in groups[i + 1:]:
                if first.n < 2 or second.n < 2 or first.settings.get("language") != second.settings.get("language"):
                    continue
                for metric in self.metrics:
                    if metric.key in first.summaries and metric.key in second.summaries:
                        found.append(compare_groups(first, second, metric.key))
        return found

    def as_dict(self) -> dict:
        groups = self.seed_groups()
        return {"format": "neuronreg-report", "tool_version": tool_version(), "created": now(),
                "base_model": self.base_model,
                "seed_groups": [group.to_dict() for group in groups],
                "interference": [row.to_dict() for row in self.interference()],
                "comparisons": [c.to_dict() for c in self.comparisons(groups)],
                "metrics": [{"key": m.key, "task": m.task, "metric": m.metric, "language": m.language,
                             "benchmark": m.benchmark, "higher_is_better": m.higher_is_better} for m in self.metrics],
                "rows": [{**row.as_dict(), "change": {m.key: self.change(row, m.key) for m in self.metrics
                                                      if self.change(row, m.key) is not None}
                          if row is not self.base else {}} for row in self.rows()]}

    def csv_text(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        head = ["run", "subset", "language", "trainable_parameters", "trainable_share", "train_tokens", "steps",
                "wall_seconds"]
        writer.writerow(head + [c for m in self.metrics for c in (m.key, f"{m.key} change")])
        for row in self.rows():
            cells = [row.label, row.subset, row.language, row.trainable_parameters, row.trainable_share,
                     row.train_tokens, row.steps, row.wall_seconds]
            for m in self.metrics:
                change = self.change(row, m.key) if row is not self.base else None
                cells += [row.metrics.get(m.key), change]
            writer.writerow(["" if c is None else c for c in cells])
        return buffer.getvalue()


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.2f}"


# -- reading runs -------------------------------------------------------------------------------------
@dataclass
class _Run:
    folder: Path
    config: RunConfig
    heldout: dict | None
    tuned: dict[str, TaskResult]
    base: dict[str, TaskResult]


def _read_run(folder: str | Path) -> _Run:
    folder = Path(folder)
    config = read_run_config(folder)
    heldout = None
    heldout_path = results_folder(folder) / HELDOUT_FILE
    if heldout_path.is_file():
        try:
            heldout = load_json(heldout_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            log.warning("%s is not readable JSON; its held-out scores are left out.", heldout_path)
    return _Run(folder, config, heldout if isinstance(heldout, dict) else None, read_results(results_folder(folder)),
                read_results(results_folder(folder, base=True)))


def _base_model(run: _Run) -> dict:
    base = run.config.base_model
    return {"name": base.name, "id": base.id, "revision": base.revision}


def _same_base(runs: list[_Run]) -> dict:
    first = _base_model(runs[0])
    for run in runs[1:]:
        other = _base_model(run)
        if other["name"] != first["name"] or (first["revision"] and other["revision"]
                                              and other["revision"] != first["revision"]):
            raise FinetuneError(
                f"{run.folder} was trained on {other['name']} ({other['revision'] or 'revision unknown'}), "
                f"{runs[0].folder} on {first['name']} ({first['revision'] or 'revision unknown'}): a report compares "
                "runs of one base model; report the others separately.")
    return first


def _heldout_metrics(run: _Run, label: str) -> dict[tuple[str, str], float]:
    """(language, metric) -> value of the run ("tuned") or of its base ("base")."""
    found = {}
    for code, scores in ((run.heldout or {}).get("scores") or {}).items():
        if not isinstance(scores, dict):
            continue
        for metric in HELDOUT_METRICS:
            value = scores.get(f"{label}_{metric}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[(code, metric)] = float(value)
    return found


def _task_metrics(results: dict[str, TaskResult]) -> dict[str, tuple[TaskResult, str, float]]:
    found = {}
    for name, result in results.items():
        for metric, value in result.metrics.items():
            if "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            found[f"{name}/{metric}"] = (result, metric, float(value))
    return found


def _run_row(run: _Run, label: str) -> Row:
    config, training = run.config, run.config.training
    tokens = training.steps * training.batch_size * training.grad_accum * training.seq_len
    metrics = {f"heldout_{code}/{metric}": value for (code, metric), value in _heldout_metrics(run, "tuned").items()}
    metrics.update({key: value for key, (_, _, value) in _task_metrics(run.tuned).items()})
    return Row(label=label, subset=config.subset, language=config.language.code,
               flores200=config.language.flores200, trainable_parameters=config.trainable_parameters,
               trainable_share=config.trainable_share, train_tokens=tokens, steps=training.steps,
               wall_seconds=training.seconds_this_session, metrics=metrics, folder=run.folder, config=config)


def collect(folders: list[str | Path]) -> Report:
    """The report over ``folders`` (fine-tuning runs of ONE base model; FinetuneError otherwise).

    The base row takes each base score from the first run that measured it; where two runs measured
    the base differently (other held-out text, another ``limit``), a warning says so.
    """
    if not folders:
        raise NeuronregError("Name at least one run folder.")
    runs = [_read_run(folder) for folder in folders]
    base_model = _same_base(runs)
    rows = [_run_row(run, label) for run, label in zip(runs, run_labels([run.folder for run in runs], BASE_LABEL))]
    base = Row(label=BASE_LABEL, subset=BASE_LABEL)
    info: dict[str, Metric] = {}
    for run in runs:
        for (code, metric), value in _heldout_metrics(run, "base").items():
            _keep_base(base, f"heldout_{code}/{metric}", value, run)
        for key, (_, _, value) in _task_metrics(run.base).items():
            _keep_base(base, key, value, run)
        for (code, metric) in _heldout_metrics(run, "tuned"):
            info.setdefault(f"heldout_{code}/{metric}", Metric(f"heldout_{code}/{metric}", f"heldout_{code}", metric,
                                                               code, False, "heldout"))
        for key, (result, metric, _) in [*_task_metrics(run.tuned).items(), *_task_metrics(run.base).items()]:
            higher = result.higher_is_better.get(metric.split("[")[0], True)
            info.setdefault(key, Metric(key, result.task, metric, result.language, higher, result.benchmark))
    return Report(base_model, base, rows, sorted(info.values(), key=_metric_order))


# What a run's seed decides, and what a session changes: left out when grouping runs by their settings.
_NOT_SETTINGS = {"seed", "seconds_this_session", "resumed_from_step", "device", "world_size", "device_map",
                 "chunked_loss", "train_rows", "eval_rows", "extra"}


def run_record(report: Report, row: Row) -> dict:
    """One run as a flat record for seed statistics: what it trained (subset, language, the mask's selection
    and method, the training settings but its seed and the facts of its session) and every metric as its
    change against the base model."""
    config = row.config
    record = {"subset": row.subset, "language": row.language}
    if config is not None:  # a row built by hand has no settings to group by
        if config.mask is not None:
            record["mask_selection"] = config.mask.source.selection if config.mask.source else None
            record["mask_rate"] = config.mask.selection.top_rate if config.mask.selection else None
        for key, value in sorted(config.training.to_dict().items()):
            if key not in _NOT_SETTINGS:
                record[key] = value
        record["seed"] = config.training.seed
    for metric in report.metrics:
        change = report.change(row, metric.key)
        if change is not None:
            record[metric.key] = change
    return record


def _keep_base(base: Row, key: str, value: float, run: _Run) -> None:
    if key not in base.metrics:
        base.metrics[key] = value
    elif not math.isclose(base.metrics[key], value, rel_tol=1e-6, abs_tol=1e-9):
        log.warning("The base model's %s differs between runs (%s in %s, not %s): they were measured with other "
                    "settings; the report shows the first.", key, _number(value), run.folder,
                    _number(base.metrics[key]))


def _metric_order(metric: Metric) -> tuple:
    kinds = ["heldout", "flores", "belebele", "sib200", "english", None]
    kind = metric.benchmark if metric.benchmark in kinds else None
    return (kinds.index(kind), metric.language or "", metric.task, metric.metric)


# -- writing ------------------------------------------------------------------------------------------
def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", key.replace("++", "pp")).strip("_.") or "metric"


def save_report(report: Report, out: str | Path, *, target: str | None = None) -> dict[str, Path]:
    """report.csv, report.json, one PNG per metric (``<task>_<metric>.png``) and ``tradeoff.png`` (its
    trained-language axis: ``target``, see :func:`tradeoff`); the PNGs not without matplotlib (the ``plots``
    extra). Returns the paths written."""
    from ..plots import drawn, metric_bars, tradeoff_scatter

    out = output_folder(out)
    paths = {"csv": atomic_write_text(out / "report.csv", report.csv_text()),
             "json": atomic_write_json(out / "report.json", report.as_dict())}
    labels = [row.label for row in report.rows()]
    for metric in report.metrics:
        values = [row.metrics.get(metric.key) for row in report.rows()]
        direction = "higher is better" if metric.higher_is_better else "lower is better"
        paths[metric.key] = drawn(metric_bars, labels, values, out / f"{_slug(metric.key)}.png",
                                  title=f"{metric.key} ({direction})", ylabel=metric.metric)
    scatter = tradeoff(report, target)
    if scatter is not None:
        points, xlabel, ylabel = scatter
        paths["tradeoff"] = drawn(tradeoff_scatter, points, out / "tradeoff.png", xlabel=xlabel, ylabel=ylabel,
                                  title="Trained language against English, change vs base model")
    return {kind: path for kind, path in paths.items() if path is not None}


# The score of the trained language that the trade-off plot takes, the first every run has:
# (key pattern, axis label); {code} is the language's FLORES-200 code, {lang} neuronreg's.
TARGET_SCORES = ((f"flores200_{PIVOT}-{{code}}/chrf++", "FLORES-200 eng->X chrF++"),
                 ("belebele_{code}/acc", "Belebele accuracy"), ("sib200_{code}/acc", "SIB-200 accuracy"),
                 ("heldout_{lang}/bits_per_character", "held-out bits per character (lower is better)"))


def tradeoff(report: Report, target: str | None = None) -> tuple[list[tuple[str, float, float]], str, str] | None:
    """Points (run, change in English, change in its trained language) for the trade-off scatter, and the
    axis labels; None when the runs lack either kind of score.

    English: the mean accuracy over the English suite's tasks that every row has, else the held-out
    English bits per character. The trained language: ``target`` (a metric key as the report names
    it, where ``{code}`` stands for the language's FLORES-200 code and ``{lang}`` for neuronreg's, e.g.
    ``heldout_{lang}/bits_per_character``; a SettingsError when a run lacks it), else the first of
    ``TARGET_SCORES`` every run has.
    """
    runs = [row for row in report.runs if row.language and row.language != ENGLISH]
    if not runs:  # a run that trained English has no trade-off against it
        return None
    english = [f"{task}/acc" for task in ENGLISH_SUITE if all(f"{task}/acc" in row.metrics for row in report.rows())]
    if english:
        def english_change(row):
            return sum(report.change(row, key) for key in english) / len(english)
        xlabel = f"English suite mean accuracy ({len(english)} tasks), change"
    elif all("heldout_en/bits_per_character" in row.metrics for row in report.rows()):
        def english_change(row):
            return report.change(row, "heldout_en/bits_per_character")
        xlabel = "English held-out bits per character, change (lower is better)"
    else:
        return None
    if target is not None:
        titles = dict(TARGET_SCORES)
        candidates = [(target, titles.get(target, target.replace("{code}", "X").replace("{lang}", "X")))]
        lacking = [row.label for row in runs if report.change(row, _target_key(target, row)) is None]
        if lacking:
            raise SettingsError(f"No score {target!r} for run(s) {', '.join(lacking)} and their base model; the "
                                f"report has: {', '.join(m.key for m in report.metrics)}.")
    else:
        candidates = TARGET_SCORES
    for pattern, title in candidates:
        keys = {row.label: _target_key(pattern, row) for row in runs}
        if all(report.change(row, keys[row.label]) is not None for row in runs):
            points = [(row.label, english_change(row), report.change(row, keys[row.label])) for row in runs]
            return points, xlabel, f"Trained language: {title}, change"
    return None


def _target_key(pattern: str, row: Row) -> str:
    return pattern.replace("{code}", row.flores200 or "").replace("{lang}", row.language or "")


# -- for a model card --------------------------------------------------------------------------------
def card_rows(folder: str | Path) -> tuple[Row, Row]:
    """The run's row and its base model's row (the scores the run folder holds), for a model card."""
    report = collect([folder])
    return report.runs[0], report.base


TASK_TYPES = {"flores": ("translation", "Translation"), "belebele": ("multiple-choice", "Reading comprehension"),
              "sib200": ("text-classification", "Topic classification")}


# lm-eval's metric names -> the Hub's metric ids (the original name stays in each metric's "name").
METRIC_TYPES = {"acc": "accuracy", "acc_norm": "accuracy", "chrf++": "chrf", "chrf": "chrf", "bleu": "bleu",
                "exact_match": "exact_match", "f1": "f1", "ter": "ter", "perplexity": "perplexity"}


def eval_results(folder: str | Path) -> list:
    """The run's scores as huggingface_hub EvalResults for a model card's ``model-index``: one per task
    (or held-out language) and metric, with its dataset, config (the language, or the language pair) and
    split; empty when the run has no scores yet."""
    from huggingface_hub import EvalResult

    run = _read_run(folder)
    results = []
    for task, result in sorted(run.tuned.items()):
        config = result.config
        kind, title = TASK_TYPES.get(result.benchmark or "", ("multiple-choice", "Multiple choice")
                                     if config.get("output_type") == "multiple_choice"
                                     else ("text-generation", "Text generation"))
        dataset = config.get("dataset_path") or config.get("flores200_hub") or config.get("sib200_hub") or task
        split = config.get("test_split") or config.get("validation_split")
        kwargs = config.get("dataset_kwargs") if isinstance(config.get("dataset_kwargs"), dict) else {}
        dataset_config = config.get("dataset_name") or kwargs.get("sib_language") or (
            f"{kwargs['flores_source']}-{kwargs['flores_target']}" if "flores_source" in kwargs else None) \
            or result.language
        shots = next(iter(result.n_shot.values()), None)
        for metric, value in result.metrics.items():
            if "_stderr" in metric:
                continue
            results.append(EvalResult(task_type=kind, task_name=title, dataset_type=str(dataset), dataset_name=task,
                                      dataset_config=dataset_config, dataset_split=split,
                                      metric_type=METRIC_TYPES.get(metric, metric), metric_value=value,
                                      metric_name=f"{metric} ({task})",
                                      metric_args={"num_fewshot": shots} if shots is not None else None))
    data = ((run.heldout or {}).get("settings") or {}).get("data") or "held-out text"
    for (code, metric), value in sorted(_heldout_metrics(run, "tuned").items()):
        results.append(EvalResult(task_type="text-generation", task_name="Language modelling", dataset_type="text",
                                  dataset_name=f"held-out text ({data})", dataset_config=code, dataset_split="heldout",
                                  metric_type=METRIC_TYPES.get(metric, metric), metric_value=value,
                                  metric_name=f"{metric} ({code})"))
    return results
