"""The counts file, ``<model>/counts/<lang>.parquet``: how often every neuron of a model fired on one
language's text, and its mean activations there.

Layout 2.x (``CountsRecord.SCHEMA``; the provenance's ``schema_version`` says which layout a file has):

* one row per neuron, in (layer, neuron) order: row ``i`` is layer ``i // intermediate_size``, neuron
  ``i % intermediate_size`` (there are no layer and neuron columns: the position says them);
* ``count``: int32 (int64 only when more than 2**31 - 1 tokens were counted), DELTA_BINARY_PACKED;
* ``mean`` and ``positive_mean``: float32, BYTE_STREAM_SPLIT: the activation's mean over every counted
  position (``activation_sum / tokens``) and over the positive ones (``positive_sum / count``, 0 where
  the count is 0), each the float32 rounding of the float64 mean the counting kernel accumulated;
  both absent in counts made before neuronreg recorded them;
* zstd, no dictionary; the provenance as JSON in the schema metadata under ``neuronreg``.

Layout 1.x (read as it is, and rewritten in 2.x by :func:`migrate`): ``layer``, ``neuron`` int32,
``count`` int64 and optional float64 ``activation_sum``/``positive_sum``. Reading it gives the very
numbers a 2.x file of the same counts gives (the same float32 rounding of the same means).

Why this layout (``docs/counts-format.md``, measured on real counts with
``scripts/bench_counts_format.py``): the float64 sums were three quarters of a 9.4 MiB file at the 8B
shape, and a mean needs no more than float32; byte-splitting floats and delta-coding counts halves
what zstd makes of them; the layer and neuron columns cost little but say nothing the position does
not. The means stay in the counts file: ``select`` reads the ``count`` column alone (Parquet stores
each column apart, so the means are never read or decompressed), and counts and means of one
language stay one file replaced by one rename.

Every read validates what it returns: the shape the provenance says, integer counts between 0 and
the tokens counted, means finite, positive means >= 0 and 0 wherever the count is 0.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ..errors import RegistryError
from ..files import atomic_path
from ..limits import load_json
from ..mask import META_KEY, arrow_numbers
from ..provenance import CountsRecord

COUNT, MEAN, POSITIVE_MEAN = "count", "mean", "positive_mean"
MEAN_COLUMNS = (MEAN, POSITIVE_MEAN)
SUM_COLUMNS = ("activation_sum", "positive_sum")  # layout 1.x: float64 sums instead of float32 means
INT32_MAX = 2**31 - 1
# zstd level 9: 1.3% smaller than level 1 on real counts and means, 0.05 to 0.13 s to write a file of the
# 8B shape; level 19 saves 2.5% more and writes 10x slower (docs/counts-format.md).
ZSTD_LEVEL = 9


def damaged(path: Path, what: str = "is damaged or not a neuronreg file") -> RegistryError:
    return RegistryError(f"{path} {what}.", fix="recompute", advice="Delete it and compute it again.")


def as_numpy(values, dtype) -> np.ndarray:
    array = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    return array.astype(dtype, copy=False)


def sums_problem(counts: np.ndarray, activation_sum: np.ndarray, positive_sum: np.ndarray) -> str | None:
    """What is wrong with float64 activation sums (arrays of the counts' shape), or None."""
    if activation_sum.shape != counts.shape or positive_sum.shape != counts.shape:
        return "do not have the counts' shape"
    if not (np.isfinite(activation_sum).all() and np.isfinite(positive_sum).all()):
        return "hold values that are not finite"
    if (positive_sum < 0).any():
        return "hold a negative sum of positive activations"
    if (positive_sum[counts == 0] != 0).any():
        return "hold a positive sum for a neuron that was never positive"
    return None


def means_problem(counts: np.ndarray, mean: np.ndarray, positive_mean: np.ndarray) -> str | None:
    """What is wrong with a file's mean activations, or None."""
    if not (np.isfinite(mean).all() and np.isfinite(positive_mean).all()):
        return "has mean activations that are not finite"
    if (positive_mean < 0).any():
        return "has a negative mean positive activation"
    if (positive_mean[counts == 0] != 0).any():
        return "has a positive mean for a neuron that was never positive"
    return None


def means_from_sums(counts: np.ndarray, tokens: int, activation_sum: np.ndarray, positive_sum: np.ndarray
                    ) -> dict[str, np.ndarray]:
    """The float32 means a counts file stores, from the float64 sums the counting kernel accumulated."""
    return {MEAN: (activation_sum / max(tokens, 1)).astype(np.float32),
            POSITIVE_MEAN: (positive_sum / np.maximum(counts, 1)).astype(np.float32)}


def counts_table(counts: np.ndarray, record: CountsRecord, means: dict[str, np.ndarray] | None = None):
    """The 2.x table of ``counts`` (``[layers, intermediate]``, any integer type) and its float32 means."""
    import pyarrow as pa

    width = np.int32 if record.tokens <= INT32_MAX else np.int64
    arrays, fields = [pa.array(counts.reshape(-1).astype(width))], [pa.field(COUNT, pa.from_numpy_dtype(width), False)]
    for key in MEAN_COLUMNS if means is not None else ():
        arrays.append(pa.array(means[key].reshape(-1).astype(np.float32, copy=False)))
        fields.append(pa.field(key, pa.float32(), False))  # no nulls: no definition levels to store
    record = dataclasses.replace(record, schema_version=CountsRecord.SCHEMA)
    metadata = {META_KEY: json.dumps(record.to_dict(), sort_keys=True).encode()}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=metadata))


