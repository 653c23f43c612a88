"""Evaluating a finished run, before (its base model) and after: perplexity and bits per character
per language on held-out text (saved to ``eval/heldout.json`` in the run folder), and benchmarks
through lm-evaluation-harness (``eval/<task>.json``, the base's in ``eval/base/<task>.json``)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..corpus import resolve_corpus
from ..evaluation.heldout import Score, heldout_text, score
from ..files import atomic_write_text
from ..manifest import Manifest
from ..options import LoadOptions, load_options
from ..provenance import now, tool_version
from ..resolve import language, language_codes, languages
from ..runs import HELDOUT_FILE, RunConfig, read_run_config, results_folder
from .base import load_base_model
from .method import read_run

log = logging.getLogger("neuronreg")


@dataclass
class RunEvaluation:
    run: Path
    language: str  # the language the run trained
    scores: dict[str, dict]  # language -> {"tokens", "base_loss", "tuned_loss", "base_perplexity", ...}


@dataclass(frozen=True)
class HeldoutSettings:
    """How held-out text is measured (as ``ablate`` measures it): tokens per language, row length, rows per
    forward pass, and the text's field in .jsonl/.parquet files."""

    tokens: int = 100_000
    seq_len: int = 512
    batch_size: int = 4
    text_field: str | None = None

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "seq_len": self.seq_len}


def evaluate_run(folder: str | Path, data: str, languages_: list[str] | str | None = None, *,
                 manifest: Manifest, settings: HeldoutSettings | None = None, load: LoadOptions | None = None,
                 allow_other_base: bool = False, base_scores: dict[str, dict] | None = None) -> RunEvaluation:
    """Perplexity and bits per character per language, before (base model) and after (the run) a run, on
    held-out text, measured exactly as ``ablate`` measures them (:mod:`..evaluation.heldout`).

    ``base_scores`` (language -> the ``base_*`` scores of an earlier run's evaluation on the same base
    model, text and settings, as :func:`evaluate_runs` passes them) are taken as they are instead of
    measuring the base again for those languages.

    The run is measured UNMERGED (the base weights plus the float32 deltas, or the float32 PEFT adapter
    of a lora / ia3 run, in the forward pass), which loses nothing to merging in any dtype; dense runs
    load their saved weights in the run's dtype (their float32 master weights rounded as the training's
    own forward passes used them).
    """
    settings = settings or HeldoutSettings()
    load = load_options(load)
    folder = Path(folder)
    config, method = read_run(folder)
    trained = config.language.code
    known = config.languages()
    codes = language_codes(languages_, manifest, [k.code for k in known]) if languages_ else [k.code for k in known]
    sources = {code: resolve_corpus(data, language(code, manifest, known), manifest, settings.text_field)
               for code in codes}
    base = load_base_model(folder, load, allow_other_base=allow_other_base, tokenizer=True)
    heldout = {code: heldout_text(source, code, base.tokenizer, settings.seq_len, settings.tokens)
               for code, source in sources.items()}
    scores: dict[str, dict] = {code: {"tokens": h.tokens, "characters": h.characters} for code, h in heldout.items()}

    known = base_scores or {}

    def record(label: str, model, model_device) -> None:
        for code, text in heldout.items():
            if label == "base" and code in known:
                scores[code].update({k: known[code][k] for k in BASE_SCORE_KEYS})
                continue
            result: Score = score(model, text, batch_size=settings.batch_size, device=model_device)
            scores[code][f"{label}_loss"] = result.loss
            scores[code][f"{label}_perplexity"] = result.perplexity
            scores[code][f"{label}_bits_per_character"] = result.bits_per_character

    record("base", base.model, base.device)
    tuned = method.on_base(base.model, folder, config, load)
    record("tuned", tuned, next(tuned.parameters()).device)
    outcome = RunEvaluation(folder, trained, scores)
    _saving(lambda: save_heldout(outcome, config, {
        "data": Path(data).name, **settings.to_dict(),
        "row_start": next(iter(heldout.values())).row_start,
        "corpora": {code: h.corpus.to_dict() for code, h in heldout.items()}}), folder)
    return outcome


BASE_SCORE_KEYS = ("base_loss", "base_perplexity", "base_bits_per_character")


def base_identity(folder: str | Path, dtype: str | None = None) -> tuple:
    """What makes two runs' base measurements the same: the base model (name, Hub id, revision: a local
    model's revision is its content fingerprint) and the dtype it is evaluated in."""
    config = read_run_config(folder)
    base = config.base_model
    return base.name, base.id, base.revision, dtype or config.training.dtype


