"""The local registry: a folder of Parquet files that is also a valid ``datasets`` repository.

Layout::

    <registry>/README.md                     dataset card with a `configs:` block
    <registry>/<model>/<lang>.parquet        the selected neurons of one language
    <registry>/<model>/counts/<lang>.parquet raw counts of every neuron
    <registry>/<model>/.partial/<lang>.safetensors  checkpoint of a count in progress

Every Parquet file carries its provenance (a typed record, :mod:`neuronreg.provenance`) as JSON in
its schema metadata under the key ``neuronreg``. Every write goes to a temporary name in the same
folder and is renamed into place. Reading validates: a counts file must hold every neuron exactly
once, with counts between 0 and its tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import MaskError, RegistryError
from ..files import SAFE_NAME, atomic_path, safe_name, temp_beside, write_parquet
from ..mask import META_KEY, NeuronMask, mask_from_table, read_neuron_table
from ..provenance import CountsRecord
from .cards import write_registry_card

REGISTRY_ENV = "NEURONREG_REGISTRY"
CARD = "README.md"
# Names a model cannot take: they are the registry's own files, or would hide from listings.
RESERVED = {CARD.lower(), "counts", ".partial", ".git", ".gitattributes", ".cache"}


def default_registry() -> Path:
    if os.environ.get(REGISTRY_ENV):
        return Path(os.environ[REGISTRY_ENV]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "neuronreg" / "registry"


def model_name(name: str) -> str:
    name = safe_name(name, "Model")
    if name.lower() in RESERVED:
        raise RegistryError(f"Model name {name!r} is reserved for the registry's own files; choose another.",
                            fix="name")
    return name


class LocalRegistry:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_registry()

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        return self.root / model_name(model)

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
            raise RegistryError(f"Registry {self.root} is not writable ({exc.strerror or exc}).",
                                fix="registry", advice="Choose another folder.") from exc

    # -- listing ---------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.is_symlink() and SAFE_NAME.match(p.name)
                      and p.name.lower() not in RESERVED
                      and ((p / "counts").is_dir() or any(self._files(p))))

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        """Regular Parquet files named like a language (no links, no temporaries)."""
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.parquet")
                      if p.is_file() and not p.is_symlink() and SAFE_NAME.match(p.stem))

    def counted_languages(self, model: str) -> list[str]:
        return [p.stem for p in self._files(self.model_dir(model) / "counts")]

    def selected_languages(self, model: str) -> list[str]:
        return [p.stem for p in self._files(self.model_dir(model))]

    # -- where a local model's weights are (kept here, never published) -----------------------------
    SOURCE_FILE = ".source.json"

    def remember_source(self, model: str, folder: str) -> None:
        """Note which local folder ``model`` was computed from, so its registry name can stand for it."""
        from ..files import atomic_write_text

        atomic_write_text(self.model_dir(model) / self.SOURCE_FILE, json.dumps({"path": str(folder)}) + "\n")

    def model_source(self, model: str) -> str | None:
        """The local folder ``model`` was computed from, while it still exists."""
        try:
            path = json.loads((self.model_dir(model) / self.SOURCE_FILE).read_text(encoding="utf-8"))["path"]
        except (OSError, ValueError, KeyError, TypeError, RegistryError):
            return None
        return path if isinstance(path, str) and (Path(path) / "config.json").is_file() else None

    # -- counts ----------------------------------------------------------------------------------
    def write_counts(self, model: str, lang: str, over_zero, record: CountsRecord) -> Path:
        import numpy as np
        import pyarrow as pa

        counts = over_zero.cpu().numpy().astype(np.int64) if hasattr(over_zero, "cpu") else np.asarray(over_zero)
        layers, inter = counts.shape
        table = pa.table({
            "layer": pa.array(np.repeat(np.arange(layers, dtype=np.int32), inter)),
            "neuron": pa.array(np.tile(np.arange(inter, dtype=np.int32), layers)),
            "count": pa.array(counts.reshape(-1)),
        })
        path = self.counts_path(model, lang)
        self._write_table(path, table, record.to_dict())
        return path

    def read_counts_record(self, model: str, lang: str) -> CountsRecord:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self.counts_path(model, lang)
        try:
            raw = json.loads((pq.read_schema(path).metadata or {})[META_KEY])
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
            raise self._damaged(path) from exc
        return CountsRecord.from_dict(raw, f"{path} provenance")

    def read_counts(self, model: str, lang: str):
        """``over_zero [layers, intermediate]`` (torch int64) and the record, validated: every neuron
        exactly once, counts between 0 and the tokens counted."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        path = self.counts_path(model, lang)
        if not path.is_file():
            raise RegistryError(f"No counts for {lang} of {model} in {self.root}.", fix="compute")
        try:
            table = pq.read_table(path)
            raw = json.loads((table.schema.metadata or {})[META_KEY])
        except (OSError, pa.ArrowException, KeyError, ValueError) as exc:
            raise self._damaged(path) from exc
        record = CountsRecord.from_dict(raw, f"{path} provenance")
        layers, inter = record.model.num_layers, record.model.intermediate_size
        try:
            layer = table.column("layer").to_numpy().astype(np.int64)
            neuron = table.column("neuron").to_numpy().astype(np.int64)
            count = table.column("count").to_numpy().astype(np.int64)
        except (KeyError, pa.ArrowException, ValueError, TypeError) as exc:
            raise self._damaged(path, "does not have integer layer, neuron and count columns") from exc
        if layer.size != layers * inter:
            raise self._damaged(path, f"has {layer.size} rows for {layers} x {inter} neurons")
        if layer.size and (layer.min() < 0 or layer.max() >= layers or neuron.min() < 0 or neuron.max() >= inter):
            raise self._damaged(path, "has layer or neuron indices out of range")
        keys = layer * inter + neuron
        if not bool((np.bincount(keys, minlength=layers * inter) == 1).all()):
            raise self._damaged(path, "does not hold every neuron exactly once")
        if count.size and (count.min() < 0 or count.max() > record.tokens):
            raise self._damaged(path, f"has counts outside [0, {record.tokens}] (the tokens counted)")
        over_zero = np.empty(layers * inter, dtype=np.int64)
        over_zero[keys] = count
        return torch.from_numpy(over_zero).view(layers, inter), record

    def _damaged(self, path: Path, what: str = "is damaged or not a neuronreg file") -> RegistryError:
        return RegistryError(f"{path} {what}.", fix="recompute", advice="Delete it and compute it again.")

    # -- selected neurons ------------------------------------------------------------------------
    def write_selection(self, model: str, masks: dict[str, NeuronMask]) -> None:
        """Replace a model's neuron files with one selection (files of other languages go), then the card."""
        for lang, mask in masks.items():
            if mask.provenance is None:
                raise MaskError(f"The {lang} mask has no provenance; the registry keeps only masks that say where "
                                "they came from.")
        tmp_paths = []
        try:
            self.model_dir(model).mkdir(parents=True, exist_ok=True)
            for lang, mask in masks.items():
                path = self.neuron_path(model, lang)
                tmp = temp_beside(path)
                tmp_paths.append((tmp, path))
                write_parquet(mask.to_table(), Path(tmp))
            # All files are written before any is renamed: a failure leaves the old selection whole.
            for tmp, path in tmp_paths:
                os.replace(tmp, path)
        except OSError as exc:
            raise RegistryError(f"Cannot write the neuron files of {model}: {exc.strerror or exc}.") from exc
        finally:
            for tmp, _ in tmp_paths:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        for lang in self.selected_languages(model):
            if lang not in masks:
                self.neuron_path(model, lang).unlink()
        self.write_card()

    def read_mask(self, model: str, lang: str) -> NeuronMask:
        path = self.neuron_path(model, lang)
        if not path.is_file():
            have = self.selected_languages(model)
            if not have:
                raise RegistryError(f"The registry at {self.root} has no neurons for {model}.", fix="compute")
            raise RegistryError(f"No {lang} neurons for {model} in {self.root} (available: {', '.join(have)}).")
        table, record = read_neuron_table(path, str(path))
        return mask_from_table(table, record, model, lang, {"registry": str(self.root)})

    def read_masks(self, model: str, langs: list[str]) -> dict[str, NeuronMask]:
        """Several languages' masks of one model, or one error naming what is there."""
        available = self.selected_languages(model)
        if not available:
            raise RegistryError(f"The registry at {self.root} has no neurons for {model}.", fix="compute")
        missing = [lang for lang in langs if lang not in available]
        if missing:
            raise RegistryError(f"No {', '.join(missing)} neurons for {model} in {self.root} (available: "
                                f"{', '.join(available)}).")
        masks = {lang: self.read_mask(model, lang) for lang in langs}
        if len({mask.shape for mask in masks.values()}) > 1:
            raise MaskError(f"The masks of {model} disagree on the model's shape; select again.", fix="select")
        return masks

    # -- the card --------------------------------------------------------------------------------
    def write_card(self) -> Path:
        return write_registry_card(self)

    # -- Parquet ---------------------------------------------------------------------------------
    def _write_table(self, path: Path, table, provenance: dict) -> None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(provenance, sort_keys=True).encode()})
        try:
            with atomic_path(path) as tmp:
                write_parquet(table, tmp)
        except OSError as exc:
            raise RegistryError(f"Cannot write {path}: {exc.strerror or exc}.", fix="registry") from exc