def write_table(table, path: Path) -> None:
    """Write a 2.x counts table atomically, with the layout's encodings."""
    import pyarrow.parquet as pq

    encodings = {COUNT: "DELTA_BINARY_PACKED", **{key: "BYTE_STREAM_SPLIT" for key in MEAN_COLUMNS}}
    try:
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp, compression="zstd", compression_level=ZSTD_LEVEL, use_dictionary=False,
                           column_encoding={k: v for k, v in encodings.items() if k in table.column_names})
    except OSError as exc:
        raise RegistryError(f"Cannot write {path}: {exc.strerror or exc}.", fix="registry") from exc


def read_record(path: Path) -> CountsRecord:
    """The provenance of a counts file, from its footer alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        raw = load_json((pq.read_schema(path).metadata or {})[META_KEY])
    except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
        raise damaged(path) from exc
    return CountsRecord.from_dict(raw, f"{path} provenance")


@dataclasses.dataclass
class CountsData:
    """What one counts file holds, validated. ``count`` is flat, in (layer, neuron) order, in the file's
    integer width (int32 or int64); ``means`` maps ``mean``/``positive_mean`` to flat float32 arrays, or is
    None when the file has none (or they were not asked for)."""

    record: CountsRecord
    count: np.ndarray
    means: dict[str, np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.record.model.num_layers, self.record.model.intermediate_size


def read(path: Path, *, means: bool = False) -> CountsData:
    """Read a counts file of any layout: the ``count`` column alone (Parquet reads no other column's
    bytes), and with ``means`` the mean activations too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise damaged(path) from exc
    try:
        try:
            schema = handle.schema_arrow
            raw = load_json((schema.metadata or {})[META_KEY])
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
            raise damaged(path) from exc
        record = CountsRecord.from_dict(raw, f"{path} provenance")
        reader = _read_current if record.major >= 2 else _read_legacy
        try:
            return reader(path, handle, record, schema.names, means)
        except (OSError, pa.ArrowException) as exc:
            raise damaged(path) from exc
    finally:
        handle.close()


def _column(path: Path, table, name: str, kind: str) -> np.ndarray:
    import pyarrow as pa

    column = table.column(name)
    ok = pa.types.is_integer(column.type) if kind == "integer" else column.type == pa.float32()
    if not ok or column.null_count:
        what = "integers" if kind == "integer" else "float32"
        raise damaged(path, f"has a {name} column of {column.type}{' with empty values' if ok else ''}, not {what}")
    values = arrow_numbers(column)
    if kind == "integer" and values.dtype not in (np.int32, np.int64):
        if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
            raise damaged(path, f"has {name} values out of range")
        values = values.astype(np.int64)
    return values


