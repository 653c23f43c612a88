"""Which neurons steering changes and to what (a :class:`SteeringPlan`, read from the registry), and the
``with`` blocks that apply it: :func:`steered` (a plan) and :func:`steer` (the public one-liner)."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import MaskError, RegistryError, SettingsError
from ..hooks import NeuronEdit, steered_neurons
from ..manifest import Manifest
from ..mask import NeuronMask
from ..models import MLPSite, find_mlp_sites
from ..resolve import language_code, resolve_model
from ..store.local import LocalRegistry

log = logging.getLogger("neuronreg")

MODES = ("replace", "additive")
STATISTICS = ("mean", "positive")


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
    selection: object = None  # which of the model's selections: a name or a top rate (default: its default)

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
    from ..store.masks import find_masks

    manifest = manifest or load_manifest()
    entry = registry.selection(model, settings.selection)
    available = list(entry.languages)
    source = language_code(settings.deactivate, manifest, available) if settings.deactivate else None
    target = language_code(settings.activate, manifest, available) if settings.activate else None
    if source is not None and source == target:
        raise SettingsError(f"{source} is both the language to deactivate and the one to activate.",
                            fix="steer_languages")
    masks = find_masks(model, [lang for lang in (source, target) if lang], selection=entry.name, registry=registry,
                       manifest=manifest).masks
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
          model_name: str | None = None, selection=None, *,
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
                                statistic=statistic, layers=layers, selection=selection)
    name = model_name or _model_name(model, manifest, registry)
    plan = plan_steering(name, settings, registry=registry, manifest=manifest)
    with steered(model, plan):
        yield plan

