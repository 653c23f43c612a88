"""Benchmarks through lm-evaluation-harness, on a model already in memory.

A benchmark name stands for lm-eval tasks, one or two per language, named through the language's
FLORES-200 code (``Language.flores200``, e.g. ``swh_Latn``):

========== =================================================== ======================================
benchmark  lm-eval task(s)                                      defined by
========== =================================================== ======================================
flores     ``flores200_eng_Latn-<code>``, ``flores200_<code>-eng_Latn``  neuronreg (``neuronreg/evaluation/tasks``)
belebele   ``belebele_<code>``                                  lm-eval
sib200     ``sib200_<code>``                                    neuronreg (``neuronreg/evaluation/tasks``)
english    hellaswag, arc_easy, arc_challenge, piqa, winogrande, mmlu   lm-eval (no language)
========== =================================================== ======================================

Any other lm-eval task or group may be named as it is. A language without a FLORES-200 code, or
that a benchmark does not cover, is skipped with a warning. The model is wrapped, not copied:
lm-eval's ``HFLM(pretrained=model, tokenizer=tokenizer)`` runs it as it is (with a run's deltas on
it, or an adapter), and ``lm_eval.simple_evaluate`` does all the scoring. neuronreg's own tasks
(FLORES-200 translation, SIB-200 for every language) are lm-eval task configs shipped in the
package (``TASKS_PATH``), found through lm-eval's include path.

lm-eval is optional (``pip install 'neuronreg[eval]'``) and imported only here, when needed.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CorpusError, NeuronregError, SettingsError
from ..extras import require
from ..files import atomic_write_text
from ..hubcalls import first_line, offline_mode
from ..limits import load_json
from ..provenance import now, tool_version

log = logging.getLogger("neuronreg")

TASKS_PATH = Path(__file__).resolve().parent / "tasks"  # neuronreg's lm-eval task configs
PIVOT = "eng_Latn"
ENGLISH_SUITE = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "mmlu")
FORMAT = "neuronreg-benchmark"


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    tasks: tuple[str, ...]  # lm-eval task names; "{code}" stands for the language's FLORES-200 code
    defined_by: str  # "lm-eval" or "neuronreg"
    language: str | None = None  # the one language of a benchmark that is not per language

    @property
    def per_language(self) -> bool:
        return any("{code}" in task for task in self.tasks)


BENCHMARKS = {b.name: b for b in (
    Benchmark("flores", "FLORES-200 translation", (f"flores200_{PIVOT}-{{code}}", f"flores200_{{code}}-{PIVOT}"),
              "neuronreg"),
    Benchmark("belebele", "Belebele", ("belebele_{code}",), "lm-eval"),
    Benchmark("sib200", "SIB-200", ("sib200_{code}",), "neuronreg"),
    Benchmark("english", "the English suite", ENGLISH_SUITE, "lm-eval", language="en"),
)}
ALIASES = {"flores200": "flores", "flores-200": "flores", "sib": "sib200", "sib-200": "sib200", "en": "english"}


@dataclass(frozen=True)
class BenchmarkTask:
    """One lm-eval task (or group) to run, and what neuronreg knows it measures."""

    name: str
    benchmark: str | None = None  # None: an lm-eval task named as it is
    language: str | None = None  # neuronreg language code; None when the task has none


@dataclass
class TaskResult:
    """One task's scores for one model, as saved to ``eval/<task>.json``."""

    task: str
    metrics: dict[str, float]  # "acc", "acc_stderr", "chrf++" ... of the task (or group) itself
    benchmark: str | None = None
    language: str | None = None
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    versions: dict[str, object] = field(default_factory=dict)  # the task's (and its subtasks') versions
    n_shot: dict[str, int] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # {"original": N, "effective": n}
    subtasks: dict[str, dict[str, float]] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # dataset, splits, output type, few-shot of the task
    settings: dict = field(default_factory=dict)  # limit, num_fewshot, batch_size
    lm_eval_version: str = ""
    about: dict = field(default_factory=dict)  # what the caller adds: the run, the base model, base or tuned
    created: str = field(default_factory=now)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "tool_version": tool_version(), "created": self.created, "task": self.task,
                "benchmark": self.benchmark, "language": self.language, "lm_eval_version": self.lm_eval_version,
                "versions": self.versions, "n_shot": self.n_shot, "samples": self.samples,
                "settings": self.settings, "metrics": self.metrics, "higher_is_better": self.higher_is_better,
                "subtasks": self.subtasks, "config": self.config, **self.about}

    @classmethod
    def from_dict(cls, data: dict, where: str) -> TaskResult:
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("task"), str) \
                or not isinstance(data.get("metrics"), dict):
            raise NeuronregError(f"{where} is not a benchmark result of neuronreg.")
        known = {"format", "tool_version", "created", "task", "benchmark", "language", "lm_eval_version",
                 "versions", "n_shot", "samples", "settings", "metrics", "higher_is_better", "subtasks", "config"}
        return cls(task=data["task"], metrics=data["metrics"], benchmark=data.get("benchmark"),
                   language=data.get("language"), higher_is_better=data.get("higher_is_better") or {},
                   versions=data.get("versions") or {}, n_shot=data.get("n_shot") or {},
                   samples=data.get("samples") or {}, subtasks=data.get("subtasks") or {},
                   config=data.get("config") or {}, settings=data.get("settings") or {},
                   lm_eval_version=data.get("lm_eval_version") or "",
                   about={k: v for k, v in data.items() if k not in known}, created=data.get("created") or "")


