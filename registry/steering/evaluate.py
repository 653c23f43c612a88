"""``steer-eval``: how often steered outputs are in the target language, per strength."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import SettingsError
from ..files import atomic_csv, atomic_write_json, output_folder
from ..manifest import Manifest
from ..models import load_model
from ..options import LoadOptions
from ..progress import progress
from ..resolve import resolve_model
from ..store.local import LocalRegistry
from .generation import DEFAULT_PROMPTS, GenerationSettings, check_prompts, generate_texts
from .identify import UNDETERMINED, LanguageIdentifier
from .plan import SteeringSettings, layer_ranges, log, parse_strengths, plan_steering, steered

DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
BASE = "base"  # the condition without steering
FILES = {"json": "steering.json", "csv": "steering.csv", "outputs_csv": "outputs.csv", "png": "steering.png"}


# -- steer-eval -------------------------------------------------------------------------------------------
@dataclass
class SteerEvalSettings:
    strengths: list[float] = field(default_factory=lambda: list(DEFAULT_STRENGTHS))
    prompts: list[str] | None = None  # None: DEFAULT_PROMPTS
    mode: str = "replace"
    statistic: str = "mean"
    layers: object = None
    selection: object = None  # a name or a top rate (default: the model's default selection)
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self):
        self.strengths = parse_strengths(self.strengths)


@dataclass
class Condition:
    """The outputs of one condition (no steering, or one strength) and their identified languages."""

    name: str
    strength: float | None
    texts: list[str]
    languages: list[str]
    confidences: list[float]

    def share(self, label: str) -> float:
        return sum(lang == label for lang in self.languages) / max(len(self.languages), 1)

    def mean_confidence(self) -> float:
        return sum(self.confidences) / max(len(self.confidences), 1)

    def distinct_2(self) -> float:
        """Mean over outputs of distinct word bigrams / word bigrams: 1 for text that never repeats a pair of
        words, near 0 for a loop (an output of fewer than three words counts as 1)."""
        ratios = []
        for text in self.texts:
            words = text.split()
            pairs = list(zip(words, words[1:]))
            ratios.append(len(set(pairs)) / len(pairs) if len(pairs) > 1 else 1.0)
        return sum(ratios) / max(len(ratios), 1)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.languages).items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class SteerEvalReport:
    model: dict
    source: str
    target: str
    labels: dict[str, str]  # source/target -> the identifier's label
    identifier: dict
    plan: dict
    settings: dict
    prompts: list[str]
    conditions: list[Condition]

    def shares(self) -> list[dict]:
        rows = []
        for c in self.conditions:
            target, source = c.share(self.labels["target"]), c.share(self.labels["source"])
            other = sum(lang not in (self.labels["target"], self.labels["source"]) for lang in c.languages)
            rows.append({"condition": c.name, "strength": c.strength, "outputs": len(c.texts),
                         "target_share": target, "source_share": source, "other_share": other / max(len(c.texts), 1),
                         "mean_confidence": c.mean_confidence(), "distinct_2": c.distinct_2(),
                         "languages": c.counts()})
        return rows

    def to_json(self) -> dict:
        return {
            "tool": "neuronreg", "version": __version__, "model": self.model, "source": self.source,
            "target": self.target, "identifier": self.identifier, "labels": self.labels, "steering": self.plan,
            "settings": self.settings,
            "definitions": {
                "target_share": "outputs identified as the target language / outputs",
                "source_share": "outputs identified as the source language / outputs",
                "base": "generated without steering",
                "strength": "replace mode: the target's neurons output strength x their mean activation on the "
                            "target's text, the source's output 0; additive: strength x (target mean - source "
                            "mean) is added on both languages' neurons",
                UNDETERMINED: "an output without letters (the identifier cannot tell a language)",
                "mean_confidence": "the identifier's probability of the language it chose, averaged over outputs",
                "distinct_2": "distinct word bigrams / word bigrams of an output, averaged (low: the output loops)",
            },
            "prompts": self.prompts,
            "shares": self.shares(),
            "outputs": [{"condition": c.name, "strength": c.strength, "prompt": i, "text": text, "language": lang,
                         "confidence": conf}
                        for c in self.conditions
                        for i, (text, lang, conf) in enumerate(zip(c.texts, c.languages, c.confidences))],
        }


def steer_eval(model_spec: str, source: str, target: str, *, manifest: Manifest, registry: LocalRegistry,
               settings: SteerEvalSettings | None = None, name: str | None = None,
               load: LoadOptions | None = None) -> SteerEvalReport:
    """Generate from every prompt without steering and, for each strength, steered from ``source`` to
    ``target``; identify each output's language. Everything that can be checked without the model
    (masks, mean activations, the identifier's languages, the prompts) is checked before it loads."""
    settings = settings or SteerEvalSettings()
    prompts = check_prompts(settings.prompts if settings.prompts is not None else DEFAULT_PROMPTS)
    ref = resolve_model(model_spec, manifest, name=name, registry=registry)
    steering = SteeringSettings(deactivate=source, activate=target, strength=1.0, mode=settings.mode,
                                statistic=settings.statistic, layers=settings.layers, selection=settings.selection)
    plan = plan_steering(ref.name, steering, registry=registry, manifest=manifest)
    identifier = LanguageIdentifier()
    labels = {}
    for role, code in (("source", plan.deactivate), ("target", plan.activate)):
        label = identifier.label_of(code, manifest)
        if label is None:
            raise SettingsError(f"The language identifier ({identifier.name}) does not know {code}, so outputs in it "
                                "cannot be recognised.", fix="identifier",
                                advice=f"Choose among the languages it knows: {', '.join(identifier.labels)}.")
        labels[role] = label
    log.info("Steering %s (%s): %s; languages identified by %s %s", plan.model, plan.selection,
             plan.describe("STRENGTH"), identifier.name, identifier.version)

    loaded = load_model(ref, load)
    plan.check(loaded.sites)
    runs = [(BASE, None), *((f"x{s:g}", s) for s in settings.strengths)]
    bar = progress(len(runs) * len(prompts), f"{ref.name} {plan.deactivate}->{plan.activate}", unit="prompt")
    conditions = []
    try:
        for label, strength in runs:
            bar.set_postfix_str(label, refresh=False)
            if strength is None:
                texts = generate_texts(loaded.model, loaded.tokenizer, prompts, settings.generation, bar=bar)
            else:
                with steered(loaded.sites, plan.with_strength(strength)):
                    texts = generate_texts(loaded.model, loaded.tokenizer, prompts, settings.generation, bar=bar)
            found = [identifier.identify(text) for text in texts]
            conditions.append(Condition(label, strength, texts, [f[0] for f in found], [f[1] for f in found]))
    finally:
        bar.close()

    plan_dict = {k: v for k, v in plan.to_dict().items() if k != "strength"}
    run_settings = {"strengths": settings.strengths, "mode": settings.mode, "statistic": settings.statistic,
                    "layers": layer_ranges(plan.layers), "selection": plan.selection,
                    "generation": settings.generation.to_dict(), "dtype": loaded.dtype, "device": str(loaded.device),
                    "prompts": "default" if settings.prompts is None else "given"}
    return SteerEvalReport(model=loaded.info().to_dict(), source=plan.deactivate, target=plan.activate,
                           labels=labels, identifier={"name": identifier.name, "version": identifier.version},
                           plan=plan_dict, settings=run_settings, prompts=prompts, conditions=conditions)


def save_report(report: SteerEvalReport, folder: str | Path) -> dict[str, Path]:
    """steering.json (everything), steering.csv (shares per condition), outputs.csv (every output, one row
    each) and steering.png (share against strength; not without matplotlib, the ``plots`` extra), each written
    atomically. Returns the paths written."""
    folder = output_folder(folder)
    paths = {kind: folder / name for kind, name in FILES.items()}
    data = report.to_json()
    atomic_write_json(paths["json"], data)
    with atomic_csv(paths["csv"]) as writer:
        writer.writerow(["condition", "strength", "outputs", "target_share", "source_share", "other_share",
                         "mean_confidence", "distinct_2"])
        measures = ("target_share", "source_share", "other_share", "mean_confidence", "distinct_2")
        for row in data["shares"]:
            writer.writerow([row["condition"], "" if row["strength"] is None else repr(row["strength"]),
                             row["outputs"], *(repr(row[key]) for key in measures)])
    with atomic_csv(paths["outputs_csv"]) as writer:
        writer.writerow(["condition", "strength", "prompt", "language", "confidence", "text"])
        for row in data["outputs"]:
            writer.writerow([row["condition"], "" if row["strength"] is None else repr(row["strength"]),
                             report.prompts[row["prompt"]], row["language"], f"{row['confidence']:.4f}", row["text"]])
    from ..plots import drawn

    if drawn(draw_shares, data, paths["png"]) is None:
        del paths["png"]
    return paths


def draw_shares(data: dict, path: str | Path) -> Path:
    """The share-against-strength plot of a ``steering.json`` (as :func:`save_report` writes it)."""
    from ..plots import shares_by_strength

    steered_rows = [row for row in data["shares"] if row["strength"] is not None]
    base = next((row for row in data["shares"] if row["strength"] is None), None)
    target, source = data["target"], data["source"]
    series = {f"{target} (target)": [row["target_share"] for row in steered_rows],
              f"{source} (source)": [row["source_share"] for row in steered_rows]}
    baselines = {} if base is None else {f"{target} (target)": base["target_share"],
                                         f"{source} (source)": base["source_share"]}
    mode = data["steering"]["mode"]
    return shares_by_strength([row["strength"] for row in steered_rows], series, path, baselines=baselines,
                              title=f"{data['model']['name']}: steering {source} -> {target} ({mode}, "
                                    f"{len(data['prompts'])} prompts)",
                              xlabel="strength" if mode == "additive" else "strength (x mean activation)")
