"""``neuronreg analyze``: what the seed paper shows beyond benchmark scores, over fine-tuning runs of one base.

Three analyses, each defined exactly in :mod:`neuronreg.analysis`:

* **representational alignment** (:mod:`neuronreg.analysis.alignment`): on line-aligned parallel text,
  per layer, how close each language's sentence representations (the mean over a sentence's tokens of
  the residual stream after the layer; the model's BOS is fed, not pooled) are to the pivot's (English):
  the cosine of matched pairs against mismatched ones, and retrieval accuracy both ways among the N
  sentences, each language's mean vector subtracted first (``centred``; the raw cosines are kept too).
  Measured for the base model and for every run (its change applied as loading applies it);
* **weight updates** (:mod:`neuronreg.analysis.updates`): per layer and MLP projection, the norm of each
  run's update and its size relative to the base weight, how it spreads over neurons, and the share of
  it that falls on the language's LAPE neurons against random neurons of the same count per layer. The
  update is what the run's method says it is (:meth:`FinetuneMethod.updates`: the delta rows and
  columns, LoRA's B @ A, a dense run's difference of weights);
* **training dynamics** (:mod:`neuronreg.analysis.dynamics`): each run's per-step log (``steps.csv``:
  training loss, gradient norm, learning rate; the validation loss where measured), or for runs made
  before it existed, their validation curve.

:func:`analyze` returns an :class:`AnalysisReport` (records only); :func:`save_analysis` writes JSON, CSV and
plots; the command line prints the tables.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..corpus import resolve_corpus
from ..errors import CorpusError, NeuronregError, SettingsError
from ..files import atomic_csv, atomic_write_json, output_folder
from ..manifest import Manifest
from ..options import LoadOptions, load_options
from ..progress import progress
from ..provenance import now, tool_version
from ..resolve import language, language_codes
from ..runs import STEPS_FILE, RunConfig, run_labels
from ..store.local import LocalRegistry
from .base import load_base_model
from .method import read_run

log = logging.getLogger("neuronreg")
PARTS = ("alignment", "updates", "dynamics")


@dataclass(frozen=True)
class AnalyzeSettings:
    """Which analyses (``parts``), on which parallel text (a folder of line-aligned files, one per language,
    named by any of its codes: NTREX-128 or FLORES-200 ``devtest``), which languages against which
    ``pivot`` (default: the runs' trained languages), how many sentences, and the random draws of the
    mask-share control."""

    parallel: str | None = None
    languages: tuple[str, ...] | None = None
    pivot: str = "en"
    sentences: int = 200
    batch_size: int = 8
    parts: tuple[str, ...] = PARTS
    draws: int = 1000
    seed: int = 0
    # The selection every run's update share is measured on (a SelectionRef, a name or a top rate). None:
    # a row-sparse run's own selection, a dense or adapter run's model default; give one to compare
    # runs of different kinds on the same neurons.
    selection: object | None = None

    def __post_init__(self):
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise SettingsError(f"Analyses are {', '.join(PARTS)}; not {', '.join(unknown) or 'none'}.")
        if "alignment" in self.parts and not self.parallel:
            raise SettingsError("The alignment needs parallel text (a folder of line-aligned files).",
                                fix="parallel")
        if self.sentences < 2:
            raise SettingsError("sentences must be at least 2 (retrieval picks one among them).")
        if self.batch_size < 1 or self.draws < 0:
            raise SettingsError("batch_size must be at least 1 and draws at least 0.")


@dataclass
class RunAnalysis:
    """One run: its update (None when not analysed), its update's share on the language's mask (with a
    note where there is none, or it is 1 by construction), its training log and the log's summary."""

    label: str
    folder: Path
    subset: str
    language: str
    update: object | None = None  # neuronreg.analysis.updates.UpdateAnalysis
    mask_share: object | None = None  # neuronreg.analysis.updates.MaskShare
    mask_note: str = ""
    curve: object | None = None  # neuronreg.analysis.dynamics.RunCurve
    summary: dict = field(default_factory=dict)  # key -> MetricSummary

    def to_dict(self) -> dict:
        return {"label": self.label, "subset": self.subset, "language": self.language,
                "update": self.update.to_dict() if self.update is not None else None,
                "mask_share": self.mask_share.to_dict() if self.mask_share is not None else None,
                "mask_note": self.mask_note, "curve": self.curve.to_dict() if self.curve is not None else None,
                "summary": {k: v.to_dict() for k, v in self.summary.items()}}


@dataclass
class AnalysisReport:
    base_model: dict
    settings: dict
    runs: list[RunAnalysis]
    # model label ("base" or a run's) -> per language and layer, centred and raw
    alignment: dict[str, list] = field(default_factory=dict)
    alignment_raw: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"format": "neuronreg-analysis", "tool_version": tool_version(), "created": now(),
                "base_model": self.base_model, "settings": self.settings,
                "alignment": {label: [r.to_dict() for r in rows] for label, rows in self.alignment.items()},
                "alignment_raw": {label: [r.to_dict() for r in rows] for label, rows in self.alignment_raw.items()},
                "runs": [run.to_dict() for run in self.runs]}


