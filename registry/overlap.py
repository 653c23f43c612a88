"""Overlap: how the neuron sets of a model's languages relate to one another.

LAPE gives a selected neuron to every language whose activation probability passes the bar, so the
languages' masks overlap, and how much they overlap says what the masks are: neurons of one
language, or neurons shared by a group of languages (a script, a family, "not English"). This module
measures that from the masks alone, without loading the model:

* the Jaccard index |A ∩ B| / |A ∪ B| of every pair of languages, and the intersection counts;
* each language's neurons per layer;
* the shared core: for k = 1 .. K, how many neurons at least k of the K languages hold (k = 1 is
  the union of all masks, k = K the neurons every language holds), in all and per layer;
* :func:`containment` of one selection in another of the same model (how a 1% set sits inside the
  5% set).

Every comparison needs masks of one model shape (layers x MLP width); anything else is a
:class:`~neuronreg.errors.MaskError` naming both shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import MaskError, UnknownLanguage
from .files import atomic_csv, atomic_write_json
from .manifest import Manifest
from .mask import NeuronMask

FILES = {"json": "overlap.json", "csv": "jaccard.csv", "core_csv": "shared_core.csv", "png": "overlap.png",
         "per_layer_png": "per_layer.png"}
ANNOTATE_AT_MOST = 20  # languages; beyond this the heatmap's cells are too small for their values


# -- shape ----------------------------------------------------------------------------------------------
def common_shape(masks: dict[str, NeuronMask] | Iterable[tuple[str, NeuronMask]]) -> tuple[int, int]:
    """The (layers, MLP width) every mask shares, or MaskError naming two masks of different shapes."""
    items = list(masks.items() if isinstance(masks, dict) else masks)
    if not items:
        raise MaskError("No masks to compare.", advice="Give at least one language's mask.")
    first_name, first = items[0]
    for name, mask in items[1:]:
        if mask.shape != first.shape:
            raise MaskError(f"The {first_name} and {name} masks are of models of different dimensions "
                            f"({first.num_layers} x {first.intermediate_size} and {mask.num_layers} x "
                            f"{mask.intermediate_size} layers x neurons); compare masks of one model.")
    return first.shape


# -- pairs ------------------------------------------------------------------------------------------------
def intersection_counts(masks: dict[str, NeuronMask]) -> dict[str, dict[str, int]]:
    """|A ∩ B| for every ordered pair of languages (the diagonal: each mask's size)."""
    common_shape(masks)
    keys = {lang: mask.keys() for lang, mask in masks.items()}
    result: dict[str, dict[str, int]] = {lang: {} for lang in masks}
    names = list(masks)
    for i, a in enumerate(names):
        result[a][a] = int(keys[a].size)
        for b in names[i + 1:]:
            shared = int(np.intersect1d(keys[a], keys[b], assume_unique=True).size)
            result[a][b] = result[b][a] = shared
    return {a: {b: result[a][b] for b in names} for a in names}


def jaccard(shared: int, size_a: int, size_b: int) -> float:
    """|A ∩ B| / |A ∪ B|; 0.0 when both sets are empty (as :meth:`NeuronMask.jaccard`)."""
    union = size_a + size_b - shared
    return shared / union if union else 0.0


def jaccard_matrix(masks: dict[str, NeuronMask],
                   intersections: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, float]]:
    """The Jaccard index of every ordered pair of languages (1.0 on the diagonal of a non-empty mask)."""
    counts = intersections if intersections is not None else intersection_counts(masks)
    return {a: {b: jaccard(counts[a][b], counts[a][a], counts[b][b]) for b in masks} for a in masks}


def per_layer(masks: dict[str, NeuronMask]) -> dict[str, list[int]]:
    """Each language's neuron count in every layer."""
    common_shape(masks)
    return {lang: mask.counts_per_layer() for lang, mask in masks.items()}