def require_lm_eval():
    """The ``lm_eval`` module, or MissingExtra saying how to install it."""
    return require("lm_eval", "eval", "Benchmarks need lm-evaluation-harness")


def lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    require_lm_eval()
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return getattr(require_lm_eval(), "__version__", "unknown")


def task_manager(data: dict | None = None, include_path: Iterable[str | Path] = ()):
    """lm-eval's TaskManager over its own tasks, neuronreg's (``TASKS_PATH``) and those in the folders
    ``include_path`` (task YAML files of your own; theirs win over a task of the same name).

    ``data`` goes to every task as metadata; neuronreg's tasks read ``flores200_dir`` (the official
    FLORES-200 archive, unpacked), ``flores200_hub``, ``sib200_dir`` (the SIB-200 repository's
    ``data/annotated``) and ``sib200_hub`` from it.
    """
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    meta = {k: str(v) for k, v in (data or {}).items() if v is not None}
    with _lm_eval_quiet():
        return TaskManager(include_path=[str(TASKS_PATH), *map(str, include_path)], metadata=meta or None)


def resolve_tasks(names: Iterable[str], languages: Sequence, manager) -> list[BenchmarkTask]:
    """The lm-eval tasks that ``names`` (benchmarks or lm-eval task names) stand for in ``languages``
    (objects with ``code``, ``name`` and ``flores200``, such as manifest languages).

    A language a benchmark has no task for is skipped with a warning; nothing left to run, or a name
    that is neither a benchmark nor an lm-eval task, is a SettingsError.
    """
    known = set(manager.all_tasks)
    tasks: list[BenchmarkTask] = []
    skipped: list[str] = []
    for raw in names:
        name = raw.strip()
        key = ALIASES.get(name.lower(), name.lower())
        if key in BENCHMARKS:
            bench = BENCHMARKS[key]
            if not bench.per_language:
                for task in bench.tasks:
                    if task in known:
                        tasks.append(BenchmarkTask(task, key, bench.language))
                    else:
                        skipped.append(f"this lm-eval has no task {task} ({bench.title})")
                continue
            for lang in languages:
                label = f"{lang.name} ({lang.code})"
                if not lang.flores200:
                    skipped.append(f"{label} has no FLORES-200 code, so no {bench.title} task")
                    continue
                if key == "flores" and lang.flores200 == PIVOT:
                    skipped.append(f"{bench.title} is into and out of English, not of {label}")
                    continue
                for task in (t.format(code=lang.flores200) for t in bench.tasks):
                    if task in known:
                        tasks.append(BenchmarkTask(task, key, lang.code))
                    else:
                        skipped.append(f"{bench.title} has no {label} (no task {task})")
        elif name in known:
            tasks.append(BenchmarkTask(name))
        else:
            close = difflib.get_close_matches(name, [*BENCHMARKS, *known], n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SettingsError(f"Unknown task {name!r}: neither a benchmark ({', '.join(BENCHMARKS)}) nor a task "
                                f"of lm-evaluation-harness {lm_eval_version()}.{hint}")
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise SettingsError("Nothing to evaluate: " + "; ".join(skipped) + ".")
    for reason in skipped:
        log.warning("Skipped: %s.", reason)
    return tasks


def load_tasks(tasks: Sequence[BenchmarkTask], manager) -> list:
    """lm-eval's Task (or Group) objects, their data loaded; a task whose data cannot be had is a
    CorpusError naming it (before any model is run)."""

    built = []
    for task in tasks:
        try:
            with _lm_eval_quiet():
                loaded = manager.load([task.name])
        except Exception as exc:  # lm-eval and datasets raise many kinds; each is the task's data missing
            first = first_line(exc)
            offline = offline_mode()
            raise CorpusError(f"The data of task {task.name} could not be loaded ({type(exc).__name__}: {first}).",
                              fix="offline" if offline else None,
                              advice="Unset HF_HUB_OFFLINE to reach the Hub." if offline else None) from exc
        groups = loaded.get("groups") or {}
        built.append(groups[task.name] if task.name in groups else loaded["tasks"][task.name])
    return built


@contextmanager
def _lm_eval_quiet():
    """lm-eval logs a warning for every model passed in memory and every custom dataset: keep them to
    errors while it runs (NEURONREG_DEBUG shows everything). Where progress bars are off
    (:func:`neuronreg.progress.disable_progress_bars`, or HF_HUB_DISABLE_PROGRESS_BARS), its bars and
    those of ``datasets`` are off too: lm-eval draws them on stderr with no switch, so stderr goes
    nowhere meanwhile (our log keeps its own stream). What it prints goes to stderr (or nowhere) too."""
    import os
    import sys
    from contextlib import ExitStack, redirect_stderr, redirect_stdout

    from ..progress import progress_bars_disabled

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval")]
    levels = [logger.level for logger in loggers]
    if not os.environ.get("NEURONREG_DEBUG"):
        for logger in loggers:
            logger.setLevel(logging.ERROR)
    with ExitStack() as stack:
        if progress_bars_disabled():
            import datasets

            if datasets.is_progress_bar_enabled():
                datasets.disable_progress_bars()
                stack.callback(datasets.enable_progress_bars)
            stack.enter_context(redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
        # lm-eval print()s its chatter ("bootstrapping for stddev: bleu"): stdout holds results only
        stack.enter_context(redirect_stdout(sys.stderr))
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def check_settings(limit: int | float | None, num_fewshot: int | None) -> int | float | None:
    """SettingsError for a limit or few-shot count lm-eval cannot use; the limit as lm-eval takes it (a
    number below 1 is a share of the examples, one of 1 or more a count)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))
                              or not math.isfinite(limit) or limit <= 0):
        raise SettingsError(f"limit must be a positive number, got {limit!r}.")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                    or num_fewshot < 0):
        raise SettingsError(f"num_fewshot must be a whole number, 0 or more, got {num_fewshot!r}.")
    return int(limit) if limit is not None and limit >= 1 else limit


def result_settings(limit: int | float | None, num_fewshot: int | None, batch_size: int) -> dict:
    """The settings a TaskResult records (and that decide whether two results are comparable): the limit
    as lm-eval takes it (checked), the few-shot count and the batch size."""
    return {"limit": check_settings(limit, num_fewshot), "num_fewshot": num_fewshot, "batch_size": batch_size}


def evaluate_model(model, tokenizer, tasks: Sequence[BenchmarkTask], *, manager, limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 1, log_samples: bool = False,
                   loaded: list | None = None) -> tuple[dict[str, TaskResult], dict]:
    """Run ``tasks`` on ``model`` (in memory, as it is) with lm-eval; the results per task, and
    lm-eval's own output (with the per-example ``samples`` when ``log_samples``).

    ``limit`` (examples per task; below 1, a share), ``num_fewshot`` and ``batch_size`` go to
    ``lm_eval.simple_evaluate`` unchanged. ``loaded`` are the tasks' objects from :func:`load_tasks`
    (loaded here when not given).
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    settings = result_settings(limit, num_fewshot, batch_size)
    objects = loaded if loaded is not None else load_tasks(tasks, manager)
    with _lm_eval_quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        output = lm_eval.simple_evaluate(model=lm, tasks=list(objects), task_manager=manager, limit=settings["limit"],
                                         num_fewshot=num_fewshot, batch_size=batch_size, log_samples=log_samples)
    version = lm_eval_version()
    return {task.name: _task_result(task, output, version, settings) for task in tasks}, output


def _metrics(entry: dict) -> dict[str, float]:
    """lm-eval's ``"acc,none": 0.5`` as ``"acc": 0.5`` (a filter other than none: ``"acc[strict-match]"``)."""
    metrics = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, str) or value is None:
            continue
        metric, _, filter_name = key.partition(",")
        name = metric if filter_name == "none" else f"{metric}[{filter_name}]"
        try:
            metrics[name] = float(value)
        except (TypeError, ValueError):
            continue
    return metrics


def _subtasks(name: str, output: dict) -> list[str]:
    children = (output.get("group_subtasks") or {}).get(name) or []
    found = []
    for child in children:
        found.append(child)
        found.extend(_subtasks(child, output))
    return found


CONFIG_KEYS = ("dataset_path", "dataset_name", "test_split", "validation_split", "fewshot_split", "output_type",
               "num_fewshot", "doc_to_text", "target_delimiter", "dataset_kwargs")


def _task_result(task: BenchmarkTask, output: dict, version: str, settings: dict) -> TaskResult:
    results = output.get("results") or {}
    if task.name not in results:
        raise NeuronregError(f"lm-eval returned no result for {task.name}.")
    names = [task.name, *_subtasks(task.name, output)]
    config = dict((output.get("configs") or {}).get(task.name) or {})
    if not config:  # a group: the configuration of its first task tells the dataset
        leaf = next((n for n in names[1:] if n in (output.get("configs") or {})), None)
        config = dict(output["configs"][leaf]) if leaf else {}
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    kept = {k: config[k] for k in CONFIG_KEYS if config.get(k) is not None}
    kept.update({k: v for k, v in metadata.items() if k in ("flores200_hub", "sib200_hub", "version")})
    higher = (output.get("higher_is_better") or {}).get(task.name) or {}
    versions = output.get("versions") or {}
    samples = (output.get("n-samples") or {}).get(task.name) or {}
    if not samples:  # a group: its tasks' together
        parts = [(output.get("n-samples") or {}).get(n) for n in names[1:]]
        parts = [p for p in parts if p]
        samples = {k: sum(p.get(k, 0) for p in parts) for k in ("original", "effective")} if parts else {}
    return TaskResult(
        task=task.name, benchmark=task.benchmark, language=task.language, metrics=_metrics(results[task.name]),
        higher_is_better={k: bool(v) for k, v in higher.items() if v is not None},
        versions={n: _plain(versions[n]) for n in names if n in versions},
        n_shot={n: int(v) for n, v in (output.get("n-shot") or {}).items() if n in names and v is not None},
        samples=samples, subtasks={n: _metrics(results[n]) for n in names[1:] if n in results},
        config=_plain(kept), settings=settings, lm_eval_version=version)


def _plain(value):
    """JSON-safe: whatever lm-eval put in (functions, tuples, numpy numbers) as plain values or text."""
    return json.loads(json.dumps(value, default=str))


def save_results(results: dict[str, TaskResult], folder: str | Path) -> list[Path]:
    """``<folder>/<task>.json`` for each task, each written atomically."""
    paths = []
    for name, result in results.items():
        paths.append(atomic_write_text(Path(folder) / f"{_file_stem(name)}.json",
                                       json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n"))
    return paths


def _file_stem(task: str) -> str:
    """A task name as a file name (lm-eval's names are letters, digits, '_', '-' and '.')."""
    import re

    stem = re.sub(r"[^A-Za-z0-9_.\-]", "_", task)
    return stem if stem and not stem.startswith(".") else f"_{stem}"


def read_results(folder: str | Path) -> dict[str, TaskResult]:
    """The benchmark results saved in ``folder`` (``eval/`` or ``eval/base/`` of a run), by task."""
    found = {}
    folder = Path(folder)
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            data = load_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            log.warning("%s is not readable JSON; left out.", path)
            continue
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            continue  # another file (heldout.json)
        result = TaskResult.from_dict(data, str(path))
        found[result.task] = result
    return found
