"""The local registry: a folder of Parquet files that is also a valid ``datasets`` repository.

Layout::

    <registry>/README.md                              dataset card: `configs:` for datasets, and the index
    <registry>/<model>/<selection>/v<N>/<lang>.parquet one version of one selection's neuron files
    <registry>/<model>/counts/<lang>.parquet          raw counts of every neuron
    <registry>/<model>/.partial/<lang>.safetensors    checkpoint of a count in progress
    <registry>/<model>/.lock, <registry>/.lock        who is writing (see ``locks``)

Every Parquet file carries its provenance (a typed record, :mod:`neuronreg.provenance`) as JSON in its
schema metadata under the key ``neuronreg``. Guarantees:

* A selection (its files AND the card) becomes visible all at once or not at all: its files go into
  a new version folder, and the card, rewritten by one atomic rename, is the single commit point
  (:mod:`.index`). A failure before that rename removes the new folder: the registry is left byte
  for byte as it was. The version a write replaces stays until the model's next write (a ``datasets``
  reader that read the old card opens its files after); older versions, and the leftovers of a
  killed run, go on the next write.
* ``datasets`` config names (``<model>``, ``<model>-<selection>``) are unique: a write that would give
  two configs one name is refused.
* Counts files (:mod:`.counts`: the layout, and why) are replaced one at a time by an atomic rename,
  and read back validated: every neuron exactly once, integer counts between 0 and the tokens
  counted, and the optional float32 mean activations (files made before neuronreg recorded them
  have none) finite, the positive means >= 0 and 0 wherever the count is 0. Files of an older
  layout are read as they are and rewritten in the current one by the next ``select``.
* Writers take the model's lock (and the registry's, for the card), so two never interleave.
* Registries of neuronreg 0.1 (``<model>/<lang>.parquet``, no index) are read as they are and
  migrated on the next write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import MaskError, RecordError, RegistryError
from ..files import SAFE_NAME, TEMP_SUFFIX, atomic_write_text, inside, safe_name, write_parquet
from ..limits import BeyondLimits, load_json, load_yaml
from ..mask import NeuronMask, mask_from_table, read_neuron_table
from ..provenance import CountsRecord, MaskSource
from . import counts as counts_file
from .index import INDEX_KEY, VERSION_DIR, RegistryIndex, SelectionEntry, Which, find_selection, selection_name
from .location import default_registry
from .locks import lock

log = logging.getLogger("neuronreg")

CARD = "README.md"
COUNTS = "counts"
# Names a model cannot take: they are the registry's own files, or would hide from listings.
RESERVED = {CARD.lower(), COUNTS, ".partial", ".git", ".gitattributes", ".cache", ".lock", "counts.parquet"}
LOCK_WAIT = 60.0  # seconds a writer waits for the registry's card (commits take well under a second)
# A superseded version folder stays this long after the write that replaced it (and the version the last write
# replaced stays until the next write): a `datasets` reader that read the old card reads its files within it.
SUPERSEDED_GRACE = 600.0


@dataclass
class ActivationMeans:
    """One language's mean activation of every neuron, from its counts file: float64 ``[L, I]`` tensors
    holding the float32 means the file stores (:mod:`.counts`)."""

    model: str
    language: str
    over_zero: object  # torch int64 [layers, intermediate]
    tokens: int
    mean: object  # over every counted position: activation_sum / tokens
    positive_mean: object  # over the positions where it was > 0: positive_sum / count (0 where it never was)
    record: CountsRecord


def model_name(name: str) -> str:
    name = safe_name(name, "Model")
    if name.lower() in RESERVED:
        raise RegistryError(f"Model name {name!r} is reserved for the registry's own files; choose another.",
                            fix="name")
    return name


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove those of ``folders`` that are empty, the deepest first (rmdir leaves any other alone)."""
    for path in reversed(folders):
        try:
            path.rmdir()
        except OSError:
            pass