# -- the shared core ----------------------------------------------------------------------------------------
@dataclass
class SharedCore:
    """Neurons held by at least k of the languages, for k = 1 .. K.

    ``at_least[k - 1]`` is how many neurons k or more of the K languages hold: ``at_least[0]`` the
    union of all masks, ``at_least[K - 1]`` the neurons every language holds.
    ``per_layer[k - 1][layer]`` is the same count in one layer.
    """

    languages: list[str]
    num_layers: int
    at_least: list[int]
    per_layer: list[list[int]]

    def count(self, k: int) -> int:
        """Neurons held by at least ``k`` languages (0 for k above the number of languages)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, not {k}.")
        return self.at_least[k - 1] if k <= len(self.at_least) else 0

    def exactly(self, k: int) -> int:
        """Neurons held by exactly ``k`` languages."""
        return self.count(k) - self.count(k + 1)

    def to_json(self) -> dict:
        return {str(k): {"neurons": n, "exactly": self.exactly(k), "per_layer": layers}
                for k, (n, layers) in enumerate(zip(self.at_least, self.per_layer), start=1)}


def shared_core(masks: dict[str, NeuronMask]) -> SharedCore:
    """How many neurons at least k of the masks hold, for every k from 1 to the number of masks."""
    num_layers, width = common_shape(masks)
    keys, holders = np.unique(np.concatenate([mask.keys() for mask in masks.values()]), return_counts=True)
    layers = keys // width
    at_least, by_layer = [], []
    for k in range(1, len(masks) + 1):
        held = holders >= k
        at_least.append(int(held.sum()))
        by_layer.append(np.bincount(layers[held], minlength=num_layers).tolist())
    return SharedCore(list(masks), num_layers, at_least, by_layer)


# -- two selections of one model -------------------------------------------------------------------------------
@dataclass
class Containment:
    """How one language's mask of a small selection sits inside its mask of a larger one."""

    language: str
    small: int  # neurons in the small selection's mask
    large: int  # neurons in the large selection's mask
    shared: int  # |small ∩ large|
    contained: float | None  # shared / small; None when the small mask is empty
    jaccard: float

    def to_json(self) -> dict:
        return {"small": self.small, "large": self.large, "shared": self.shared, "contained": self.contained,
                "jaccard": self.jaccard}


def containment(small: dict[str, NeuronMask], large: dict[str, NeuronMask]) -> dict[str, Containment]:
    """Per language of both selections (in ``small``'s order): |small ∩ large| / |small|, and the Jaccard.

    For two selections of one model, e.g. top 1% and top 5%: a share of 1.0 means the small mask is
    wholly inside the large one. Languages only one selection has are left out; none in common, or
    masks of different shapes, is a MaskError.
    """
    common_shape([*small.items(), *large.items()])
    languages = [lang for lang in small if lang in large]
    if not languages:
        raise MaskError(f"The two selections have no language in common ({', '.join(small) or 'none'} and "
                        f"{', '.join(large) or 'none'}).")
    result = {}
    for lang in languages:
        a, b = small[lang], large[lang]
        shared = int(np.intersect1d(a.keys(), b.keys(), assume_unique=True).size)
        result[lang] = Containment(lang, len(a), len(b), shared, shared / len(a) if len(a) else None,
                                   jaccard(shared, len(a), len(b)))
    return result


# -- order ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Grouping:
    """What a language is grouped by in the figures: its script, then its family (None when unknown)."""

    script: str | None
    family: str | None


def grouping(code: str, manifest: Manifest | None, mask: NeuronMask | None = None) -> Grouping:
    """A language's script and family from the manifest; the script from a mask's provenance otherwise."""
    try:
        lang = manifest.lookup(code) if manifest is not None else None
    except UnknownLanguage:  # an ambiguous name; registry codes are canonical, so this is another manifest's
        lang = None
    if lang is not None:
        return Grouping(lang.script, getattr(lang, "family", None))
    script = mask.provenance.language.script if mask is not None and mask.provenance is not None else None
    return Grouping(script, None)


def language_order(codes: Iterable[str], manifest: Manifest | None,
                   masks: dict[str, NeuronMask] | None = None) -> list[str]:
    """``codes`` ordered by script, then family, then code; languages of unknown script go last."""
    masks = masks or {}

    def key(code):
        group = grouping(code, manifest, masks.get(code))
        return group.script is None, group.script or "", group.family is None, group.family or "", code

    return sorted(dict.fromkeys(codes), key=key)


