"""A language's neuron mask as one object: per-layer indices, a boolean matrix, files, checks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import MaskError
from .store import META_KEY, NEURON_SCHEMA, atomic_path, write_parquet

FORMATS = ("parquet", "json", "pt", "safetensors")


@dataclass
class NeuronMask:
    """The neurons of one language in one model, with where they came from."""

    model: str
    language: str
    num_layers: int
    intermediate_size: int
    layer: torch.Tensor  # int64 [n], sorted by (layer, neuron)
    neuron: torch.Tensor  # int64 [n]
    provenance: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)  # {"repo", "revision", "commit"} or {"registry": path}
    table: pa.Table | None = None

    def __len__(self) -> int:
        return int(self.layer.numel())

    @property
    def hidden_size(self) -> int | None:
        return self.provenance.get("hidden_size")

    def per_layer(self) -> list[torch.Tensor]:
        """The LAPE authors' format: ``list[layer] -> LongTensor`` of sorted neuron indices."""
        return [self.neuron[self.layer == layer].clone() for layer in range(self.num_layers)]

    def boolean(self) -> torch.Tensor:
        """``[layers, intermediate]``, True where a neuron belongs to the mask."""
        mask = torch.zeros(self.num_layers, self.intermediate_size, dtype=torch.bool)
        mask[self.layer, self.neuron] = True
        return mask

    def counts_per_layer(self) -> list[int]:
        return torch.bincount(self.layer, minlength=self.num_layers).tolist()

    def check(self, model: torch.nn.Module) -> None:
        """Raise MaskError unless ``model`` has this mask's layer count and intermediate size."""
        from .models import find_mlp_sites

        sites = find_mlp_sites(model)
        got = (len(sites), sites[0].intermediate_size)
        if got != (self.num_layers, self.intermediate_size):
            raise MaskError(
                f"The {self.language} mask of {self.model} is for {self.num_layers} layers x {self.intermediate_size} "
                f"neurons, but this model has {got[0]} x {got[1]}. Use the mask of this model."
            )

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        path = Path(path)
        fmt = fmt or format_from_suffix(path)
        with atomic_path(path) as tmp:
            if fmt == "parquet":
                table = self.table if self.table is not None else pa.table(
                    {"layer": self.layer.to(torch.int32).numpy(), "neuron": self.neuron.to(torch.int32).numpy(),
                     "entropy": pa.nulls(len(self), pa.float64()), "activation_prob": pa.nulls(len(self), pa.float64())},
                    schema=NEURON_SCHEMA)
                write_parquet(table.replace_schema_metadata({META_KEY: json.dumps(self.provenance).encode()}), tmp)
            elif fmt == "json":
                tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
            elif fmt == "pt":
                torch.save(self.per_layer(), tmp)
            elif fmt == "safetensors":
                from safetensors.torch import save_file

                save_file({"layer": self.layer.to(torch.int32).contiguous(), "neuron": self.neuron.to(torch.int32).contiguous()},
                          str(tmp), metadata={"neuronreg": json.dumps(self.header())})
            else:
                raise MaskError(f"Unknown mask format {fmt!r}; use one of {', '.join(FORMATS)}.")
        return path

    def header(self) -> dict:
        return {"model": self.model, "language": self.language, "num_layers": self.num_layers,
                "intermediate_size": self.intermediate_size, "num_neurons": len(self), "source": self.source,
                "provenance": self.provenance}

    def to_json(self) -> dict:
        return {**self.header(), "layers": [t.tolist() for t in self.per_layer()]}


def format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"pth": "pt", "st": "safetensors"}.get(suffix, suffix) if suffix else "json"


def mask_from_table(table: pa.Table, provenance: dict, model: str, language: str, source: dict) -> NeuronMask:
    """A mask from a neuron Parquet table, validated: schema, sizes, ranges and order."""
    where = source.get("repo") or source.get("registry") or "the file"
    missing = [name for name in ("layer", "neuron") if name not in table.column_names]
    if missing:
        raise MaskError(f"The {language} file of {model} in {where} has no {', '.join(missing)} column; it is not a "
                        "neuronreg mask.")
    try:
        layers, inter = int(provenance["num_layers"]), int(provenance["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        raise MaskError(f"The {language} file of {model} in {where} has no layer count / intermediate size in its "
                        "provenance; it is not a neuronreg mask.") from None
    layer = torch.from_numpy(table.column("layer").to_numpy(zero_copy_only=False).astype("int64"))
    neuron = torch.from_numpy(table.column("neuron").to_numpy(zero_copy_only=False).astype("int64"))
    if layer.numel() and (int(layer.min()) < 0 or int(layer.max()) >= layers or int(neuron.min()) < 0
                          or int(neuron.max()) >= inter):
        raise MaskError(f"The {language} file of {model} in {where} has indices outside {layers} x {inter}.")
    keys = layer * inter + neuron
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        raise MaskError(f"The {language} file of {model} in {where} is not sorted by layer and neuron, or repeats one.")
    stored = provenance.get("language", {}).get("code")
    if stored and stored != language:
        raise MaskError(f"The file for {language} of {model} in {where} says it holds {stored}.")
    return NeuronMask(model, language, layers, inter, layer, neuron, provenance, source, table)


def read_mask_file(path: Path, model: str, language: str, source: dict) -> NeuronMask:
    try:
        table = pq.read_table(path)
        provenance = json.loads((table.schema.metadata or {})[META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError):
        raise MaskError(f"{path.name} from {source.get('repo') or path.parent} is damaged or not a neuronreg file.") from None
    return mask_from_table(table, provenance, model, language, source)
