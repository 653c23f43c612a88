"""The neuron-mask files that exist today: ``list[language][layer] -> LongTensor`` ``.pt``/``.pth``.

That is the format of the LAPE authors (``rucaibox``) and of the seed paper (``gurgurov``). The
language order is not stored in those files, so it is given on import; the model's dimensions
come from the manifest or from the caller.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from . import __version__
from .errors import MaskError, UnknownModel
from .manifest import Manifest
from .models import registry_name
from .store import NEURON_SCHEMA, LocalRegistry, atomic_path


@dataclass(frozen=True)
class ModelShape:
    name: str
    hub_id: str | None
    num_layers: int
    intermediate_size: int
    hidden_size: int | None
    mlp_layout: str = "gated"
    num_parameters: int | None = None


def model_shape(spec: str, manifest: Manifest, *, num_layers=None, intermediate_size=None, hidden_size=None,
                name=None) -> ModelShape:
    """Dimensions of a model named by alias or Hub id, from the manifest or the caller's numbers."""
    entry = manifest.models.get(spec) or manifest.model_for_hub_id(spec)
    if entry is None and not (num_layers and intermediate_size):
        raise UnknownModel(
            f"{spec!r} is not in the manifest, so its size is unknown: pass --layers and --intermediate-size "
            "(and --hidden-size for the share of parameters)."
        )
    return ModelShape(
        name or (entry.alias if entry else registry_name(spec)),
        entry.hub_id if entry else (spec if "/" in spec else None),
        num_layers or entry.num_layers,
        intermediate_size or entry.intermediate_size,
        hidden_size or (entry.hidden_size if entry else None),
        entry.mlp_layout if entry else "gated",
        entry.num_parameters if entry else None,
    )


def load_lape_file(path: Path) -> list[list[torch.Tensor]]:
    """Read a ``list[language][layer] -> LongTensor`` file safely (``weights_only=True``)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MaskError(f"{path} does not exist.") from None
    except Exception as exc:  # pickle, zip and torch errors all mean "not this format"
        raise MaskError(f"{path} is not a torch.save'd list of neuron indices ({type(exc).__name__}).") from None
    ok = isinstance(data, (list, tuple)) and all(
        isinstance(lang, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point()
                                                for t in lang) for lang in data)
    if not ok or not data:
        raise MaskError(f"{path} does not hold list[language][layer] -> LongTensor.")
    return [list(lang) for lang in data]


def import_lape(path: Path, shape: ModelShape, languages: list, registry: LocalRegistry,
                top_rate: float | None = None) -> dict[str, int]:
    """Write the masks of a LAPE file into the registry as ``shape.name``'s neuron files."""
    from .compute import now  # late: compute imports heavy modules

    data = load_lape_file(path)
    if len(data) != len(languages):
        raise MaskError(f"{path.name} holds {len(data)} languages but {len(languages)} were named "
                        f"({', '.join(l.code for l in languages)}); name them in the file's order.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    codes = [lang.code for lang in languages]
    tables, sizes = {}, {}
    for index, (lang, per_layer) in enumerate(zip(languages, data)):
        if len(per_layer) != shape.num_layers:
            raise MaskError(f"{path.name} has {len(per_layer)} layers for {lang.code}, but {shape.name} has "
                            f"{shape.num_layers}; check the model (or --layers).")
        layer_ids, neuron_ids = [], []
        for layer, neurons in enumerate(per_layer):
            neurons = neurons.long()
            if neurons.numel() and (int(neurons.min()) < 0 or int(neurons.max()) >= shape.intermediate_size):
                raise MaskError(f"{path.name} has neuron indices outside 0..{shape.intermediate_size - 1} in layer "
                                f"{layer} of {lang.code}; check the model (or --intermediate-size).")
            if neurons.numel() > 1 and not bool((neurons[1:] > neurons[:-1]).all()):
                raise MaskError(f"{path.name}: layer {layer} of {lang.code} is not sorted or repeats an index.")
            layer_ids.append(torch.full_like(neurons, layer))
            neuron_ids.append(neurons)
        layer_t, neuron_t = torch.cat(layer_ids), torch.cat(neuron_ids)
        n = int(layer_t.numel())
        table = pa.table({"layer": layer_t.to(torch.int32).numpy(), "neuron": neuron_t.to(torch.int32).numpy(),
                          "entropy": pa.nulls(n, pa.float64()), "activation_prob": pa.nulls(n, pa.float64())},
                         schema=NEURON_SCHEMA)
        provenance = {
            "kind": "neurons", "tool": "neuronreg", "version": __version__, "created": now(),
            "model": {"name": shape.name, "id": shape.hub_id, "revision": None, "mlp_layout": shape.mlp_layout,
                      "num_parameters": shape.num_parameters},
            "num_layers": shape.num_layers, "intermediate_size": shape.intermediate_size,
            "hidden_size": shape.hidden_size,
            "language": {"code": lang.code, "name": lang.name, "iso639_3": lang.iso639_3, "script": lang.script,
                         "flores200": lang.flores200},
            "num_neurons": n,
            # Imported masks have no counts: no entropy, no probabilities, no corpus.
            "imported": {"file": path.name, "sha256": digest, "format": "lape-pt", "index": index},
            "selection": {"method": "lape", "imported": True, "top_rate": top_rate, "languages": codes},
            "tokens": None, "corpus": None,
        }
        tables[lang.code] = (table, provenance)
        sizes[lang.code] = n
    registry.write_neurons(shape.name, tables)
    from .cards import write_registry_card

    write_registry_card(registry)
    return sizes


def export_lape(registry: LocalRegistry, model: str, languages: list[str] | None = None) -> tuple[list, list[str]]:
    """A model's masks as ``list[language][layer] -> LongTensor``, in the selection's language order."""
    from .mask import mask_from_table

    available = registry.selected_languages(model)
    if not available:
        raise MaskError(f"The registry at {registry.root} has no neurons for {model}.")
    if languages is None:
        _, provenance = registry.read_neurons(model, available[0])
        order = provenance.get("selection", {}).get("languages") or available
        languages = [code for code in order if code in available]
    masks = []
    for code in languages:
        table, provenance = registry.read_neurons(model, code)
        masks.append(mask_from_table(table, provenance, model, code, {"registry": str(registry.root)}).per_layer())
    return masks, languages


def save_lape(masks: list, path: Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(masks, tmp)
    return path
