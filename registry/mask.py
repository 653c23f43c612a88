"""``NeuronMask``: THE type for a set of neurons of one model.

Selection returns one per language, the registry stores and loads them, ``load_mask`` and ``fetch``
give them, ``import`` makes them from the LAPE authors' files, ``ablate`` switches them off and
``finetune`` trains them. The neurons are kept as two sorted int64 numpy arrays (``layer``,
``neuron``), so reading and summarising a mask needs no torch; the views that torch code wants
(``per_layer()``, ``boolean()``) import it when called.

Files, each saved AND loaded here (round-trip tested):

* ``parquet``: the registry's file: columns layer, neuron, entropy, activation_prob, with the
  provenance (:class:`~neuronreg.provenance.NeuronsRecord`) in the schema metadata;
* ``json``: the header (model, language, dimensions, provenance) and ``layers``: list[layer] -> ids;
* ``pt``: the LAPE authors' format, ``list[layer] -> LongTensor`` (loading needs the MLP width,
  which the format does not hold);
* ``safetensors``: int32 ``layer`` and ``neuron`` tensors, the header as JSON metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import MaskError, RecordError
from .files import atomic_path, write_parquet
from .layouts import weights_per_neuron
from .limits import load_json
from .provenance import MaskSource, NeuronsRecord

FORMATS = ("parquet", "json", "pt", "safetensors")
META_KEY = b"neuronreg"
RANDOM = "random"


def _ids(values) -> np.ndarray:
    if hasattr(values, "numpy") and hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64).reshape(-1)


@dataclass(eq=False)
class NeuronMask:
    """The neurons of one language (or any named set) in one model, with where they came from."""

    model: str
    language: str
    num_layers: int
    intermediate_size: int
    layer: np.ndarray  # int64 [n], sorted by (layer, neuron), no repeats
    neuron: np.ndarray  # int64 [n]
    entropy: np.ndarray | None = None  # float64 [n]: the LAPE score (None: imported or derived)
    activation_prob: np.ndarray | None = None  # float64 [n]: this language's activation probability
    provenance: NeuronsRecord | None = None
    source: MaskSource | None = None  # what the mask is (its selection, repo, file name, seed): publishable
    # Where it lay on this machine (a registry folder, a file), for messages only: never recorded or published.
    location: Path | None = field(default=None, repr=False)

    def __post_init__(self):
        self.layer, self.neuron = _ids(self.layer), _ids(self.neuron)
        if self.entropy is not None:
            self.entropy = np.asarray(self.entropy, dtype=np.float64).reshape(-1)
        if self.activation_prob is not None:
            self.activation_prob = np.asarray(self.activation_prob, dtype=np.float64).reshape(-1)
        self.validate()

    # -- construction -------------------------------------------------------------------------------
    def validate(self) -> None:
        """MaskError unless the ids are in range, sorted by (layer, neuron) and unique."""
        where = f"The {self.language} mask of {self.model}"
        if self.num_layers <= 0 or self.intermediate_size <= 0:
            raise MaskError(f"{where} has no layers or no neurons per layer.")
        n = self.layer.size
        if self.neuron.size != n or any(a is not None and a.size != n for a in (self.entropy, self.activation_prob)):
            raise MaskError(f"{where} has columns of different lengths.")
        if n and (self.layer.min() < 0 or self.layer.max() >= self.num_layers or self.neuron.min() < 0
                  or self.neuron.max() >= self.intermediate_size):
            raise MaskError(f"{where} has indices outside {self.num_layers} layers x {self.intermediate_size} "
                            "neurons.")
        keys = self.keys()
        if n > 1 and not bool((keys[1:] > keys[:-1]).all()):
            raise MaskError(f"{where} is not sorted by layer and neuron, or repeats a neuron.")

    @classmethod
    def from_keys(cls, model: str, language: str, num_layers: int, intermediate_size: int, keys, **kw) -> NeuronMask:
        """From flat ids ``layer * intermediate_size + neuron`` (any order, repeats dropped)."""
        keys = np.unique(_ids(keys))
        return cls(model, language, num_layers, intermediate_size, keys // intermediate_size,
                   keys % intermediate_size, **kw)

    @classmethod
    def from_per_layer(cls, per_layer, *, model: str = "", language: str = "", intermediate_size: int,
                       **kw) -> NeuronMask:
        """From the LAPE authors' ``list[layer] -> ids`` (each layer's ids sorted and unique)."""
        layers, neurons = [], []
        for index, ids in enumerate(per_layer):
            ids = _ids(ids)
            if ids.size > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise MaskError(f"Layer {index} of the {language or 'given'} mask is not sorted or repeats an index.")
            layers.append(np.full(ids.size, index, dtype=np.int64))
            neurons.append(ids)
        empty = np.zeros(0, dtype=np.int64)
        return cls(model, language, len(per_layer), intermediate_size,
                   np.concatenate(layers) if layers else empty, np.concatenate(neurons) if neurons else empty, **kw)

    @classmethod
    def random(cls, counts: list[int], intermediate_size: int, seed: int, *, model: str = "",
               language: str = RANDOM) -> NeuronMask:
        """``counts[l]`` neurons of layer ``l`` drawn uniformly without replacement; the same seed, the same mask.

        This is the seed paper's control done right: the same count PER LAYER, not the same total.
        """
        import torch

        generator = torch.Generator().manual_seed(seed)
        per_layer = []
        for index, count in enumerate(counts):
            if not 0 <= count <= intermediate_size:
                raise MaskError(f"Cannot draw {count} of {intermediate_size} neurons in layer {index}.")
            per_layer.append(torch.randperm(intermediate_size, generator=generator)[:count].sort().values)
        return cls.from_per_layer(per_layer, model=model, language=language, intermediate_size=intermediate_size,
                                  source=MaskSource(kind="random", seed=seed, per_layer=list(counts)))

    def random_like(self, seed: int) -> NeuronMask:
        """A random mask with this mask's count in every layer."""
        return NeuronMask.random(self.counts_per_layer(), self.intermediate_size, seed, model=self.model)

    # -- views --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.layer.size)

    def __repr__(self) -> str:
        return (f"NeuronMask({self.model!r}, {self.language!r}, {len(self)} neurons of {self.num_layers} x "
                f"{self.intermediate_size})")

    def __eq__(self, other) -> bool:
        """Same model shape and same neurons (names, scores and provenance aside)."""
        return (isinstance(other, NeuronMask) and self.shape == other.shape
                and np.array_equal(self.layer, other.layer) and np.array_equal(self.neuron, other.neuron))

    __hash__ = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_layers, self.intermediate_size

    def keys(self) -> np.ndarray:
        """Flat ids ``layer * intermediate_size + neuron``, ascending."""
        return self.layer * self.intermediate_size + self.neuron

    def sha256(self) -> str:
        """A content hash of the neuron set (the model's shape and the sorted ids), whatever file it came from:
        two masks of the same neurons have the same hash."""
        import hashlib

        digest = hashlib.sha256(f"neuronreg-mask:{self.num_layers}x{self.intermediate_size}:".encode())
        digest.update(self.keys().astype("<i8").tobytes())
        return digest.hexdigest()

    def counts_per_layer(self) -> list[int]:
        return np.bincount(self.layer, minlength=self.num_layers).tolist()

    def per_layer(self) -> list:
        """The LAPE authors' format: ``list[layer] -> LongTensor`` of sorted neuron indices."""
        import torch

        bounds = np.searchsorted(self.layer, np.arange(self.num_layers + 1))
        return [torch.from_numpy(self.neuron[bounds[i]:bounds[i + 1]].copy()) for i in range(self.num_layers)]

    def boolean(self):
        """``[layers, intermediate]`` bool tensor, True where a neuron belongs to the mask."""
        import torch

        mask = torch.zeros(self.num_layers, self.intermediate_size, dtype=torch.bool)
        mask[torch.from_numpy(self.layer), torch.from_numpy(self.neuron)] = True
        return mask

    @property
    def hidden_size(self) -> int | None:
        return self.provenance.model.hidden_size if self.provenance else None

    def trainable_weights(self) -> int | None:
        """Weights these neurons own (what sparse fine-tuning trains), when the hidden size is known."""
        if self.provenance is None:
            return None
        per = weights_per_neuron(self.provenance.model.mlp_layout, self.provenance.model.hidden_size)
        return None if per is None else len(self) * per

    def share_of_parameters(self) -> float | None:
        weights = self.trainable_weights()
        total = self.provenance.model.num_parameters if self.provenance else None
        return weights / total if weights is not None and total else None

    # -- set algebra --------------------------------------------------------------------------------
    def _same_shape(self, other: NeuronMask) -> None:
        if self.shape != other.shape:
            raise MaskError(f"The {self.language} and {other.language} masks are of different models "
                            f"({self.num_layers} x {self.intermediate_size} and {other.num_layers} x "
                            f"{other.intermediate_size}).")

    def _combine(self, other: NeuronMask, keys: np.ndarray, label: str) -> NeuronMask:
        return NeuronMask.from_keys(self.model, label, self.num_layers, self.intermediate_size, keys,
                                    source=MaskSource(kind="derived"))

    def union(self, other: NeuronMask) -> NeuronMask:
        self._same_shape(other)
        return self._combine(other, np.union1d(self.keys(), other.keys()), f"{self.language}|{other.language}")

    def intersection(self, other: NeuronMask) -> NeuronMask:
        self._same_shape(other)
        return self._combine(other, np.intersect1d(self.keys(), other.keys()), f"{self.language}&{other.language}")

    def difference(self, other: NeuronMask) -> NeuronMask:
        self._same_shape(other)
        keep = ~np.isin(self.keys(), other.keys())
        return replace(self, layer=self.layer[keep], neuron=self.neuron[keep],
                       entropy=None if self.entropy is None else self.entropy[keep],
                       activation_prob=None if self.activation_prob is None else self.activation_prob[keep],
                       language=f"{self.language}-{other.language}", source=MaskSource(kind="derived"))

    __or__, __and__, __sub__ = union, intersection, difference

    def jaccard(self, other: NeuronMask) -> float:
        self._same_shape(other)
        union = np.union1d(self.keys(), other.keys()).size
        return np.intersect1d(self.keys(), other.keys()).size / union if union else 0.0

    # -- fitting a model ----------------------------------------------------------------------------
    def check(self, model) -> None:
        """MaskError unless ``model`` (a torch module) has this mask's layer count and MLP width."""
        from .models import find_mlp_sites

        self.check_sites(find_mlp_sites(model))

    def check_sites(self, sites) -> None:
        widths = {site.intermediate_size for site in sites}
        if len(sites) != self.num_layers or widths != {self.intermediate_size}:
            got = f"{len(sites)} x {'/'.join(map(str, sorted(widths)))}"
            raise MaskError(f"The {self.language} mask of {self.model} is for {self.num_layers} layers x "
                            f"{self.intermediate_size} neurons, but this model has {got}.", fix="mask_model",
                            advice="Use the mask of this model.")

    # -- files --------------------------------------------------------------------------------------
    def header(self) -> dict:
        return {"model": self.model, "language": self.language, "num_layers": self.num_layers,
                "intermediate_size": self.intermediate_size, "num_neurons": len(self),
                "source": self.source.to_dict() if self.source else None,
                "provenance": self.provenance.to_dict() if self.provenance else None}

    def to_json(self) -> dict:
        return {**self.header(), "layers": [t.tolist() for t in self._per_layer_lists()]}

    def _per_layer_lists(self) -> list[np.ndarray]:
        bounds = np.searchsorted(self.layer, np.arange(self.num_layers + 1))
        return [self.neuron[bounds[i]:bounds[i + 1]] for i in range(self.num_layers)]

    def to_table(self):
        """The registry's Parquet table, provenance in the schema metadata."""
        import pyarrow as pa

        n = len(self)
        table = pa.table({
            "layer": pa.array(self.layer.astype(np.int32)),
            "neuron": pa.array(self.neuron.astype(np.int32)),
            "entropy": pa.array(self.entropy) if self.entropy is not None else pa.nulls(n, pa.float64()),
            "activation_prob": (pa.array(self.activation_prob) if self.activation_prob is not None
                                else pa.nulls(n, pa.float64())),
        }, schema=neuron_schema())
        if self.provenance is not None:
            table = table.replace_schema_metadata({META_KEY: json.dumps(self.provenance.to_dict(),
                                                                        sort_keys=True).encode()})
        return table

    def save(self, path: str | Path, fmt: str | None = None) -> Path:
        """Write the mask as parquet, json, pt or safetensors (default: from the suffix), atomically."""
        path = Path(path)
        fmt = fmt or format_from_suffix(path)
        if fmt not in FORMATS:
            raise MaskError(f"Unknown mask format {fmt!r}; use one of {', '.join(FORMATS)}.")
        with atomic_path(path) as tmp:
            if fmt == "parquet":
                write_parquet(self.to_table(), tmp)
            elif fmt == "json":
                tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
            elif fmt == "pt":
                import torch

                torch.save(self.per_layer(), tmp)
            else:
                import torch
                from safetensors.torch import save_file

                save_file({"layer": torch.from_numpy(self.layer.astype(np.int32)),
                           "neuron": torch.from_numpy(self.neuron.astype(np.int32))},
                          str(tmp), metadata={"neuronreg": json.dumps(self.header())})
        return path

    @classmethod
    def load(cls, path: str | Path, fmt: str | None = None, *, model: str | None = None,
             language: str | None = None, intermediate_size: int | None = None) -> NeuronMask:
        """Read a mask file of any format :meth:`save` writes. ``pt`` files need ``intermediate_size``."""
        path = Path(path)
        fmt = fmt or format_from_suffix(path)
        if not path.is_file():
            raise MaskError(f"{path} does not exist.")
        source = MaskSource(kind="file", file=path.name)
        try:
            if fmt == "parquet":
                return read_mask_file(path, model, language, source, where=str(path), location=path)
            if fmt == "json":
                data = load_json(path.read_text(encoding="utf-8"))
                return cls._from_header(data, data.get("layers"), source, model, language, location=path)
            if fmt == "safetensors":
                from safetensors import safe_open

                with safe_open(str(path), "np") as f:
                    header = load_json((f.metadata() or {})["neuronreg"])
                    layer, neuron = f.get_tensor("layer"), f.get_tensor("neuron")
                return cls._from_header(header, None, source, model, language, layer, neuron, location=path)
            if fmt == "pt":
                import torch

                if intermediate_size is None:
                    raise MaskError(f"{path.name} is in the LAPE authors' format, which does not hold the MLP width.",
                                    advice="Pass intermediate_size.")
                data = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(data, (list, tuple)) or not all(_is_index_tensor(t) for t in data):
                    raise MaskError(f"{path.name} does not hold list[layer] -> LongTensor.")
                return cls.from_per_layer(list(data), model=model or "", language=language or "",
                                          intermediate_size=intermediate_size, source=source, location=path)
        except (MaskError, RecordError):
            raise
        except Exception as exc:  # json, safetensors, pickle and zip errors all mean "not a mask file"
            raise MaskError(f"{path.name} is not a neuronreg mask in {fmt} format ({type(exc).__name__}).") from exc
        raise MaskError(f"Unknown mask format {fmt!r}; use one of {', '.join(FORMATS)}.")

    @classmethod
    def _from_header(cls, header: dict, layers, source: MaskSource, model, language, layer=None,
                     neuron=None, *, location: Path) -> NeuronMask:
        provenance = header.get("provenance")
        record = NeuronsRecord.from_dict(provenance, f"{source.file} provenance") if provenance else None
        kw = dict(provenance=record, source=_file_source(header.get("source"), source), location=location)
        name, code = model or header["model"], language or header["language"]
        if layers is not None:
            return cls.from_per_layer(layers, model=name, language=code,
                                      intermediate_size=int(header["intermediate_size"]), **kw)
        return cls(name, code, int(header["num_layers"]), int(header["intermediate_size"]), layer, neuron, **kw)


