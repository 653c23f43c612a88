"""Steering: switch the language a model writes in with the registry's neurons, and measure it.

Researchers steer a model at inference by deactivating the neurons of the language it would write in
and activating those of another (Tang et al. 2024 switch languages this way). Everything here works
through :func:`neuronreg.hooks.steered_neurons`: hooks on the module whose output ``compute`` counts,
alive only inside a ``with`` block; the weights are never modified. Two modes:

* ``replace`` (the default): the ``deactivate`` language's neurons output 0, and the ``activate``
  language's neurons output ``strength`` x their mean activation on that language's text (a
  neuron in both masks is activated). Either language may be left out.
* ``additive``: on the union of both languages' neurons, ``strength`` x (mean on the ``activate``
  language - mean on the ``deactivate`` language) is added to the activation (a difference of means).

The means are the ones ``compute`` records in the counts files (``activation_sum / tokens``, or with
``statistic="positive"`` ``positive_sum / count``, the mean over the positions where the neuron fired).
``layers`` restricts steering to some layers. :func:`steer_eval` generates with and without steering
over a grid of strengths and identifies the language of every output with py3langid (see
:class:`LanguageIdentifier` for why that identifier).
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .. import __version__
from ..errors import MaskError, RegistryError, SettingsError
from ..files import atomic_csv, atomic_write_json, output_folder
from ..hooks import NeuronEdit, steered_neurons
from ..manifest import Manifest
from ..mask import NeuronMask
from ..models import MLPSite, find_mlp_sites, load_model
from ..progress import progress
from ..resolve import language_code, resolve_model
from ..store.local import LocalRegistry

log = logging.getLogger("neuronreg")

MODES = ("replace", "additive")
STATISTICS = ("mean", "positive")
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 2.0, 4.0)
BASE = "base"  # the condition without steering
UNDETERMINED = "und"  # an output in which the identifier finds no language (empty, digits, punctuation)
FILES = {"json": "steering.json", "csv": "steering.csv", "outputs_csv": "outputs.csv", "png": "steering.png"}

# Short, neutral English openings: nothing in them asks for a language, a place or a culture.
DEFAULT_PROMPTS = (
    "The weather today is",
    "My favourite food is",
    "Yesterday I went to the",
    "The most important thing in life is",
    "Every morning, I like to",
    "The best way to learn something new is",
    "When I was a child,",
    "The city at night is",
    "A good friend is someone who",
    "The book I am reading is about",
    "In the garden, there are",
    "Music makes people",
    "The train was late because",
    "On weekends, my family",
    "The old house on the hill",
    "Water is important because",
    "The teacher told the students",
    "After dinner, we usually",
    "The small dog ran",
    "Tomorrow I will",
)


# -- parsing the settings -----------------------------------------------------------------------------
def check_strength(value: object, what: str = "strength") -> float:
    """A finite number (not a bool), as float, or SettingsError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError(f"The {what} must be a finite number, not {value!r}.", fix="strength")
    return float(value)


def parse_strengths(text: str | Iterable[float]) -> list[float]:
    """``"0,0.5,1,2,4"`` (or numbers) -> ``[0.0, 0.5, 1.0, 2.0, 4.0]``, each once, in the order given."""
    parts = [p.strip() for p in text.split(",") if p.strip()] if isinstance(text, str) else list(text)
    values = []
    for part in parts:
        try:
            value = float(part) if isinstance(part, str) else part
        except ValueError:
            raise SettingsError(f"Strengths must be numbers; {part!r} is not.", fix="strength") from None
        value = check_strength(value, f"strength {part!r}")
        if value not in values:
            values.append(value)
    if not values:
        raise SettingsError("No strength was given.", fix="strength")
    return values