def analyze(folders, *, settings: AnalyzeSettings | None = None, load: LoadOptions | None = None,
            registry: LocalRegistry | str | Path | None = None, manifest: Manifest | None = None) -> AnalysisReport:
    """The three analyses over ``folders`` (runs of ONE base model, read before anything loads). The base is
    loaded once (float32, CPU unless ``load`` says); each run is put on a copy of it as loading puts it."""
    from ..manifest import load_manifest

    settings = settings or AnalyzeSettings()
    manifest = manifest or load_manifest()
    load = load_options(load)
    registry = registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)
    runs = [(Path(folder), *read_run(folder)) for folder in folders]
    if not runs:
        raise NeuronregError("Name at least one run folder.")
    base = _same_base(runs)
    labels = run_labels([folder for folder, _, _ in runs])
    parallel = _parallel_text(settings, runs, manifest) if "alignment" in settings.parts else {}
    from ..store.index import SelectionRef

    chosen = SelectionRef.of(settings.selection) if settings.selection is not None else None
    report = AnalysisReport(base, {**settings.__dict__, "languages": list(parallel) or None,
                                   "selection": getattr(chosen, "name", None) or getattr(chosen, "top_rate", None)
                                   if chosen is not None else None}, [])
    for (folder, config, _), label in zip(runs, labels):
        report.runs.append(RunAnalysis(label, folder, config.subset, config.language.code))
    if "dynamics" in settings.parts:
        for run, (folder, config, _) in zip(report.runs, runs):
            _dynamics(run, folder, config)
    if not ({"alignment", "updates"} & set(settings.parts)):
        return report
    loaded = load_base_model(runs[0][0], load.but(dtype=load.dtype or "float32", device=load.device or "cpu"),
                             tokenizer=True)
    bar = progress(len(runs) + 1, "analyze", unit="model")
    try:
        if parallel:
            _align(report, "base", loaded.model, loaded.tokenizer, parallel, settings)
        bar.update(1)
        for run, (folder, config, method) in zip(report.runs, runs):
            if "updates" in settings.parts:
                _updates(run, folder, config, method, loaded.model, registry, manifest, settings)
            if parallel:
                tuned = method.on_base(copy.deepcopy(loaded.model), folder, config, load)
                _align(report, run.label, tuned, loaded.tokenizer, parallel, settings)
                del tuned
            bar.update(1)
    finally:
        bar.close()
    return report


def _same_base(runs) -> dict:
    first = runs[0][1].base_model
    for folder, config, _ in runs[1:]:
        other = config.base_model
        if other.name != first.name or (first.revision and other.revision and other.revision != first.revision):
            raise NeuronregError(f"{folder} was trained on {other.name}, {runs[0][0]} on {first.name}: analyze runs "
                                 "of one base model at a time.")
    return {"name": first.name, "id": first.id, "revision": first.revision}