def _file_source(stored, file: MaskSource) -> MaskSource:
    """The source a mask file records (what ``save`` wrote): a published repo, a seed or a derivation stays
    what the mask is; a mask saved out of a local registry is now that file (its selection's name kept)."""
    if not isinstance(stored, dict):
        return file
    recorded = MaskSource.from_dict(stored, f"{file.file} source")
    if recorded.kind in ("repo", "random", "derived"):
        return recorded
    return MaskSource(kind="file", file=file.file, selection=recorded.selection)


def _is_index_tensor(t) -> bool:
    import torch

    return isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and not t.is_complex() \
        and t.dtype != torch.bool


def neuron_schema():
    """The columns of a neuron file (a function: pyarrow is imported only when a file is written)."""
    import pyarrow as pa

    return pa.schema([("layer", pa.int32()), ("neuron", pa.int32()), ("entropy", pa.float64()),
                      ("activation_prob", pa.float64())])


def format_from_suffix(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"pth": "pt", "st": "safetensors"}.get(suffix, suffix) if suffix else "json"


def mask_from_table(table, provenance: NeuronsRecord, model: str, language: str, source: MaskSource,
                    where: str, location: Path | None = None) -> NeuronMask:
    """A mask from a neuron Parquet table and its provenance, validated: schema and column types, sizes,
    ranges (entropies in [0, log K] or +inf, probabilities in [0, 1]), order, and the model and language
    the provenance names (a repo's file must be of the model it is filed under; a local file may be read
    for another name of the same model, and its shape is checked where it is used). ``where`` names the
    file or repo in messages; ``location`` is kept on the mask for messages only."""
    import pyarrow as pa

    bad = f"The {language} file of {model} in {where}"
    missing = [name for name in ("layer", "neuron") if name not in table.column_names]
    if missing:
        raise MaskError(f"{bad} has no {', '.join(missing)} column; it is not a neuronreg mask.")
    stored = provenance.language.code
    if stored != language:
        raise MaskError(f"The file for {language} of {model} in {where} says it holds {stored}.")
    if source.kind == "repo" and provenance.model.name != model:
        raise MaskError(f"{bad} says it is of the model {provenance.model.name!r}.")
    if provenance.num_neurons != table.num_rows:
        raise MaskError(f"{bad} has {table.num_rows} rows but its provenance says {provenance.num_neurons}; it is "
                        "damaged.")

    def column(name, dtype, kind):
        if name not in table.column_names:
            return None
        values = table.column(name)
        if len(values) and values.null_count == len(values):
            return None  # an imported mask's scores: all empty
        if not (pa.types.is_integer(values.type) if kind == "integer" else pa.types.is_floating(values.type)):
            raise MaskError(f"{bad} has a {name} column of {values.type}, not {kind}s.")
        if values.null_count:
            raise MaskError(f"{bad} has empty {name} values.")
        return arrow_numbers(values).astype(dtype)

    entropy, prob = column("entropy", np.float64, "float"), column("activation_prob", np.float64, "float")
    if entropy is not None:
        # H of K languages' shares lies in [0, log K]; +inf marks a neuron no language fires on enough.
        top = math.log(max(len(provenance.selection.languages), 1)) * (1 + 1e-9) + 1e-12
        if np.isnan(entropy).any() or (entropy < 0).any() or ((entropy > top) & ~np.isposinf(entropy)).any():
            raise MaskError(f"{bad} has entropies outside [0, log {len(provenance.selection.languages)}].")
    if prob is not None and not (np.isfinite(prob).all() and (prob >= 0).all() and (prob <= 1).all()):
        raise MaskError(f"{bad} has activation probabilities outside [0, 1].")
    try:
        return NeuronMask(model, language, provenance.model.num_layers, provenance.model.intermediate_size,
                          column("layer", np.int64, "integer"), column("neuron", np.int64, "integer"), entropy,
                          prob, provenance, source, location)
    except MaskError as exc:
        raise MaskError(f"{exc.message} (in {where})") from exc


