"""The neuron-mask files that exist today: ``list[language][layer] -> LongTensor`` ``.pt``/``.pth``.

That is the format of the LAPE authors (``rucaibox``) and of the seed paper (``gurgurov``). The
language order is not stored in those files, so it is given on import; the model's dimensions
come from the manifest or from the caller. Files are read with ``torch.load(weights_only=True)``:
a pickle that carries code is refused.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from ..errors import MaskError, SelectionError, UnknownModel
from ..files import atomic_path
from ..manifest import Language, Manifest
from ..mask import NeuronMask
from ..provenance import ImportInfo, LanguageInfo, MaskSource, ModelInfo, NeuronsRecord, SelectionInfo
from ..resolve import resolve_model
from .local import LocalRegistry


def model_shape(spec: str, manifest: Manifest, *, num_layers: int | None = None,
                intermediate_size: int | None = None, hidden_size: int | None = None, name: str | None = None,
                registry: LocalRegistry | None = None) -> ModelInfo:
    """What is known of a model named by alias, Hub id or registry name, without loading it: its
    dimensions come from the manifest, from counts already in the registry, or from the caller."""
    ref = resolve_model(spec, manifest, name=name, registry=registry)
    entry = ref.entry
    known = None
    if entry is None and registry is not None and registry.counted_languages(ref.name):
        known = registry.read_counts_record(ref.name, registry.counted_languages(ref.name)[0]).model
    layers = num_layers or (entry.num_layers if entry else known.num_layers if known else None)
    inter = intermediate_size or (entry.intermediate_size if entry else known.intermediate_size if known else None)
    if not (layers and inter):
        raise UnknownModel(f"{spec!r} is not in the manifest, so its size is unknown.", fix="model_size",
                           advice="Pass num_layers and intermediate_size (and hidden_size for the share of "
                                  "parameters).")
    return ModelInfo(
        name=ref.name, id=ref.hub_id or (known.id if known else None), revision=known.revision if known else None,
        num_layers=layers, intermediate_size=inter,
        hidden_size=hidden_size or (entry.hidden_size if entry else known.hidden_size if known else None),
        mlp_layout=entry.mlp_layout if entry else known.mlp_layout if known else "gated",
        num_parameters=entry.num_parameters if entry else known.num_parameters if known else None,
        architecture=known.architecture if known else None,
    )


def load_lape_file(path: Path) -> list[list]:
    """Read a ``list[language][layer] -> LongTensor`` file safely (``weights_only=True``)."""
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise MaskError(f"{path} does not exist.") from exc
    except Exception as exc:  # pickle, zip and torch errors all mean "not this format"
        raise MaskError(f"{path} is not a torch.save'd list of neuron indices ({type(exc).__name__}).") from exc

    def ids(t) -> bool:
        return (isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and not t.is_complex()
                and t.dtype != torch.bool)

    ok = isinstance(data, (list, tuple)) and all(isinstance(lang, (list, tuple)) and all(ids(t) for t in lang)
                                                 for lang in data)
    if not ok or not data:
        raise MaskError(f"{path} does not hold list[language][layer] -> integer tensors.")
    return [list(lang) for lang in data]


def import_lape(path: Path, model: ModelInfo, languages: list[Language], registry: LocalRegistry,
                top_rate: float | None = None, default: bool = False) -> dict[str, NeuronMask]:
    """Write the masks of a LAPE file into the registry as a selection of ``model.name``, named
    ``imported-top<rate>`` (or ``imported-<file>`` without a rate); the model's first selection, or
    with ``default``, its default."""
    if top_rate is not None and (isinstance(top_rate, bool) or not math.isfinite(top_rate)
                                 or not 0 < top_rate <= 1):
        raise SelectionError(f"top_rate must be in (0, 1], got {top_rate!r}.")
    path = Path(path)
    data = load_lape_file(path)
    if len(data) != len(languages):
        raise MaskError(f"{path.name} holds {len(data)} languages but {len(languages)} were named "
                        f"({', '.join(lang.code for lang in languages)}); name them in the file's order.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    selection = SelectionInfo(method="imported", languages=[lang.code for lang in languages], top_rate=top_rate)
    masks = {}
    for index, (lang, per_layer) in enumerate(zip(languages, data)):
        if len(per_layer) != model.num_layers:
            raise MaskError(f"{path.name} has {len(per_layer)} layers for {lang.code}, but {model.name} has "
                            f"{model.num_layers}; check the model (or the layer count).", fix="model_size")
        try:
            mask = NeuronMask.from_per_layer(per_layer, model=model.name, language=lang.code,
                                             intermediate_size=model.intermediate_size)
        except MaskError as exc:
            raise MaskError(f"{path.name}, {lang.code}: {exc.message} Check the model (or its MLP width).",
                            fix="model_size") from exc
        mask.provenance = NeuronsRecord(
            model=model, language=LanguageInfo.of(lang), selection=selection, num_neurons=len(mask),
            imported=ImportInfo(file=path.name, sha256=digest, format="lape-pt", index=index))
        mask.source, mask.location = MaskSource(kind="registry"), registry.root
        masks[lang.code] = mask
    with registry.model_lock(model.name, "import"):
        entry = registry.write_selection(model.name, masks, default=default)
    for mask in masks.values():  # now that the registry has named the selection
        mask.source = MaskSource(kind="registry", selection=entry.name)
    return masks


def export_lape(found, *, in_given_order: bool = False) -> tuple[list, list[str]]:
    """A selection's masks (a :class:`~neuronreg.store.masks.MaskSet`) as ``list[language][layer] ->
    LongTensor``, in the order the selection was made over (``in_given_order``: as ``found`` has them)."""
    codes = list(found.masks)
    if not in_given_order:
        first = found.masks[codes[0]]
        order = first.provenance.selection.languages if first.provenance else codes
        codes = [code for code in order if code in found.masks] + [code for code in codes if code not in order]
    return [found.masks[code].per_layer() for code in codes], codes


def save_lape(masks: list, path: Path) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(masks, tmp)
    return path