def parse_layers(layers: object, num_layers: int | None = None) -> list[int] | None:
    """``None`` (every layer), ``range(20, 30)``, ``[20, 21]``, ``"20-29"`` or ``"0-3,20-29"`` -> sorted
    layer indices; with ``num_layers``, each must be one of the model's layers."""
    if layers is None:
        return None if num_layers is None else list(range(num_layers))
    found: set[int] = set()
    if isinstance(layers, str):
        for part in (p.strip() for p in layers.split(",")):
            match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not match:
                raise SettingsError(f"Layers {layers!r}: {part!r} is not a layer or a range like 20-29.",
                                    fix="layers")
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            if last < first:
                raise SettingsError(f"Layers {layers!r}: the range {part} runs backwards.", fix="layers")
            found.update(range(first, last + 1))
    else:
        try:
            items = list(layers)
        except TypeError:
            raise SettingsError(f"Layers must be a range, a list of integers or a string like '20-29', "
                                f"not {layers!r}.", fix="layers") from None
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int):
                raise SettingsError(f"Layers must be integers; {item!r} is not.", fix="layers")
            found.add(item)
    if not found:
        raise SettingsError("No layer was given to steer.", fix="layers")
    if num_layers is not None:
        outside = sorted(layer for layer in found if not 0 <= layer < num_layers)
        if outside:
            raise SettingsError(f"The model has layers 0-{num_layers - 1}; {outside[0]} is not one of them.",
                                fix="layers")
    return sorted(found)


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            parts.append(f"{start}-{layer}" if layer != start else str(layer))
            start = None
    return ",".join(parts)


# -- the plan: which neurons get which values -----------------------------------------------------------
@dataclass
class SteeringSettings:
    """What to steer: the languages (any code or name), how, how strongly, where, from which selection."""

    deactivate: str | None = None
    activate: str | None = None
    strength: float = 1.0
    mode: str = "replace"
    statistic: str = "mean"  # "mean": over every position of the language's text; "positive": where it fired
    layers: object = None  # None (all), range(20, 30), [20, 21], "20-29"
    selection: str | None = None  # which of the model's selections (default: its default)
    top_rate: float | None = None  # or the selection with this top rate

    def __post_init__(self):
        self.strength = check_strength(self.strength)
        if self.mode not in MODES:
            raise SettingsError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        if self.statistic not in STATISTICS:
            raise SettingsError(f"statistic must be one of {', '.join(STATISTICS)}, not {self.statistic!r}.")
        if self.deactivate is None and self.activate is None:
            raise SettingsError("Name a language to deactivate, one to activate, or both.", fix="steer_languages")
        if self.mode == "additive" and (self.deactivate is None or self.activate is None):
            raise SettingsError("Additive steering adds the difference of two languages' means: name both the "
                                "language to deactivate and the one to activate.", fix="steer_languages")


@dataclass
class SteeringPlan:
    """Per layer, the neurons to steer and their value at strength 1 (``unit``, float64); the edits at
    ``strength`` are ``strength x unit`` (a deactivated neuron's unit value is 0, so it stays 0)."""

    model: str
    selection: str
    deactivate: str | None
    activate: str | None
    mode: str
    statistic: str
    strength: float
    layers: list[int]
    num_layers: int
    intermediate_size: int
    unit: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (int64 neuron indices, float64 unit values)
    deactivated: int  # neurons set to 0 (replace mode)
    activated: int  # neurons set to strength x mean (replace mode)
    masks: dict[str, NeuronMask] = field(repr=False, default_factory=dict)

    @property
    def neurons(self) -> int:
        return sum(int(index.numel()) for index, _ in self.unit.values())

    def per_layer(self) -> list[int]:
        return [int(self.unit[layer][0].numel()) if layer in self.unit else 0 for layer in range(self.num_layers)]

    def with_strength(self, strength: float) -> SteeringPlan:
        return replace(self, strength=check_strength(strength))

    def edits(self) -> dict[int, NeuronEdit]:
        return {layer: NeuronEdit(index, value * self.strength, additive=self.mode == "additive")
                for layer, (index, value) in self.unit.items() if index.numel()}

    def check(self, sites: list[MLPSite]) -> None:
        """MaskError unless the model has the plan's layer count and MLP width."""
        if len(sites) != self.num_layers or sites[0].intermediate_size != self.intermediate_size:
            raise MaskError(f"The steering neurons of {self.model} are for {self.num_layers} layers x "
                            f"{self.intermediate_size} neurons; this model has {len(sites)} x "
                            f"{sites[0].intermediate_size}.", fix="mask_model")

    def describe(self, strength: str | None = None) -> str:
        """One line: what is steered (``strength`` replaces the plan's own, e.g. ``"STRENGTH"``)."""
        strength = strength or f"{self.strength:g}"
        statistic = "mean activation" if self.statistic == "mean" else "mean positive activation"
        where = "" if self.layers == list(range(self.num_layers)) else f", layers {layer_ranges(self.layers)}"
        if self.mode == "additive":
            return (f"{strength} x ({statistic} on {self.activate} - on {self.deactivate}) added to "
                    f"{self.neurons:,} neurons{where}")
        parts = []
        if self.deactivate:
            parts.append(f"{self.deactivate} off ({self.deactivated:,} neurons)")
        if self.activate:
            parts.append(f"{self.activate} set to {strength} x its {statistic} ({self.activated:,} neurons)")
        return ", ".join(parts) + where

    def to_dict(self) -> dict:
        return {"model": self.model, "selection": self.selection, "mode": self.mode, "statistic": self.statistic,
                "deactivate": self.deactivate, "activate": self.activate, "strength": self.strength,
                "layers": layer_ranges(self.layers), "neurons": self.neurons, "deactivated": self.deactivated,
                "activated": self.activated, "per_layer": self.per_layer()}