# -- the report --------------------------------------------------------------------------------------------------
@dataclass
class OverlapReport:
    model: str
    shape: tuple[int, int]  # layers, MLP width
    languages: list[str]  # the order of the table, the CSV and the JSON (the user's, or grouped)
    grouped: list[str]  # by script, then family, then code: the order of the heatmap
    groups: dict[str, Grouping]
    intersections: dict[str, dict[str, int]]
    jaccard: dict[str, dict[str, float]]
    per_layer: dict[str, list[int]]
    core: SharedCore
    selection: dict | None = None  # the selection parameters of the masks, when they record them
    extra: dict = field(default_factory=dict)  # more results for the JSON (e.g. containment in another selection)

    def neurons(self, lang: str) -> int:
        return self.intersections[lang][lang]

    def to_json(self) -> dict:
        return {
            "tool": "neuronreg",
            "version": __version__,
            "model": self.model,
            "num_layers": self.shape[0],
            "intermediate_size": self.shape[1],
            "selection": self.selection,
            "languages": self.languages,
            "grouped_order": self.grouped,
            "groups": {lang: {"script": g.script, "family": g.family} for lang, g in self.groups.items()},
            "definitions": {
                "intersection": "neurons both languages' masks hold (the diagonal: the mask's size)",
                "jaccard": "|A ∩ B| / |A ∪ B|; 0 when both masks are empty",
                "per_layer": "a language's neurons in each layer",
                "shared_core": "for k = 1 .. K languages: neurons held by at least k of them (in all and per layer), "
                               "and by exactly k",
                "grouped_order": "languages by script, then family, then code (the heatmap's order)",
            },
            "neurons": {lang: self.neurons(lang) for lang in self.languages},
            "per_layer": {lang: self.per_layer[lang] for lang in self.languages},
            "intersections": {a: {b: self.intersections[a][b] for b in self.languages} for a in self.languages},
            "jaccard": {a: {b: self.jaccard[a][b] for b in self.languages} for a in self.languages},
            "shared_core": self.core.to_json(),
            **self.extra,
        }

    def save(self, folder: str | Path) -> dict[str, Path]:
        """overlap.json (everything), jaccard.csv, shared_core.csv, overlap.png (the Jaccard heatmap)
        and per_layer.png (neurons per layer per language; the PNGs not without matplotlib, the ``plots``
        extra), each written atomically. Returns the paths written."""
        from .files import output_folder

        folder = output_folder(folder)
        paths = {kind: folder / name for kind, name in FILES.items()}
        atomic_write_json(paths["json"], self.to_json())
        with atomic_csv(paths["csv"]) as writer:
            writer.writerow(["language", "neurons", *self.languages])
            for a in self.languages:
                writer.writerow([a, self.neurons(a), *(repr(self.jaccard[a][b]) for b in self.languages)])
        with atomic_csv(paths["core_csv"]) as writer:
            writer.writerow(["k", "at_least_k", "exactly_k", *(f"layer_{i}" for i in range(self.shape[0]))])
            for k, (n, layers) in enumerate(zip(self.core.at_least, self.core.per_layer), start=1):
                writer.writerow([k, n, self.core.exactly(k), *layers])
        from .plots import drawn

        if drawn(self.draw, paths["png"], paths["per_layer_png"]) is None:
            del paths["png"], paths["per_layer_png"]
        return paths

    def draw(self, heatmap_path: str | Path, per_layer_path: str | Path) -> tuple[Path, Path]:
        """The Jaccard heatmap (languages grouped by script) and the neurons-per-layer plot."""
        from .plots import jaccard_heatmap, per_layer_lines

        order = self.grouped
        scripts = [self.groups[lang].script or "?" for lang in order]
        rate = (self.selection or {}).get("top_rate")
        selected = f", top {rate:.3g}" if isinstance(rate, float) else ""
        heatmap = jaccard_heatmap(
            [[self.jaccard[a][b] for b in order] for a in order],
            order, [self.neurons(lang) for lang in order], path=heatmap_path, groups=scripts,
            title=f"{self.model}: overlap of the languages' neurons (Jaccard{selected})",
            annotate=len(order) <= ANNOTATE_AT_MOST)
        lines = per_layer_lines(
            {f"{lang} ({self.neurons(lang):,})": self.per_layer[lang] for lang in order}, per_layer_path,
            title=f"{self.model}: language-specific neurons per layer{selected}", groups=scripts)
        return heatmap, lines


def overlap(masks: dict[str, NeuronMask], manifest: Manifest | None = None,
            order: list[str] | None = None) -> OverlapReport:
    """The overlap report of one model's masks.

    ``order`` is the order of the table, CSV and JSON (e.g. as the user named the languages); by
    default, and always in the heatmap, languages go by script, then family, then code.
    """
    shape = common_shape(masks)
    grouped = language_order(masks, manifest, masks)
    if order is not None and sorted(order) != sorted(masks):
        raise ValueError("order must name each language of masks once.")
    intersections = intersection_counts(masks)
    first = next(iter(masks.values()))
    selection = first.provenance.selection.to_dict() if first.provenance is not None else None
    return OverlapReport(
        model=", ".join(dict.fromkeys(mask.model for mask in masks.values())), shape=shape,
        languages=list(order) if order is not None else grouped, grouped=grouped,
        groups={lang: grouping(lang, manifest, mask) for lang, mask in masks.items()},
        intersections=intersections, jaccard=jaccard_matrix(masks, intersections), per_layer=per_layer(masks),
        core=shared_core(masks), selection=selection)