_ARROW_FLOATS = {"halffloat": np.float16, "float": np.float32, "double": np.float64}


def arrow_numbers(column) -> np.ndarray:
    """A pyarrow (Chunked)Array of fixed-width numbers without nulls, as a read-only numpy array of its
    buffers. ``to_numpy`` would do the same but imports pandas, a quarter of a second of every command
    that reads a file (``scripts/bench_startup.py``)."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    name = str(column.type)
    dtype = np.dtype(_ARROW_FLOATS.get(name, name))  # int8 ... uint64 are numpy's names too
    if dtype.kind not in "iuf" or dtype.itemsize * 8 != column.type.bit_width:
        raise TypeError(f"not a fixed-width number type: {column.type}")
    parts = [np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk), offset=chunk.offset * dtype.itemsize)
             for chunk in chunks if len(chunk)]
    if not parts:
        return np.zeros(0, dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_neuron_table(path: Path, where: str):
    """A neuron Parquet file's table and typed provenance, or MaskError/RecordError naming ``where``.
    Read with ``ParquetFile`` (``pq.read_table`` would import ``pyarrow.dataset`` and pandas: half of a
    command's start-up)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as handle:
            table = handle.read(use_threads=False)
        raw = load_json((table.schema.metadata or {})[META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise MaskError(f"{where} is damaged or not a neuronreg file.", fix="recompute") from exc
    return table, NeuronsRecord.from_dict(raw, f"{where} provenance")


def read_mask_file(path: Path, model: str | None, language: str | None, source: MaskSource, *, where: str,
                   location: Path | None = None) -> NeuronMask:
    """A mask from one neuron Parquet file (the registry's, or one written by ``fetch -o x.parquet``)."""
    table, provenance = read_neuron_table(path, where)
    return mask_from_table(table, provenance, model or provenance.model.name, language or provenance.language.code,
                           source, where, location)