def _language(name: str, manifest: Manifest, available: list[str]) -> str:
    return language_code(name, manifest, available)


def _means(registry: LocalRegistry, model: str, lang: str, statistic: str, mask: NeuronMask) -> torch.Tensor:
    stats = registry.read_activation_means(model, lang)
    shape = (stats.record.model.num_layers, stats.record.model.intermediate_size)
    if shape != (mask.num_layers, mask.intermediate_size):
        raise RegistryError(f"The counts of {lang} for {model} are for {shape[0]} x {shape[1]} neurons, its masks for "
                            f"{mask.num_layers} x {mask.intermediate_size}.", fix="recount",
                            advice="Count the language again with force=True.")
    return stats.mean if statistic == "mean" else stats.positive_mean


def plan_steering(model: str, settings: SteeringSettings, *, registry: LocalRegistry,
                  manifest: Manifest | None = None) -> SteeringPlan:
    """Read the masks (and, where values are needed, the mean activations) from the registry and
    decide every steered neuron's value. ``model`` is the registry name; nothing is loaded."""
    from ..manifest import load_manifest

    manifest = manifest or load_manifest()
    entry = registry.selection(model, settings.selection, settings.top_rate)
    available = list(entry.languages)
    source = _language(settings.deactivate, manifest, available) if settings.deactivate else None
    target = _language(settings.activate, manifest, available) if settings.activate else None
    if source is not None and source == target:
        raise SettingsError(f"{source} is both the language to deactivate and the one to activate.",
                            fix="steer_languages")
    masks = registry.read_masks(model, [lang for lang in (source, target) if lang], entry.name)
    first = next(iter(masks.values()))
    layers = parse_layers(settings.layers, first.num_layers)
    empty = torch.zeros(0, dtype=torch.long)
    src = masks[source].per_layer() if source else [empty] * first.num_layers
    tgt = masks[target].per_layer() if target else [empty] * first.num_layers
    target_means = _means(registry, model, target, settings.statistic, masks[target]) if target else None
    source_means = (_means(registry, model, source, settings.statistic, masks[source])
                    if settings.mode == "additive" else None)

    unit, deactivated, activated = {}, 0, 0
    for layer in layers:
        if settings.mode == "additive":
            index = torch.unique(torch.cat([src[layer], tgt[layer]]))  # sorted
            value = target_means[layer, index] - source_means[layer, index]
        else:
            off = src[layer][~torch.isin(src[layer], tgt[layer])]  # a neuron in both masks is activated
            index = torch.cat([off, tgt[layer]])
            value = torch.cat([torch.zeros(off.numel(), dtype=torch.float64),
                               target_means[layer, tgt[layer]] if target else torch.zeros(0, dtype=torch.float64)])
            order = torch.argsort(index)
            index, value = index[order], value[order]
            deactivated += off.numel()
            activated += tgt[layer].numel()
        if index.numel():
            unit[layer] = (index.long(), value.double())
    plan = SteeringPlan(model=model, selection=entry.name, deactivate=source, activate=target, mode=settings.mode,
                        statistic=settings.statistic, strength=settings.strength, layers=layers,
                        num_layers=first.num_layers, intermediate_size=first.intermediate_size, unit=unit,
                        deactivated=deactivated, activated=activated, masks=masks)
    if not plan.neurons:
        log.warning("No neuron of %s to steer in layers %s of %s (%s).", " or ".join(masks), layer_ranges(layers),
                    model, entry.name)
    return plan


