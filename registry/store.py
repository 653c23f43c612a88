"""The local registry: a folder of Parquet files that is also a valid ``datasets`` repository.

Layout::

    <registry>/README.md                    dataset card with a `configs:` block
    <registry>/<model>/<lang>.parquet       the selected neurons of one language
    <registry>/<model>/counts/<lang>.parquet raw counts of every neuron
    <registry>/<model>/.partial/<lang>.safetensors  checkpoint of a count in progress

Every Parquet file carries JSON provenance in its schema metadata under the key ``neuronreg``.
Every write goes to a temporary name in the same folder and is renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .errors import RegistryError

REGISTRY_ENV = "NEURONREG_REGISTRY"
META_KEY = b"neuronreg"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

NEURON_SCHEMA = pa.schema(
    [("layer", pa.int32()), ("neuron", pa.int32()), ("entropy", pa.float64()), ("activation_prob", pa.float64())]
)
COUNT_SCHEMA = pa.schema([("layer", pa.int32()), ("neuron", pa.int32()), ("count", pa.int64())])


def default_registry() -> Path:
    if os.environ.get(REGISTRY_ENV):
        return Path(os.environ[REGISTRY_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "neuronreg" / "registry"


def temp_beside(target: Path) -> str:
    """A new empty file next to ``target``, readable like any file the user creates.

    ``mkstemp`` makes files 0600; a registry is shared and served, so the umask decides instead.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` that replaces it only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def safe_name(name: str, what: str) -> str:
    """A model or language name used as a path part: no separators, no '..'."""
    if not SAFE_NAME.match(name) or ".." in name:
        raise RegistryError(f"{what} name {name!r} cannot be a registry path; use letters, digits, '-', '_', '.'.")
    return name


class LocalRegistry:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_registry()

    # -- paths -----------------------------------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        return self.root / safe_name(model, "Model")

    def neuron_path(self, model: str, lang: str) -> Path:
        return self.model_dir(model) / f"{safe_name(lang, 'Language')}.parquet"

    def counts_path(self, model: str, lang: str) -> Path:
        return self.model_dir(model) / "counts" / f"{safe_name(lang, 'Language')}.parquet"

    def checkpoint_path(self, model: str, lang: str, suffix: str = "") -> Path:
        return self.model_dir(model) / ".partial" / f"{safe_name(lang, 'Language')}{suffix}.safetensors"

    def ensure_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".write-test-"):
                pass
        except OSError as exc:
            raise RegistryError(
                f"Registry {self.root} is not writable ({exc.strerror or exc}). Choose another with --registry "
                "or $NEURONREG_REGISTRY."
            ) from None

    # -- listing ---------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and SAFE_NAME.match(p.name)
                      and ((p / "counts").is_dir() or any(p.glob("*.parquet"))))

    def counted_languages(self, model: str) -> list[str]:
        folder = self.model_dir(model) / "counts"
        return sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []

    def selected_languages(self, model: str) -> list[str]:
        folder = self.model_dir(model)
        return sorted(p.stem for p in folder.glob("*.parquet")) if folder.is_dir() else []

    # -- Parquet ---------------------------------------------------------------------------------
    def write_table(self, path: Path, table: pa.Table, provenance: dict) -> None:
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = json.dumps(provenance, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
        try:
            with atomic_path(path) as tmp:
                write_parquet(table, tmp)
        except OSError as exc:
            raise RegistryError(f"Cannot write {path}: {exc.strerror or exc}. Check the registry folder.") from None

    def read_table(self, path: Path) -> tuple[pa.Table, dict]:
        if not path.is_file():
            raise RegistryError(f"{path} does not exist.")
        try:
            table = pq.read_table(path)
            provenance = json.loads((table.schema.metadata or {})[META_KEY])
        except (OSError, pa.ArrowException, KeyError, ValueError):
            raise RegistryError(
                f"{path} is damaged or not a neuronreg file. Delete it and run compute again (or use --force)."
            ) from None
        return table, provenance

    def read_provenance(self, path: Path) -> dict:
        try:
            meta = pq.read_schema(path).metadata or {}
            return json.loads(meta[META_KEY])
        except (OSError, pa.ArrowException, KeyError, ValueError):
            raise RegistryError(
                f"{path} is damaged or not a neuronreg file. Delete it and run compute again (or use --force)."
            ) from None

    # -- counts ----------------------------------------------------------------------------------
    def write_counts(self, model: str, lang: str, over_zero: torch.Tensor, provenance: dict) -> Path:
        layers, inter = over_zero.shape
        table = pa.table(
            {
                "layer": pa.array(torch.arange(layers, dtype=torch.int32).repeat_interleave(inter).numpy()),
                "neuron": pa.array(torch.arange(inter, dtype=torch.int32).repeat(layers).numpy()),
                "count": pa.array(over_zero.to(torch.int64).flatten().numpy()),
            },
            schema=COUNT_SCHEMA,
        )
        path = self.counts_path(model, lang)
        self.write_table(path, table, provenance)
        return path

    def read_counts(self, model: str, lang: str) -> tuple[torch.Tensor, dict]:
        path = self.counts_path(model, lang)
        table, provenance = self.read_table(path)
        try:
            layers, inter = int(provenance["num_layers"]), int(provenance["intermediate_size"])
            counts = torch.from_numpy(table.column("count").to_numpy().copy())
            layer = table.column("layer").to_numpy()
            neuron = table.column("neuron").to_numpy()
            if counts.numel() != layers * inter:
                raise ValueError
            order = torch.from_numpy(layer.astype("int64") * inter + neuron.astype("int64"))
            over_zero = torch.empty(layers * inter, dtype=torch.int64)
            over_zero[order] = counts
            return over_zero.view(layers, inter), provenance
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError):
            raise RegistryError(
                f"{path} does not hold one count per neuron. Delete it and run compute again (or use --force)."
            ) from None

    # -- selected neurons ------------------------------------------------------------------------
    def write_neurons(self, model: str, tables: dict[str, tuple[pa.Table, dict]]) -> None:
        """Replace a model's neuron files with one selection; files of other languages go."""
        tmp_paths = []
        try:
            self.model_dir(model).mkdir(parents=True, exist_ok=True)
            for lang, (table, provenance) in tables.items():
                path = self.neuron_path(model, lang)
                meta = {META_KEY: json.dumps(provenance, sort_keys=True).encode()}
                tmp = temp_beside(path)
                tmp_paths.append((tmp, path))
                write_parquet(table.replace_schema_metadata(meta), Path(tmp))
            # All files are written before any is renamed: a failure leaves the old selection whole.
            for tmp, path in tmp_paths:
                os.replace(tmp, path)
        except OSError as exc:
            raise RegistryError(f"Cannot write the neuron files of {model}: {exc.strerror or exc}.") from None
        finally:
            for tmp, _ in tmp_paths:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        for lang in self.selected_languages(model):
            if lang not in tables:
                self.neuron_path(model, lang).unlink()

    def read_neurons(self, model: str, lang: str) -> tuple[pa.Table, dict]:
        path = self.neuron_path(model, lang)
        if not path.is_file():
            have = self.selected_languages(model)
            if not have:
                raise RegistryError(f"The registry at {self.root} has no neurons for {model}. Run 'neuronreg compute' first.")
            raise RegistryError(f"No {lang} neurons for {model} in {self.root} (available: {', '.join(have)}).")
        return self.read_table(path)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Write a Parquet file; an empty table gets no row group at all, which `datasets` reads as 0 rows
    (a zero-row group makes it fail on the whole config, not only on that split)."""
    if table.num_rows == 0:
        pq.ParquetWriter(path, table.schema, compression="zstd").close()
    else:
        pq.write_table(table, path, compression="zstd")


def neuron_table(layer: torch.Tensor, neuron: torch.Tensor, entropy: torch.Tensor, prob: torch.Tensor) -> pa.Table:
    return pa.table(
        {
            "layer": pa.array(layer.to(torch.int32).numpy()),
            "neuron": pa.array(neuron.to(torch.int32).numpy()),
            "entropy": pa.array(entropy.double().numpy()),
            "activation_prob": pa.array(prob.double().numpy()),
        },
        schema=NEURON_SCHEMA,
    )