def _parallel_text(settings: AnalyzeSettings, runs, manifest: Manifest) -> dict[str, list[str]]:
    from ..analysis.alignment import read_parallel

    known = [config.language for _, config, _ in runs]
    wanted = settings.languages or sorted({config.language.code for _, config, _ in runs})
    pivot = language_codes([settings.pivot], manifest)[0]
    codes = [pivot] + [code for code in language_codes(list(wanted), manifest, [k.code for k in known])
                       if code != pivot]
    if len(codes) < 2:
        raise SettingsError(f"The alignment compares languages with {pivot}: name at least one other language.")
    paths = {}
    for code in codes:
        source = resolve_corpus(settings.parallel, language(code, manifest, known), manifest)
        if source.kind != "local" or Path(source.location).suffix != ".txt":
            raise CorpusError(f"Parallel text for {code} must be a local .txt file of one sentence per line.",
                              fix="parallel")
        paths[code] = source.location
    return read_parallel(paths, limit=settings.sentences)


def _align(report: AnalysisReport, label: str, model, tokenizer, parallel: dict, settings: AnalyzeSettings) -> None:
    from ..analysis.alignment import compare_representations
    from ..analysis.representations import sentence_representations

    reps = {code: sentence_representations(model, tokenizer, lines, batch_size=settings.batch_size)
            for code, lines in parallel.items()}
    pivot = next(iter(parallel))
    report.alignment[label] = compare_representations(reps, pivot, centred=True)
    report.alignment_raw[label] = compare_representations(reps, pivot, centred=False)


def _updates(run: RunAnalysis, folder: Path, config: RunConfig, method, base_model, registry: LocalRegistry,
             manifest: Manifest, settings: AnalyzeSettings) -> None:
    from ..analysis.updates import analyse_update, mask_share, mlp_weights

    run.update = analyse_update(mlp_weights(base_model), method.updates(folder, config, base_model))
    mask = _language_mask(config, registry, manifest, settings.selection)
    if mask is None:
        which = _selection_words(settings.selection)
        run.mask_note = (f"no {which}{config.language.code} mask of {config.base_model.name} in {registry.root}: "
                         "the share on the language's neurons is not measured")
        return
    run.mask_share = mask_share(run.update.neuron_squares, mask.per_layer(), draws=settings.draws, seed=settings.seed)
    if config.subset == "lape" and config.mask is not None and config.mask.sha256 == mask.sha256():
        run.mask_note = "the run trained these very neurons: its share is 1 by construction"


def _selection_words(selection) -> str:
    """'top9 ', 'top rate 0.05 ' or '' (no selection asked): how a note names the selection it missed."""
    if selection is None:
        return ""
    from ..store.index import SelectionRef

    ref = SelectionRef.of(selection)
    return f"{ref.name} " if ref.name else f"top rate {ref.top_rate} "


def _language_mask(config: RunConfig, registry: LocalRegistry, manifest: Manifest, chosen=None):
    """The mask the share is measured on: the ``chosen`` selection of the run's language when given; else
    the run's own selection where the run had one, else the model's default selection in the local
    registry; None when the registry has none."""
    from ..store.masks import find_masks

    selection = config.mask.source.selection if config.mask and config.mask.source else None
    candidates = (chosen,) if chosen is not None else (selection, None) if selection else (None,)
    for which in candidates:
        try:
            return find_masks(config.base_model.name, [config.language.code], selection=which, registry=registry,
                              manifest=manifest).one()
        except NeuronregError:
            continue
    return None


def _dynamics(run: RunAnalysis, folder: Path, config: RunConfig) -> None:
    from ..analysis.dynamics import run_curve, summarize_curve
    from .training import read_steps

    # The validation curve holds the base's loss at step 0, which steps.csv (optimizer steps, from 1) has
    # not; runs of a version that kept no steps.csv have only the curve. Same steps merge.
    log_rows = [dict(point) for point in config.validation_curve]
    log_rows += read_steps(folder / (config.steps_log or STEPS_FILE))
    run.curve = run_curve(run.label, log_rows)
    run.summary = summarize_curve(run.curve)


# -- files --------------------------------------------------------------------------------------------------
FILES = {"json": "analysis.json", "alignment_csv": "alignment.csv", "updates_csv": "updates.csv",
         "dynamics_csv": "dynamics.csv", "training_png": "training.png", "updates_png": "updates.png"}