@contextmanager
def steered(model: torch.nn.Module | list[MLPSite], plan: SteeringPlan) -> Iterator[SteeringPlan]:
    """Inside the block, ``model`` (or its MLP sites) is steered as ``plan`` says; hooks go in ``finally``."""
    sites = model if isinstance(model, list) else find_mlp_sites(model)
    plan.check(sites)
    with steered_neurons(sites, plan.edits()):
        yield plan


def _model_name(model: torch.nn.Module, manifest: Manifest, registry: LocalRegistry) -> str:
    spec = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not spec:
        raise RegistryError("Cannot tell which registry entry this model is: it was not loaded from a folder or "
                            "the Hub.", advice="Pass model_name= (the name 'neuronreg ls' shows).")
    try:
        return resolve_model(str(spec), manifest, registry=registry).name
    except Exception as exc:
        raise RegistryError(f"Cannot tell which registry entry the model {spec} is.",
                            advice="Pass model_name= (the name 'neuronreg ls' shows).") from exc


@contextmanager
def steer(model: torch.nn.Module, deactivate: str | None = None, activate: str | None = None, strength: float = 1.0,
          mode: str = "replace", layers: object = None, registry: LocalRegistry | str | Path | None = None,
          model_name: str | None = None, selection: str | None = None, *, top_rate: float | None = None,
          statistic: str = "mean", manifest: Manifest | None = None) -> Iterator[SteeringPlan]:
    """Steer ``model`` inside the block with the registry's neurons; yields the :class:`SteeringPlan`.

    ``replace`` mode: ``deactivate``'s neurons output 0 and ``activate``'s output ``strength`` x their
    mean activation on that language (either may be left out). ``additive``: ``strength`` x (mean on
    ``activate`` - mean on ``deactivate``) is added on the union of both languages' neurons.
    ``layers`` (``range(20, 30)``, ``"20-29"``) limits the layers. Works with plain forward calls and
    ``model.generate``, on any supported MLP layout, dtype and device; the hooks are removed when the
    block ends, also by an error. ``model_name`` is the registry name (default: from the model's
    ``name_or_path``), ``registry`` a :class:`LocalRegistry` or folder (default: the local registry)::

        with neuronreg.steer(model, deactivate="en", activate="fr", strength=1.0, registry="./reg"):
            model.generate(**tokenizer("The capital of France is", return_tensors="pt"))
    """
    from ..manifest import load_manifest

    manifest = manifest or load_manifest()
    registry = registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)
    settings = SteeringSettings(deactivate=deactivate, activate=activate, strength=strength, mode=mode,
                                statistic=statistic, layers=layers, selection=selection, top_rate=top_rate)
    name = model_name or _model_name(model, manifest, registry)
    plan = plan_steering(name, settings, registry=registry, manifest=manifest)
    with steered(model, plan):
        yield plan


# -- generation -----------------------------------------------------------------------------------------
@dataclass
class GenerationSettings:
    """How outputs are generated: greedy by default; ``sample`` draws with ``temperature`` from ``seed``.

    Only these settings count (the model's own generation config, e.g. an instruct model's sampling
    defaults, is not used), so base and steered outputs differ by the steering alone.
    """

    max_new_tokens: int = 40
    sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 8
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for key in ("max_new_tokens", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SettingsError(f"{key} must be a positive integer, got {value!r}.")
        for key in ("temperature", "repetition_penalty"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                     and value > 0):
                raise SettingsError(f"{key} must be a positive number, got {value!r}.")

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"Cannot read the prompts file {path} ({getattr(exc, 'strerror', None) or exc}).",
                            fix="prompts") from exc
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SettingsError(f"The prompts file {path} holds no prompt.", fix="prompts")
    return prompts


def check_prompts(prompts: Iterable[str]) -> list[str]:
    prompts = list(prompts)
    if not prompts:
        raise SettingsError("No prompt was given.", fix="prompts")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise SettingsError(f"Prompt {i + 1} is empty.", fix="prompts")
    return prompts