def read_card_metadata(text: str, where: str) -> dict:
    """The YAML metadata block of a card ({} when there is none)."""
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = load_yaml(text[3:end])
    except BeyondLimits as exc:
        raise RegistryError(f"The card {where} has YAML metadata that neuronreg does not read: {exc}.",
                            fix="recompute") from exc
    except yaml.YAMLError as exc:
        raise RegistryError(f"The card {where} has YAML metadata that cannot be read ({type(exc).__name__}).",
                            fix="recompute") from exc
    return data if isinstance(data, dict) else {}


class LocalRegistry:
    def __init__(self, root: str | os.PathLike | None = None, *, index: RegistryIndex | None = None):
        self.root = Path(root).expanduser() if root else default_registry()
        self._fixed = index  # a view of a proposed index (used while rendering the next card)
        self._cache: tuple | None = None

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        return self.root / model_name(model)

    def counts_path(self, model: str, lang: str) -> Path:
        return self.model_dir(model) / COUNTS / f"{safe_name(lang, 'Language')}.parquet"

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

    # -- locks -----------------------------------------------------------------------------------
    @contextmanager
    def model_lock(self, model: str, command: str | None = None, timeout: float = 0.0):
        """Held while a model's counts or selections are written (a whole ``compute``).

        The folders the lock's holder created (the registry's, the model's, its checkpoints' and counts')
        go again when it leaves them empty: a failed ``compute`` of a new model leaves nothing behind.
        What holds a file (a checkpoint to resume from) stays."""
        folder = self.model_dir(model)
        new = [p for p in (self.root, folder) if not p.exists()]
        inner = [p for p in (folder / ".partial", folder / COUNTS) if not p.exists()]
        self.ensure_writable()
        try:
            with lock(folder / ".lock", f"{model} in {self.root}", timeout=timeout, command=command):
                try:
                    yield
                finally:
                    _remove_if_empty(inner)  # while the lock is held: no other writer is filling them
        finally:
            _remove_if_empty(new)  # they held the lock file; a writer that takes it next makes them again

    @contextmanager
    def _card_lock(self):
        with lock(self.root / ".lock", f"the registry {self.root}", timeout=LOCK_WAIT):
            yield

    # -- the index (from the card) ---------------------------------------------------------------
    @property
    def card_path(self) -> Path:
        return self.root / CARD

    def index(self) -> RegistryIndex:
        """What the card says the registry holds, or (a registry of neuronreg 0.1, or one whose card
        was lost) what its folders hold."""
        if self._fixed is not None:
            return self._fixed
        try:
            stat = self.card_path.stat()
            key = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            key = None
        if self._cache is not None and self._cache[0] == key and key is not None:
            return self._cache[1]
        index = self._read_index() if key is not None else None
        if index is None:
            index = self._scan()
        self._cache = (key, index)
        return index

    def _read_index(self) -> RegistryIndex | None:
        try:
            text = self.card_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"The card {self.card_path} cannot be read ({exc}).", fix="recompute") from exc
        raw = read_card_metadata(text, str(self.card_path)).get(INDEX_KEY)
        if raw is None:
            return None
        return RegistryIndex.from_dict(raw, f"the index in {self.card_path}")

    def _scan(self) -> RegistryIndex:
        """An index from the folders alone: 0.1's ``<model>/<lang>.parquet``, or the newest version of
        each selection folder."""
        index = RegistryIndex()
        if not self.root.is_dir():
            return index
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and self._is_model_dir(p)):
            found = []
            if self._files(folder):
                found.append(self._scanned_entry(folder.name, folder))
            for sel in sorted(p for p in folder.iterdir() if p.is_dir() and SAFE_NAME.fullmatch(p.name)
                              and p.name != COUNTS):
                versions = sorted((int(m.group(1)), v) for v in sel.iterdir() if (m := VERSION_DIR.fullmatch(v.name)))
                if versions and self._files(versions[-1][1]):
                    found.append(self._scanned_entry(folder.name, versions[-1][1], sel.name))
            for position, entry in enumerate(e for e in found if e is not None):
                index = index.with_selection(folder.name, entry, make_default=position == 0)
        return index

    def _scanned_entry(self, model: str, folder: Path, name: str | None = None) -> SelectionEntry | None:
        files = self._files(folder)
        try:
            record = read_neuron_table(files[0], str(files[0]))[1]
        except (MaskError, RecordError) as exc:
            log.warning("Skipping %s: %s", folder, exc)
            return None
        info = record.selection
        over = None if set(info.languages) == {f.stem for f in files} else None
        return SelectionEntry(
            name=name or selection_name(info, over, record.imported.file if record.imported else None),
            path=folder.relative_to(self.root).as_posix(), languages=[f.stem for f in files], method=info.method,
            top_rate=info.top_rate, filter_rate=info.filter_rate, activation_bar_ratio=info.activation_bar_ratio,
            over=over)

    def _is_model_dir(self, folder: Path) -> bool:
        return (not folder.is_symlink() and SAFE_NAME.fullmatch(folder.name) is not None
                and folder.name.lower() not in RESERVED)

    @staticmethod
    def _files(folder: Path) -> list[Path]:
        """Regular Parquet files named like a language (no links, no temporaries)."""
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("*.parquet")
                      if p.is_file() and not p.is_symlink() and SAFE_NAME.fullmatch(p.stem))

    # -- listing ---------------------------------------------------------------------------------
    def models(self) -> list[str]:
        counted = []
        if self.root.is_dir():
            counted = [p.name for p in self.root.iterdir()
                       if p.is_dir() and self._is_model_dir(p) and self._files(p / COUNTS)]
        return sorted(set(counted) | set(self.index().models))

    def counted_languages(self, model: str) -> list[str]:
        return [p.stem for p in self._files(self.model_dir(model) / COUNTS)]

    def selections(self, model: str) -> list[SelectionEntry]:
        """The model's selections, its default first."""
        return self.index().entries(model)

    def selection(self, model: str, selection: Which = None, top_rate: float | None = None) -> SelectionEntry:
        """The selection asked for by name or top rate, or the model's default; RegistryError listing
        the selections there are."""
        return find_selection(self.index(), model, selection, top_rate, where=str(self.root))

    def default_selection(self, model: str) -> SelectionEntry | None:
        return self.index().default(model)

    def selected_languages(self, model: str, selection: Which = None, top_rate: float | None = None
                           ) -> list[str]:
        """The languages of a selection (default: the model's default one); [] when the model has none."""
        if not self.index().entries(model):
            return []
        return list(self.selection(model, selection, top_rate).languages)

    def neuron_path(self, model: str, lang: str, selection: Which = None, top_rate: float | None = None
                    ) -> Path:
        entry = self.selection(model, selection, top_rate)
        path = self.root / entry.path / f"{safe_name(lang, 'Language')}.parquet"
        if not inside(self.root, path.parent):
            raise RegistryError(f"The index points {model}/{entry.name} outside the registry.", fix="recompute")
        return path

    # -- counts (the file's layout: .counts) ------------------------------------------------------
    def write_counts(self, model: str, lang: str, over_zero, record: CountsRecord, *, activation_sum=None,
                     positive_sum=None) -> Path:
        """Write ``<model>/counts/<lang>.parquet``: the counts and, when given, the float32 means of the float64
        activation sums (``activation_sum`` over every counted position, ``positive_sum`` over the positive
        ones). What could not be read back (a shape other than the record's, counts outside [0, tokens],
        sums that are not finite) is refused and nothing is written."""
        import numpy as np

        counts = counts_file.as_numpy(over_zero, np.int64)
        if (activation_sum is None) != (positive_sum is None):
            raise RegistryError(f"Counts of {lang} for {model}: give both activation sums or neither.")
        sums = None
        if activation_sum is not None:
            sums = [counts_file.as_numpy(value, np.float64) for value in (activation_sum, positive_sum)]
            problem = counts_file.sums_problem(counts, *sums)
            if problem:
                raise RegistryError(f"The activation sums of {lang} for {model} {problem}; nothing was written.")
        shape = (record.model.num_layers, record.model.intermediate_size)
        if counts.shape != shape:
            raise RegistryError(f"The counts of {lang} for {model} are {counts.shape[0]} x {counts.shape[-1]}, its "
                                f"record says {shape[0]} x {shape[1]}; nothing was written.")
        if counts.size and (counts.min() < 0 or counts.max() > record.tokens):
            raise RegistryError(f"The counts of {lang} for {model} are outside [0, {record.tokens}] (the tokens "
                                "counted); nothing was written.")
        means = counts_file.means_from_sums(counts, record.tokens, *sums) if sums else None
        path = self.counts_path(model, lang)
        counts_file.write_table(counts_file.counts_table(counts, record, means), path)
        return path

    def read_counts_record(self, model: str, lang: str) -> CountsRecord:
        return counts_file.read_record(self.counts_path(model, lang))

    def read_count_array(self, model: str, lang: str) -> counts_file.CountsData:
        """The counts alone (the one column ``select`` needs), flat in (layer, neuron) order in the file's
        integer width (a read-only array), validated; no other column is read."""
        return counts_file.read(self._existing_counts(model, lang))

    def read_counts(self, model: str, lang: str):
        """``over_zero [layers, intermediate]`` (torch int64) and the record, validated: every neuron
        exactly once, counts between 0 and the tokens counted."""
        import numpy as np
        import torch

        data = self.read_count_array(model, lang)
        return torch.from_numpy(np.array(data.count, dtype=np.int64)).view(data.shape), data.record

    def read_activation_means(self, model: str, lang: str) -> ActivationMeans:
        """The mean activation of every neuron on ``lang``'s text, over all counted positions and over
        the positive ones, from the counts file.

        Counts files written before neuronreg recorded them have none: RegistryError with
        ``fix="recount"`` (count the language again, ``force=True``).
        """
        import numpy as np
        import torch

        data = counts_file.read(self._existing_counts(model, lang), means=True)
        if data.means is None:
            raise RegistryError(
                f"The counts of {lang} for {model} in {self.root} hold no mean activations (they were made by an "
                "older neuronreg).", fix="recount",
                advice="Count the language again with force=True (neuronreg.lape.compute.compute).")

        def tensor(values, dtype):  # a copy: the arrays read are Arrow's, and read-only
            return torch.from_numpy(np.array(values, dtype=dtype)).view(data.shape)

        return ActivationMeans(model=model, language=lang, over_zero=tensor(data.count, np.int64),
                               tokens=data.record.tokens, mean=tensor(data.means[counts_file.MEAN], np.float64),
                               positive_mean=tensor(data.means[counts_file.POSITIVE_MEAN], np.float64),
                               record=data.record)

    def check_counts(self, model: str, lang: str) -> None:
        """Read every column of a counts file and validate it (what ``publish`` does before sending it)."""
        counts_file.read(self._existing_counts(model, lang), means=True)

    def migrate_counts(self, model: str) -> list[tuple[str, int, int]]:
        """Rewrite the model's counts files of an older layout in the current one (the caller holds the
        model's lock); ``(language, bytes before, bytes after)`` of each file rewritten."""
        done = []
        for lang in self.counted_languages(model):
            sizes = counts_file.migrate(self.counts_path(model, lang))
            if sizes is not None:
                done.append((lang, *sizes))
        if done:
            log.info("Rewrote %d counts file(s) of %s in the current layout (%.1f MiB before, %.1f MiB after).",
                     len(done), model, sum(d[1] for d in done) / 2**20, sum(d[2] for d in done) / 2**20)
        return done

    def _existing_counts(self, model: str, lang: str) -> Path:
        path = self.counts_path(model, lang)
        if not path.is_file():
            raise RegistryError(f"No counts for {lang} of {model} in {self.root}.", fix="compute")
        return path

    # -- where a local model's weights are (kept here, never published) -----------------------------
    SOURCE_FILE = ".source.json"

    def remember_source(self, model: str, folder: str) -> None:
        """Note which local folder ``model`` was computed from, so its registry name can stand for it."""
        atomic_write_text(self.model_dir(model) / self.SOURCE_FILE, json.dumps({"path": str(folder)}) + "\n")

    def model_source(self, model: str) -> str | None:
        """The local folder ``model`` was computed from, while it still exists."""
        try:
            path = load_json((self.model_dir(model) / self.SOURCE_FILE).read_text(encoding="utf-8"))["path"]
        except (OSError, ValueError, KeyError, TypeError, RegistryError):
            return None
        return path if isinstance(path, str) and (Path(path) / "config.json").is_file() else None

    # -- selections ------------------------------------------------------------------------------
    def read_mask(self, model: str, lang: str, selection: Which = None, top_rate: float | None = None
                  ) -> NeuronMask:
        entry = self.selection(model, selection, top_rate)
        if lang not in entry.languages:
            raise RegistryError(f"No {lang} neurons for {model} ({entry.name}) in {self.root} (available: "
                                f"{', '.join(entry.languages)}).")
        path = self.neuron_path(model, lang, entry.name)
        table, record = read_neuron_table(path, str(path))
        return mask_from_table(table, record, model, lang, MaskSource(kind="registry", selection=entry.name),
                               str(path), location=self.root)

    def read_masks(self, model: str, langs: list[str], selection: Which = None,
                   top_rate: float | None = None) -> dict[str, NeuronMask]:
        """Several languages' masks of one selection, or one error naming what is there."""
        entry = self.selection(model, selection, top_rate)
        missing = [lang for lang in langs if lang not in entry.languages]
        if missing:
            raise RegistryError(f"No {', '.join(missing)} neurons for {model} ({entry.name}) in {self.root} "
                                f"(available: {', '.join(entry.languages)}).")
        masks = {lang: self.read_mask(model, lang, entry.name) for lang in langs}
        if len({mask.shape for mask in masks.values()}) > 1:
            raise MaskError(f"The masks of {model} ({entry.name}) disagree on the model's shape.", fix="select")
        return masks

    def write_selection(self, model: str, masks: dict[str, NeuronMask], *, over: list[str] | None = None,
                        default: bool = False, name: str | None = None) -> SelectionEntry:
        """Add one selection of ``model`` (or replace the one of the same identity), all at once.

        The masks' provenance says how they were made; ``over`` is the language set the user chose
        (None: every language counted); ``default`` makes it the model's default selection.
        """
        if not masks:
            raise MaskError(f"No masks to store for {model}.")
        for lang, mask in masks.items():
            safe_name(lang, "Language")
            if mask.provenance is None:
                raise MaskError(f"The {lang} mask has no provenance; the registry keeps only masks that say where "
                                "they came from.")
        first = next(iter(masks.values())).provenance
        name = safe_name(name or selection_name(first.selection, over,
                                                first.imported.file.rsplit(".", 1)[0] if first.imported else None),
                         "Selection")
        with self._card_lock():
            old = self.index()
            same = self._unchanged(model, name, masks, default)
            if same is not None:  # selecting again what is there: nothing to write, nothing to publish
                return same
            self.check_config_names(model, name)
            folder = self._next_version(model, name)
            try:
                folder.mkdir(parents=True)
                for lang, mask in masks.items():
                    write_parquet(mask.to_table(), folder / f"{lang}.parquet")
                entry = SelectionEntry(
                    name=name, path=folder.relative_to(self.root).as_posix(), languages=sorted(masks),
                    method=first.selection.method, top_rate=first.selection.top_rate,
                    filter_rate=first.selection.filter_rate,
                    activation_bar_ratio=first.selection.activation_bar_ratio, over=sorted(over) if over else None,
                    neurons={lang: len(mask) for lang, mask in sorted(masks.items())})
                new = old.with_selection(model, entry, make_default=default)
                self._commit(new)  # the one rename that makes the selection visible
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                self._cache = None
                raise
            # The version this write replaced stays (and any replaced within the grace period): a reader that
            # read the old card (datasets reads the card, then the files it names) still finds its files.
            self._collect(model, new, keep=[self.root / e.path for e in old.entries(model)
                                            if e.name == name and VERSION_DIR.fullmatch(e.path.rsplit("/", 1)[-1])])
        return entry

    def check_config_names(self, model: str, selection: str | None) -> None:
        """RegistryError when ``model``'s selection ``selection`` would share its ``datasets`` config name with
        another model or selection (model ``tiny-top1`` and model ``tiny``'s selection ``top1``)."""
        clash = self.index().config_clash(model, selection)
        if clash:
            raise RegistryError(clash, fix="config_name",
                                advice="Store the model under another name (name=...); its configs are the name and "
                                       "name-selection.")

    def _unchanged(self, model: str, name: str, masks: dict[str, NeuronMask], default: bool) -> SelectionEntry | None:
        """The stored selection ``name`` when it holds exactly ``masks`` (the same neurons, scores and
        provenance but for creation times), else None."""
        index = self.index()
        entry = next((e for e in index.entries(model) if e.name == name), None)
        if entry is None or sorted(entry.languages) != sorted(masks) or (default and index.models[model].default
                                                                         != name):
            return None
        if not VERSION_DIR.fullmatch(entry.path.rsplit("/", 1)[-1]):
            return None  # neuronreg 0.1's layout: written again, in the current one

        def content(mask: NeuronMask):
            record = mask.provenance.to_dict()
            record.pop("created", None)
            for counts in record.get("counts", {}).values():
                counts.pop("created", None)
            return (mask, None if mask.entropy is None else mask.entropy.tolist(),
                    None if mask.activation_prob is None else mask.activation_prob.tolist(), record)

        try:
            stored = {lang: self.read_mask(model, lang, name) for lang in masks}
        except (MaskError, RecordError, RegistryError):
            return None
        return entry if all(content(stored[lang]) == content(mask) for lang, mask in masks.items()) else None

    def set_default(self, model: str, selection: str) -> SelectionEntry:
        with self._card_lock():
            old = self.index()
            entry = find_selection(old, model, selection, where=str(self.root))
            self._commit(old.with_selection(model, entry, make_default=True))
        return entry

    def write_card(self) -> Path:
        """Write the card again from the index (after a manual repair, say)."""
        with self._card_lock():
            self._commit(self.index())
        return self.card_path

    def _next_version(self, model: str, name: str) -> Path:
        folder = self.model_dir(model) / name
        taken = [int(m.group(1)) for p in (folder.iterdir() if folder.is_dir() else [])
                 if (m := VERSION_DIR.fullmatch(p.name))]
        return folder / f"v{max(taken, default=0) + 1}"

    def _commit(self, index: RegistryIndex) -> None:
        from .cards import registry_card

        text = registry_card(LocalRegistry(self.root, index=index), index)
        try:
            atomic_write_text(self.card_path, text)
        except OSError as exc:
            raise RegistryError(f"Cannot write {self.card_path}: {exc.strerror or exc}.", fix="registry") from exc
        self._cache = None

    def _collect(self, model: str, index: RegistryIndex, keep: list[Path] = ()) -> None:
        """After a commit: remove what no card points to any more (versions superseded by an earlier write,
        0.1's files, leftovers of a killed run), but the folders in ``keep``. A failure here costs disk
        space, never consistency."""
        current = {self.root / entry.path for entry in index.entries(model)}
        keep = current | set(keep)
        folder = self.model_dir(model)
        try:
            for path in self._files(folder):  # 0.1's <model>/<lang>.parquet
                if folder not in keep:
                    path.unlink()
            for sel in [p for p in folder.iterdir() if p.is_dir() and p.name not in (COUNTS, ".partial")]:
                versions = sorted((int(VERSION_DIR.fullmatch(v.name).group(1)), v) for v in sel.iterdir()
                                  if VERSION_DIR.fullmatch(v.name))
                shown = max((number for number, v in versions if v in current), default=None)
                for position, (number, version) in enumerate(versions):
                    if version in keep:
                        continue
                    # A version no card ever named (newer than the current one: a killed write's) goes now; a
                    # superseded one once the version that replaced it is older than the grace period.
                    after = versions[position + 1][1] if position + 1 < len(versions) else None
                    superseded_long_ago = after is not None and time.time() - after.stat().st_mtime > \
                        SUPERSEDED_GRACE
                    if shown is None or number > shown or superseded_long_ago:
                        shutil.rmtree(version)
                if not any(sel.iterdir()):
                    sel.rmdir()
            for tmp in list(self.root.glob(f".*{TEMP_SUFFIX}")) + list(folder.glob(f".*{TEMP_SUFFIX}")):
                if tmp.is_file():
                    tmp.unlink()
        except OSError as exc:
            log.warning("Could not remove old files of %s (%s); they are unused and go on the next write.", model, exc)