def _check_counts(path: Path, count: np.ndarray, tokens: int) -> None:
    if count.size and (count.min() < 0 or count.max() > tokens):
        raise damaged(path, f"has counts outside [0, {tokens}] (the tokens counted)")


def _read_current(path: Path, handle, record: CountsRecord, names: list[str], means: bool) -> CountsData:
    layers, inter = record.model.num_layers, record.model.intermediate_size
    rows = handle.metadata.num_rows
    if rows != layers * inter:
        raise damaged(path, f"has {rows} rows for {layers} x {inter} neurons")
    if COUNT not in names:
        raise damaged(path, "has no count column")
    present = [key for key in MEAN_COLUMNS if key in names]
    if present and len(present) != len(MEAN_COLUMNS):
        raise damaged(path, f"has {present[0]} without {({*MEAN_COLUMNS} - {*present}).pop()}")
    wanted = [COUNT] + (present if means else [])
    table = handle.read(columns=wanted, use_threads=False)
    count = _column(path, table, COUNT, "integer")
    _check_counts(path, count, record.tokens)
    found = None
    if means and present:
        found = {key: _column(path, table, key, "float32") for key in MEAN_COLUMNS}
        problem = means_problem(count, found[MEAN], found[POSITIVE_MEAN])
        if problem:
            raise damaged(path, problem)
    return CountsData(record, count, found)


def _read_legacy(path: Path, handle, record: CountsRecord, names: list[str], means: bool) -> CountsData:
    """Layout 1.x: layer, neuron, count int64 (any row order, each neuron once) and optional float64 sums."""
    import pyarrow as pa

    layers, inter = record.model.num_layers, record.model.intermediate_size
    missing = [name for name in ("layer", "neuron", COUNT) if name not in names]
    if missing:
        raise damaged(path, "does not have integer layer, neuron and count columns")
    present = [key for key in SUM_COLUMNS if key in names]
    if present and len(present) != len(SUM_COLUMNS):
        raise damaged(path, f"has {present[0]} without {({*SUM_COLUMNS} - {*present}).pop()}")
    table = handle.read(columns=["layer", "neuron", COUNT] + (present if means else []), use_threads=False)
    layer, neuron, count = (_column(path, table, name, "integer").astype(np.int64, copy=False)
                            for name in ("layer", "neuron", COUNT))
    if layer.size != layers * inter:
        raise damaged(path, f"has {layer.size} rows for {layers} x {inter} neurons")
    if layer.size and (layer.min() < 0 or layer.max() >= layers or neuron.min() < 0 or neuron.max() >= inter):
        raise damaged(path, "has layer or neuron indices out of range")
    keys = layer * inter + neuron
    if not bool((np.bincount(keys, minlength=layers * inter) == 1).all()):
        raise damaged(path, "does not hold every neuron exactly once")
    _check_counts(path, count, record.tokens)
    ordered = np.empty(layers * inter, dtype=np.int64)
    ordered[keys] = count
    found = None
    if means and present:
        sums = {}
        for key in SUM_COLUMNS:
            column = table.column(key)
            if not pa.types.is_floating(column.type) or column.null_count:
                raise damaged(path, "has activation sum columns that are not floats")
            sums[key] = np.empty(layers * inter, dtype=np.float64)
            sums[key][keys] = arrow_numbers(column).astype(np.float64)
        problem = sums_problem(ordered, *(sums[key] for key in SUM_COLUMNS))
        if problem:
            raise damaged(path, f"has activation sums that {problem}")
        found = means_from_sums(ordered, record.tokens, *(sums[key] for key in SUM_COLUMNS))
    return CountsData(record, ordered, found)


def migrate(path: Path) -> tuple[int, int] | None:
    """Rewrite a 1.x counts file in the current layout, the same counts and the same float32 means a
    read gives; None when it is current already, else its size before and after."""
    record = read_record(path)
    if record.major >= 2:
        return None
    data = read(path, means=True)
    before = path.stat().st_size
    write_table(counts_table(data.count.reshape(data.shape), record, data.means), path)
    return before, path.stat().st_size