def save_analysis(report: AnalysisReport, out: str | Path) -> dict[str, Path]:
    """analysis.json (everything), alignment.csv, updates.csv and dynamics.csv (one row per layer, projection
    or step), and the plots: retrieval by layer per language (``alignment_<lang>.png``), each run's relative
    update norm by layer (``updates.png``), the runs' training curves (``training.png``); the plots not without
    matplotlib (the ``plots`` extra). Returns the paths written."""
    from .. import plots

    out = output_folder(out)
    paths = {"json": atomic_write_json(out / FILES["json"], report.to_dict())}
    if report.alignment:
        paths["alignment_csv"] = out / FILES["alignment_csv"]
        with atomic_csv(paths["alignment_csv"]) as writer:
            writer.writerow(["model", "centred", "language", "pivot", "layer", "sentences", "matched", "mismatched",
                             "gap", "retrieval_from_pivot", "retrieval_to_pivot"])
            for centred, table in ((True, report.alignment), (False, report.alignment_raw)):
                for label, rows in table.items():
                    for r in rows:
                        writer.writerow([label, centred, r.language, r.pivot, r.layer, r.sentences, repr(r.matched),
                                         repr(r.mismatched), repr(r.gap), repr(r.retrieval_from_pivot),
                                         repr(r.retrieval_to_pivot)])
        first = next(iter(report.alignment.values()))
        for code in dict.fromkeys(r.language for r in first):
            series = {label: [r.retrieval_from_pivot for r in rows if r.language == code]
                      for label, rows in report.alignment.items()}
            layers = [r.layer for r in first if r.language == code]
            sentences = next(r.sentences for r in first if r.language == code)
            paths[f"alignment_{code}"] = plots.drawn(
                plots.layer_profiles, series, out / f"alignment_{code}.png", layers=layers, chance=1 / sentences,
                title=f"{report.base_model['name']}: retrieval {first[0].pivot} -> {code} by layer (centred)",
                ylabel="retrieval accuracy")
    updated = [run for run in report.runs if run.update is not None]
    if updated:
        paths["updates_csv"] = out / FILES["updates_csv"]
        with atomic_csv(paths["updates_csv"]) as writer:
            writer.writerow(["run", "subset", "layer", "projection", "update_norm", "base_norm", "relative"])
            for run in updated:
                for p in run.update.projections:
                    writer.writerow([run.label, run.subset, p.layer, p.projection, repr(p.update_norm),
                                     repr(p.base_norm), repr(p.relative)])
        series = {}
        for run in updated:
            per_layer: dict[int, list[float]] = {}
            for p in run.update.projections:
                per_layer.setdefault(p.layer, []).append(p.update_norm ** 2)
            base_layer: dict[int, float] = {}
            for p in run.update.projections:
                base_layer[p.layer] = base_layer.get(p.layer, 0.0) + p.base_norm ** 2
            series[run.label] = [(sum(v) / base_layer[layer]) ** 0.5 if base_layer[layer] else None
                                 for layer, v in sorted(per_layer.items())]
        paths["updates_png"] = plots.drawn(plots.layer_profiles, series, out / FILES["updates_png"],
                                           title=f"{report.base_model['name']}: size of each run's MLP update by "
                                                 "layer", ylabel="||dW|| / ||W|| (MLP)")
    curves = [run.curve for run in report.runs if run.curve is not None]
    if curves:
        paths["dynamics_csv"] = out / FILES["dynamics_csv"]
        keys = list(curves[0].values)
        with atomic_csv(paths["dynamics_csv"]) as writer:
            writer.writerow(["run", "step", *keys])
            for curve in curves:
                for row in curve.rows():
                    writer.writerow([row["run"], row["step"], *("" if row.get(k) is None else repr(row[k])
                                                                for k in keys)])
        paths["training_png"] = plots.drawn(
            plots.training_curves, {curve.label: {key: curve.points(key) for key in curve.values} for curve in curves},
            out / FILES["training_png"], title=f"{report.base_model['name']}: training dynamics")
    return {kind: path for kind, path in paths.items() if path is not None}