@dataclass(frozen=True)
class BenchmarkSettings:
    """How benchmarks run (lm-evaluation-harness): ``limit`` examples per task (below 1: a share),
    ``num_fewshot``, ``batch_size``, ``data`` for neuronreg's tasks (local FLORES-200 / SIB-200 folders),
    ``include_path`` (folders of task YAML files of your own), and ``resume`` (keep the scores an
    interrupted evaluation already has)."""

    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 4
    data: dict | None = None
    include_path: tuple = ()
    resume: bool = False


def evaluate_runs(folders, *, tasks: list[str] | str | None = None, data: str | None = None,
                  languages: list[str] | str | None = None, manifest: Manifest, load: LoadOptions | None = None,
                  benchmark: BenchmarkSettings | None = None, heldout: HeldoutSettings | None = None,
                  allow_other_base: bool = False):
    """Evaluate several runs, each as :func:`evaluate_benchmarks` (``tasks``) and :func:`evaluate_run`
    (``data``) do, but measuring each base model once: runs on the same base (:func:`base_identity`)
    share its scores, task by task and language by language, and each run's ``eval/base/`` gets them.
    This is what makes the paper's six runs per language cost seven evaluations instead of twelve.

    Yields ``(folder, BenchmarkEvaluation | None, RunEvaluation | None)`` per run, as each is done.
    """
    load = load_options(load)
    shared_benchmarks: dict[tuple, dict] = {}
    shared_heldout: dict[tuple, dict] = {}
    keys = [base_identity(folder, load.dtype) for folder in folders]  # every run folder read before hours of work
    for folder, key in zip(folders, keys):
        bench = evaluate_benchmarks(folder, tasks, languages, manifest=manifest, load=load,
                                    settings=benchmark, allow_other_base=allow_other_base,
                                    base_results=shared_benchmarks.get(key)) if tasks else None
        if bench:
            shared_benchmarks.setdefault(key, {}).update(bench.base)
        outcome = evaluate_run(folder, data, languages, manifest=manifest, settings=heldout, load=load,
                               allow_other_base=allow_other_base, base_scores=shared_heldout.get(key)) \
            if data else None
        if outcome:
            shared_heldout.setdefault(key, {}).update({code: {k: s[k] for k in BASE_SCORE_KEYS}
                                                       for code, s in outcome.scores.items()})
        yield Path(folder), bench, outcome


def _saving(write, folder: Path):
    """Write results into the run folder; one that cannot be written (read-only, a Hub download) costs
    the files, not the scores: a warning, and the caller still gets them."""
    try:
        return write()
    except OSError as exc:
        log.warning("Could not save the scores in %s (%s); they are not in its eval/ folder.", folder,
                    exc.strerror or exc)
        return None


def save_heldout(outcome: RunEvaluation, config: RunConfig, settings: dict) -> Path:
    """``eval/heldout.json``: what ``evaluate --json`` prints, with the settings and the base model."""
    data = {"format": "neuronreg-heldout", "tool_version": tool_version(), "created": now(),
            "run": outcome.run.name, "trained_language": outcome.language, "scores": outcome.scores,
            "settings": settings, "base_model": _base_of(config)}
    return atomic_write_text(results_folder(outcome.run) / HELDOUT_FILE, json.dumps(data, indent=2) + "\n")


def _base_of(config: RunConfig) -> dict:
    return {"name": config.base_model.name, "id": config.base_model.id, "revision": config.base_model.revision}


@dataclass
class BenchmarkEvaluation:
    run: Path
    language: str  # the language the run trained
    base: dict  # task -> TaskResult of the base model (empty when not measured)
    tuned: dict  # task -> TaskResult of the run
    files: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {name: {"base": self.base[name].metrics if name in self.base else None,
                       "tuned": result.metrics} for name, result in self.tuned.items()}