def generate_texts(model: torch.nn.Module, tokenizer, prompts: list[str], settings: GenerationSettings, *,
                   bar=None) -> list[str]:
    """The continuation of every prompt (new tokens only, special tokens dropped), in batches padded on
    the left. Sampling draws from its own seeded stream; the global random state is left as it was."""
    from transformers import GenerationConfig

    device = model.get_input_embeddings().weight.device
    own = model.generation_config
    eos = own.eos_token_id if own.eos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    pad = 0 if pad is None else pad
    config = GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=settings.sample,
                              temperature=settings.temperature if settings.sample else None,
                              top_p=None, top_k=None if not settings.sample else 50,
                              repetition_penalty=settings.repetition_penalty, pad_token_id=pad, eos_token_id=eos,
                              bos_token_id=own.bos_token_id)
    texts: list[str] = []
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked), torch.inference_mode():
        torch.manual_seed(settings.seed)
        for start in range(0, len(prompts), settings.batch_size):
            batch = prompts[start:start + settings.batch_size]
            ids = [tokenizer(prompt)["input_ids"] or [pad] for prompt in batch]
            width = max(len(row) for row in ids)
            input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids], device=device)
            mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids], device=device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
            texts.extend(tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))
            if bar is not None:
                bar.update(len(batch))
    return texts


@dataclass
class GenerationReport:
    """Base and steered continuations of the same prompts."""

    plan: SteeringPlan
    prompts: list[str]
    base: list[str]
    steered: list[str]
    settings: GenerationSettings

    def to_json(self) -> dict:
        return {"tool": "neuronreg", "version": __version__, "steering": self.plan.to_dict(),
                "generation": self.settings.to_dict(),
                "outputs": [{"prompt": p, "base": b, "steered": s}
                            for p, b, s in zip(self.prompts, self.base, self.steered)]}


def steered_generation(model_spec: str, prompts: list[str], steering: SteeringSettings, *, manifest: Manifest,
                       registry: LocalRegistry, settings: GenerationSettings | None = None, name: str | None = None,
                       dtype: str | None = None, device: str | None = None, quiet: bool = False,
                       trust_remote_code: bool = False, token: str | None = None) -> GenerationReport:
    """Generate from every prompt without and with steering (the registry is read before the model loads)."""
    settings = settings or GenerationSettings()
    prompts = check_prompts(prompts)
    ref = resolve_model(model_spec, manifest, name=name, registry=registry)
    plan = plan_steering(ref.name, steering, registry=registry, manifest=manifest)
    log.info("Steering %s (%s): %s", plan.model, plan.selection, plan.describe())
    loaded = load_model(ref, dtype=dtype, device=device, trust_remote_code=trust_remote_code, token=token,
                        quiet=quiet)
    plan.check(loaded.sites)
    bar = progress(2 * len(prompts), f"{ref.name} generate", unit="prompt", quiet=quiet)
    try:
        base = generate_texts(loaded.model, loaded.tokenizer, prompts, settings, bar=bar)
        with steered(loaded.sites, plan):
            steered_texts = generate_texts(loaded.model, loaded.tokenizer, prompts, settings, bar=bar)
    finally:
        bar.close()
    return GenerationReport(plan, prompts, base, steered_texts, settings)


