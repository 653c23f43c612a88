"""Ablation: switch off one language's neurons and measure perplexity on every language.

This is how the LAPE authors validated their neurons (Tang et al. 2024): with the neurons of
language A set to zero, A's perplexity should rise far more than any other language's. For every
mask (each language's, plus a random control with the same count per layer) the activations of its
neurons are zeroed by :func:`neuronreg.hooks.zeroed_neurons` on the module whose output ``compute``
counts; the weights are never modified and the hooks exist only inside that block. Loss, perplexity
and bits per character are measured by :mod:`neuronreg.evaluation.heldout`, the one measurement
shared with ``evaluate``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..corpus import CorpusSource, iter_documents, resolve_corpus
from ..errors import CorpusError, HeldOutOverlap
from ..files import atomic_csv, atomic_write_json, output_folder
from ..hooks import zeroed_neurons
from ..manifest import Manifest
from ..mask import RANDOM, NeuronMask
from ..models import load_model
from ..options import LoadOptions
from ..progress import progress
from ..provenance import MaskSource
from ..resolve import language, resolve_model
from ..store.local import LocalRegistry
from .heldout import Score, heldout_text, score

log = logging.getLogger("neuronreg")

BASELINE = "baseline"  # no neuron switched off
FILES = {"json": "ablation.json", "csv": "ablation.csv", "long_csv": "measurements.csv", "png": "ablation.png"}


@dataclass
class AblationSettings:
    data: str  # a folder of <language>.txt/.jsonl/.parquet, like compute's --corpus
    tokens: int = 100_000  # per language
    seq_len: int = 1024
    batch_size: int = 4
    text_field: str | None = None
    seed: int = 0  # of the random control
    selection: object = None  # which of the model's selections: a name or a top rate (default: its default)
    allow_same_text: bool = False
    exclusive: bool = False  # switch off only the neurons of a language that no other evaluated language has


# -- masks ------------------------------------------------------------------------------------------
def exclusive_masks(masks: dict[str, NeuronMask]) -> dict[str, NeuronMask]:
    """Each mask without the neurons that another of the masks also holds."""
    result = {}
    for lang, mask in masks.items():
        others = [other for name, other in masks.items() if name != lang]
        shared = np.unique(np.concatenate([o.keys() for o in others])) if others else np.zeros(0, np.int64)
        keep = ~np.isin(mask.keys(), shared)
        result[lang] = NeuronMask(mask.model, mask.language, mask.num_layers, mask.intermediate_size,
                                  mask.layer[keep], mask.neuron[keep], provenance=mask.provenance,
                                  source=MaskSource(kind="derived", selection=mask.source.selection if mask.source
                                                    else None, exclusive_of=sorted(set(masks) - {lang})),
                                  location=mask.location)
    return result


def shared_neurons(masks: dict[str, NeuronMask]) -> dict[str, dict[str, int]]:
    """How many neurons each pair of masks holds in common (the diagonal: each mask's size)."""
    return {a: {b: len(ma & mb) for b, mb in masks.items()} for a, ma in masks.items()}


def matched_counts(masks) -> list[int]:
    """Per layer, the mean neuron count of the masks, rounded (half to even)."""
    counts = np.array([m.counts_per_layer() for m in masks], dtype=np.float64)
    return [round(float(c)) for c in counts.mean(0)]


# -- the job ----------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """Does switching off a language's neurons hurt that language, and more than anything else?

    Changes are RELATIVE (ablated / baseline perplexity - 1): baselines differ by an order of
    magnitude between languages, so absolute changes would favour the languages the model knows
    worst. Two questions, answered separately:

    * column-wise, the one researchers ask: of all the masks (the random one too), is X's own the
      one that hurts X most? (``own_hurts_most``, with the strongest rival);
    * row-wise: does X's own mask hurt X more than it hurts any other language?
      (``hurts_own_most``, with the language it hurts most otherwise).
    """

    language: str
    own_increase: float  # perplexity change of the language under its own ablation (absolute)
    own_relative: float  # the same, relative to the baseline
    others_mean_increase: float | None  # mean absolute perplexity change of the other languages under it
    ratio: float | None  # own / others' mean, absolute changes; None when the others' mean is not > 0
    relative_ratio: float | None  # the same on relative changes
    own_hurts_most: bool  # column-wise: no other mask (nor the random one) raises X's perplexity as much
    strongest_rival: str | None  # the other mask that raises X's perplexity most
    rival_relative: float | None
    hurts_own_most: bool  # row-wise: X's mask raises X's perplexity more than any other language's
    most_hurt_other: str | None  # the other language X's mask hurts most
    other_relative: float | None
    random_relative: float | None
    loss_ratio: float | None  # own / others' mean on loss changes (log of perplexity ratios)


@dataclass
class AblationReport:
    model: dict
    languages: list[str]
    settings: dict
    heldout: dict[str, dict]
    masks: dict[str, NeuronMask]  # the languages' masks, then the random control
    shared: dict[str, dict[str, int]]  # neurons each pair of the registry's language masks holds in common
    baseline: dict[str, Score]
    ablated: dict[str, dict[str, Score]]  # mask -> evaluated language -> score
    same_text: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[str]:
        return list(self.ablated)

    def delta(self, row: str, column: str, measure: str = "perplexity") -> float:
        return getattr(self.ablated[row][column], measure) - getattr(self.baseline[column], measure)

    def relative(self, row: str, column: str) -> float:
        """Relative perplexity change of ``column`` with the neurons of ``row`` switched off."""
        return self.ablated[row][column].perplexity / self.baseline[column].perplexity - 1

    def verdicts(self) -> dict[str, Verdict]:
        result = {}
        for lang in self.languages:
            others = [other for other in self.languages if other != lang]
            mean = sum(self.delta(lang, o) for o in others) / len(others) if others else None
            mean_relative = sum(self.relative(lang, o) for o in others) / len(others) if others else None
            mean_loss = sum(self.delta(lang, o, "loss") for o in others) / len(others) if others else None
            own_relative = self.relative(lang, lang)
            rivals = {row: self.relative(row, lang) for row in self.rows if row != lang}
            rival = max(rivals, key=rivals.get) if rivals else None
            hurt = {other: self.relative(lang, other) for other in others}
            other = max(hurt, key=hurt.get) if hurt else None
            result[lang] = Verdict(
                language=lang, own_increase=self.delta(lang, lang), own_relative=own_relative,
                others_mean_increase=mean,
                ratio=self.delta(lang, lang) / mean if mean is not None and mean > 0 else None,
                relative_ratio=own_relative / mean_relative if mean_relative is not None and mean_relative > 0
                else None,
                own_hurts_most=rival is None or own_relative > rivals[rival], strongest_rival=rival,
                rival_relative=rivals.get(rival), hurts_own_most=other is None or own_relative > hurt[other],
                most_hurt_other=other, other_relative=hurt.get(other),
                random_relative=self.relative(RANDOM, lang) if RANDOM in self.ablated else None,
                loss_ratio=self.delta(lang, lang, "loss") / mean_loss if mean_loss is not None and mean_loss > 0
                else None,
            )
        return result

    def to_json(self) -> dict:
        return {
            "tool": "neuronreg",
            "version": __version__,
            "model": self.model,
            "languages": self.languages,
            "settings": self.settings,
            "definitions": {
                "loss": "total next-token NLL (nats) / predicted tokens; every token of the packed held-out stream is "
                        "predicted once",
                "perplexity": "exp(loss)",
                "bits_per_character": "total NLL / ln 2 / characters of the evaluated text (each document's separator "
                                      "counts as one character)",
                "delta_perplexity": "perplexity with the mask's neurons zeroed - baseline perplexity",
                "ratio": "own delta_perplexity / mean delta_perplexity of the other languages under the same mask",
                "random": "control mask: random neurons, per layer the mean count of the language masks (rounded), "
                          "drawn uniformly with the given seed",
                "shared_neurons": "neurons each pair of the registry's language masks holds in common",
                "exclusive": "when true, each language's mask lost the neurons another evaluated language also holds",
            },
            "heldout": self.heldout,
            "shared_neurons": self.shared,
            "same_text": self.same_text,
            "masks": {name: {"neurons": len(mask), "per_layer": mask.counts_per_layer(),
                             **({"selection": mask.provenance.selection.to_dict()} if mask.provenance else
                                {"seed": mask.source.seed if mask.source else None})}
                      for name, mask in self.masks.items()},
            "baseline": {lang: score.as_dict() for lang, score in self.baseline.items()},
            "ablated": {row: {lang: {**score.as_dict(),
                                     "delta_perplexity": self.delta(row, lang),
                                     "delta_loss": self.delta(row, lang, "loss"),
                                     "delta_bits_per_character": self.delta(row, lang, "bits_per_character"),
                                     "relative_perplexity_change":
                                         self.delta(row, lang) / self.baseline[lang].perplexity}
                              for lang, score in scores.items()}
                        for row, scores in self.ablated.items()},
            "summary": {lang: asdict(v) for lang, v in self.verdicts().items()},
        }


def check_separate_text(masks: dict[str, NeuronMask], heldout: dict[str, CorpusSource], allow_same_text: bool
                        ) -> list[str]:
    """Held-out files that are a text some mask was computed from: an error, or (allowed) a loud warning."""
    used: dict[str, str] = {}  # sha256 or Hub dataset -> the language whose counts read it
    for mask in masks.values():
        counts = mask.provenance.counts if mask.provenance else {}
        for lang, summary in counts.items():
            if summary.corpus and (key := summary.corpus.text_key()):
                used.setdefault(key, lang)
    same = []
    for lang, source in heldout.items():
        key = source.describe().text_key()
        if key in used:
            what = f"{Path(source.location).name} (sha256 {key[:12]}...)" if source.kind == "local" else key
            if not allow_same_text:
                raise HeldOutOverlap(
                    f"The held-out text for {lang}, {what}, is the text the {used[key]} counts of the masks were "
                    "computed from.", fix="same_text", advice="Give held-out text the masks never saw, or pass "
                                                              "allow_same_text=True.")
            log.warning("WARNING: the held-out text for %s, %s, is the text the %s counts were computed from: the "
                        "figures measure the masks on their own training text, not on unseen text.", lang, what,
                        used[key])
            same.append(lang)
    return same


def ablate(
    model_spec: str,
    language_names: list[str] | str | None = None,
    *,
    settings: AblationSettings,
    load: LoadOptions | None = None,
    registry: LocalRegistry | str | Path | None = None,
    manifest: Manifest | None = None,
    name: str | None = None,
) -> AblationReport:
    """Perplexity of every language with no neuron, each language's neurons, and random neurons switched off."""
    from ..manifest import load_manifest
    from ..store.masks import find_masks

    manifest = manifest or load_manifest()
    registry = registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)
    ref = resolve_model(model_spec, manifest, name=name, registry=registry)
    found = find_masks(ref, language_names, selection=settings.selection, registry=registry, manifest=manifest)
    masks, languages = found.masks, found.languages
    shared = shared_neurons(masks)
    sources = {lang: resolve_corpus(settings.data, language(lang, manifest, [mask.provenance.language]
                                                            if mask.provenance else [lang]),
                                    manifest, settings.text_field)
               for lang, mask in masks.items()}
    same_text = check_separate_text(masks, sources, settings.allow_same_text)
    for lang, source in sources.items():
        if next(iter_documents(source), None) is None:
            raise CorpusError(f"The held-out text for {lang} ({source.label}) holds no text.")
    if settings.exclusive:
        masks = exclusive_masks(masks)
    empty = [lang for lang, mask in masks.items() if len(mask) == 0]
    if empty:
        log.warning("%s: no neurons in the mask; its row is the baseline.", ", ".join(empty))

    loaded = load_model(ref, load)
    first = next(iter(masks.values()))
    revision = first.provenance.model.revision if first.provenance else None
    if revision and revision != loaded.revision:
        log.warning("The masks were computed on revision %s of %s, this model is %s.", revision, ref.name,
                    loaded.revision)
    control = NeuronMask.random(matched_counts(masks.values()), first.intermediate_size, settings.seed,
                                model=ref.name)
    all_masks = {**masks, RANDOM: control}
    for mask in all_masks.values():
        mask.check_sites(loaded.sites)

    texts = {lang: heldout_text(source, lang, loaded.tokenizer, settings.seq_len, settings.tokens)
             for lang, source in sources.items()}
    for lang, text in texts.items():
        if text.tokens < settings.tokens:
            log.info("%s: %s tokens of held-out text (asked for %s); evaluated all of them.", lang,
                     f"{text.tokens:,}", f"{settings.tokens:,}")
    runs = [name for name, mask in all_masks.items() if len(mask)]
    bar = progress((1 + len(runs)) * sum(t.tokens for t in texts.values()), f"{ref.name} ablation")

    def scores() -> dict[str, Score]:
        result = {}
        for lang, text in texts.items():
            bar.set_postfix_str(lang, refresh=False)
            result[lang] = score(loaded.model, text, batch_size=settings.batch_size, device=loaded.device, bar=bar)
        return result

    try:
        bar.set_description(f"{ref.name} baseline")
        baseline = scores()
        ablated = {}
        for row, mask in all_masks.items():
            if not len(mask):
                ablated[row] = dict(baseline)
                continue
            bar.set_description(f"{ref.name} -{row}")
            with zeroed_neurons(loaded.sites, mask):
                ablated[row] = scores()
    finally:
        bar.close()

    heldout = {lang: {"corpus": text.corpus.to_dict(), "tokens": text.tokens, "characters": text.characters,
                      "same_text_as_mask": lang in same_text} for lang, text in texts.items()}
    model = loaded.info().to_dict()
    # A local folder is named, not located, as in the registry's provenance.
    run_settings = {"data": settings.data if settings.data.startswith("hf") else Path(settings.data).name,
                    "tokens": settings.tokens, "seq_len": settings.seq_len, "batch_size": settings.batch_size,
                    "dtype": loaded.dtype, "device": str(loaded.device), "seed": settings.seed,
                    "selection": found.selection,
                    "allow_same_text": settings.allow_same_text, "exclusive": settings.exclusive,
                    "row_start": next(iter(texts.values())).row_start}
    return AblationReport(model, languages, run_settings, heldout, all_masks, shared, baseline, ablated, same_text)