def evaluate_benchmarks(folder: str | Path, tasks: list[str] | str, languages_: list[str] | str | None = None, *,
                        manifest: Manifest, settings: BenchmarkSettings | None = None,
                        load: LoadOptions | None = None, allow_other_base: bool = False, base: bool = True,
                        base_results: dict | None = None) -> BenchmarkEvaluation:
    """Benchmarks through lm-evaluation-harness on the run's base model and on the run, in memory.

    ``tasks`` are benchmarks (``flores``, ``belebele``, ``sib200``, ``english``) or lm-eval task names,
    resolved per language (default: the language the run trained) through its FLORES-200 code (see
    :mod:`neuronreg.evaluation.benchmarks`). The base model is measured first (``base=False`` skips
    it), then the run as its method puts it on the same model in memory, unmerged (exact in any dtype;
    an adapter run wraps the base, a dense run loads its own weights). Results go to ``eval/<task>.json``
    and ``eval/base/<task>.json`` in the run folder. ``base_results`` (task -> TaskResult of the same base
    model, as :func:`evaluate_runs` passes them) are taken as they are, where measured with the same
    settings, instead of measuring the base again. With ``settings.resume``, the scores already in the
    run's ``eval/`` (and ``eval/base/``) are kept where they were measured with the same settings,
    lm-eval version and base model, after the run was made; only the rest is measured.
    """
    from ..evaluation import benchmarks as bm

    settings = settings or BenchmarkSettings()
    load = load_options(load)
    folder = Path(folder)
    config, method = read_run(folder)
    names = [part.strip() for item in ([tasks] if isinstance(tasks, str) else tasks) for part in item.split(",")
             if part.strip()]
    known = config.languages()
    langs = languages(languages_, manifest, known) if languages_ else [language(k.code, manifest, known)
                                                                       for k in known]
    same = bm.result_settings(settings.limit, settings.num_fewshot, settings.batch_size)  # checked before any work
    manager = bm.task_manager(settings.data, settings.include_path)
    chosen = bm.resolve_tasks(names, langs, manager)
    loaded = bm.load_tasks(chosen, manager)  # every task's data before any model is loaded
    run_with = dict(manager=manager, limit=settings.limit, num_fewshot=settings.num_fewshot,
                    batch_size=settings.batch_size)
    about = {"run": folder.name, "base_model": _base_of(config), "trained_language": config.language.code}
    version = bm.lm_eval_version()

    def reusable(pool: dict) -> dict:
        """The chosen tasks' results in ``pool`` measured as this call would measure them, after the run."""
        return {task.name: pool[task.name] for task in chosen if task.name in pool
                and pool[task.name].settings == same and pool[task.name].lm_eval_version == version
                and pool[task.name].about.get("base_model") == about["base_model"]
                and pool[task.name].created >= config.created}

    def saved(base: bool) -> dict:
        return bm.read_results(results_folder(folder, base=base)) if settings.resume else {}

    done = reusable(saved(False))
    known = reusable({**saved(True), **(base_results or {})})
    outcome = BenchmarkEvaluation(folder, config.language.code, {}, {})
    missing = [(task, obj) for task, obj in zip(chosen, loaded) if task.name not in known] if base else []
    model = tokenizer = None
    if missing or any(task.name not in done for task in chosen):
        loaded_base = load_base_model(folder, load, allow_other_base=allow_other_base, tokenizer=True)
        model, tokenizer = loaded_base.model, loaded_base.tokenizer
        del loaded_base
    else:
        log.info("%s: every score is already in %s; nothing measured.", folder, results_folder(folder))
    if base:
        measured = {}
        if missing:
            measured, _ = bm.evaluate_model(model, tokenizer, [t for t, _ in missing],
                                            loaded=[obj for _, obj in missing], **run_with)
            loaded = None  # lm-eval's task objects hold the last run's state: load them afresh
        outcome.base = {task.name: copy.copy(known.get(task.name) or measured[task.name]) for task in chosen}
        for result in outcome.base.values():
            result.about = {**about, "model": "base"}
        outcome.files += _saving(lambda: bm.save_results(outcome.base, results_folder(folder, base=True)),
                                 folder) or []
    todo = [(task, obj) for task, obj in zip(chosen, loaded or [None] * len(chosen)) if task.name not in done]
    measured = {}
    if todo:
        model = method.on_base(model, folder, config, load)  # the run on the base in memory (dense: its weights)
        measured, _ = bm.evaluate_model(model, tokenizer, [t for t, _ in todo],
                                        loaded=None if loaded is None else [obj for _, obj in todo], **run_with)
        for result in measured.values():
            result.about = {**about, "model": "tuned"}
        outcome.files += _saving(lambda: bm.save_results(measured, results_folder(folder)), folder) or []
    outcome.tuned = {task.name: done.get(task.name) or measured[task.name] for task in chosen}
    return outcome