# -- language identification ------------------------------------------------------------------------------
class LanguageIdentifier:
    """py3langid (a maintained, numpy-only fork of langid.py): 97 languages, its model inside the wheel.

    Chosen over lingua-language-detector, measured here on NTREX sentences cut to 40 to 120
    characters: the same accuracy (0.90 to 1.00 per language for both), but py3langid knows Maltese
    and Nepali (two of the seed paper's twelve; lingua knows neither), loads in 0.4 s and identifies
    in under a millisecond with 130 MB of memory, where lingua took 7 to 15 s and 1.06 GB (and its
    wheel is 96 MB). GlotLID and fastText's lid.176 cover more languages but download their models
    at run time. An output without letters is ``und`` (undetermined).
    """

    name = "py3langid"
    # Manifest codes whose language py3langid labels otherwise.
    ALIASES = {"fil": "tl", "nb": "no", "prs": "fa"}

    def __init__(self):
        try:
            from py3langid.langid import MODEL_FILE
            from py3langid.langid import LanguageIdentifier as Model
        except ImportError as exc:  # pragma: no cover - a dependency of neuronreg
            raise SettingsError("Measuring the language of outputs needs py3langid (pip install py3langid).") from exc
        self._model = Model.from_model_file(MODEL_FILE, norm_probs=True)
        self.labels = sorted(set(self._model.labels) - {"zxx"})
        self.version = importlib.metadata.version("py3langid")

    def label_of(self, code: str, manifest: Manifest | None = None) -> str | None:
        """The identifier's label for a registry language code, or None when it does not know it."""
        language = manifest.lookup(code) if manifest is not None else None
        candidates = [code, code.split("_")[0], self.ALIASES.get(code)]
        if language is not None:
            candidates += [language.code.split("_")[0], language.iso639_3, self.ALIASES.get(language.code)]
        return next((c for c in candidates if c in self.labels), None)

    def identify(self, text: str) -> tuple[str, float]:
        """``(label, probability)``; ``("und", 0.0)`` for a text without letters."""
        if not any(ch.isalpha() for ch in text):
            return UNDETERMINED, 0.0
        label, confidence = self._model.classify(text)
        return (UNDETERMINED if label == "zxx" else label), float(confidence)


# -- steer-eval -------------------------------------------------------------------------------------------
@dataclass
class SteerEvalSettings:
    strengths: list[float] = field(default_factory=lambda: list(DEFAULT_STRENGTHS))
    prompts: list[str] | None = None  # None: DEFAULT_PROMPTS
    mode: str = "replace"
    statistic: str = "mean"
    layers: object = None
    selection: str | None = None
    top_rate: float | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    dtype: str | None = None
    device: str | None = None

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
               settings: SteerEvalSettings | None = None, name: str | None = None, quiet: bool = False,
               trust_remote_code: bool = False, token: str | None = None) -> SteerEvalReport:
    """Generate from every prompt without steering and, for each strength, steered from ``source`` to
    ``target``; identify each output's language. Everything that can be checked without the model
    (masks, mean activations, the identifier's languages, the prompts) is checked before it loads."""
    settings = settings or SteerEvalSettings()
    prompts = check_prompts(settings.prompts if settings.prompts is not None else DEFAULT_PROMPTS)
    ref = resolve_model(model_spec, manifest, name=name, registry=registry)
    steering = SteeringSettings(deactivate=source, activate=target, strength=1.0, mode=settings.mode,
                                statistic=settings.statistic, layers=settings.layers, selection=settings.selection,
                                top_rate=settings.top_rate)
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

    loaded = load_model(ref, dtype=settings.dtype, device=settings.device, trust_remote_code=trust_remote_code,
                        token=token, quiet=quiet)
    plan.check(loaded.sites)
    runs = [(BASE, None), *((f"x{s:g}", s) for s in settings.strengths)]
    bar = progress(len(runs) * len(prompts), f"{ref.name} {plan.deactivate}->{plan.activate}", unit="prompt",
                   quiet=quiet)
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


# -- output -----------------------------------------------------------------------------------------------
def table_lines(report: SteerEvalReport) -> list[str]:
    """Per condition, the share of outputs in the target and the source language."""
    target, source = f"{report.target} (target)", f"{report.source} (source)"
    lines = [f"{'strength':<10}{target:>14}{source:>14}{'other':>8}{'distinct-2':>12}  most frequent"]
    for row in report.shares():
        common = ", ".join(f"{lang} {n}" for lang, n in list(row["languages"].items())[:3])
        lines.append(f"{row['condition']:<10}{row['target_share']:>14.0%}{row['source_share']:>14.0%}"
                     f"{row['other_share']:>8.0%}{row['distinct_2']:>12.2f}  {common}")
    return lines


def save_report(report: SteerEvalReport, folder: str | Path) -> dict[str, Path]:
    """steering.json (everything), steering.csv (shares per condition), outputs.csv (every output, one row
    each) and steering.png (share against strength), each written atomically."""
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
    draw_shares(data, paths["png"])
    return paths


def draw_shares(data: dict, path: str | Path) -> Path:
    """The share-against-strength plot of a ``steering.json`` (as :func:`save_report` writes it)."""
    from ..store.figures import shares_by_strength

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