def save_report(report: AblationReport, folder: str | Path) -> dict[str, Path]:
    """ablation.json (everything), ablation.csv (the perplexity-change table), measurements.csv (every
    measurement, one row each) and ablation.png (the heatmap; not without matplotlib, the ``plots`` extra),
    each written atomically. Returns the paths written."""
    folder = output_folder(folder)
    paths = {kind: folder / name for kind, name in FILES.items()}
    data = report.to_json()
    atomic_write_json(paths["json"], data)
    with atomic_csv(paths["csv"]) as writer:
        writer.writerow(["ablated", "neurons", *report.languages])
        for row in report.rows:
            deltas = [repr(report.delta(row, lang)) for lang in report.languages]
            writer.writerow([row, len(report.masks[row]), *deltas])
    with atomic_csv(paths["long_csv"]) as writer:
        writer.writerow(["ablated", "evaluated", "neurons", "tokens", "characters", "loss", "perplexity",
                         "bits_per_character", "delta_loss", "delta_perplexity"])
        for row, scores in [(BASELINE, report.baseline), *report.ablated.items()]:
            for lang, score in scores.items():
                neurons = 0 if row == BASELINE else len(report.masks[row])
                delta = (0.0, 0.0) if row == BASELINE else (report.delta(row, lang, "loss"), report.delta(row, lang))
                writer.writerow([row, lang, neurons, score.tokens, score.characters, repr(score.loss),
                                 repr(score.perplexity), repr(score.bits_per_character), repr(delta[0]),
                                 repr(delta[1])])
    from ..plots import drawn

    if drawn(draw_heatmap, data, paths["png"]) is None:
        del paths["png"]
    return paths


def draw_heatmap(data: dict, path: str | Path) -> Path:
    """The perplexity-change heatmap of an ``ablation.json`` (as written by :func:`save_report`)."""
    from ..plots import ablation_heatmap

    languages, rows = data["languages"], list(data["ablated"])
    exclusive = "exclusive " if data["settings"].get("exclusive") else ""
    return ablation_heatmap(
        [[data["ablated"][row][lang]["delta_perplexity"] for lang in languages] for row in rows],
        [f"{row} off ({data['masks'][row]['neurons']:,})" for row in rows],
        [f"{lang}\n{data['baseline'][lang]['perplexity']:.3g}" for lang in languages],
        path,
        title=f"{data['model']['name']}: perplexity change with one mask's {exclusive}neurons switched off",
        xlabel="evaluated language (baseline perplexity)",
        ylabel="neurons switched off (count)",
        colorbar_label="perplexity change (ablated - baseline)",
    )
