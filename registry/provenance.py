"""Typed, versioned records: the provenance of counts and neuron files and where a mask came from (and,
in ``runs``, a fine-tuning run's config).

A record is a dataclass with ``to_dict`` and ``from_dict``. ``from_dict`` checks every key's type
against the field's annotation and raises :class:`RecordError` naming the file and the key
(``model.num_layers must be an integer``), so a damaged or hostile file is one clear error, never a
``KeyError`` three modules later. Top-level records carry ``schema_version`` ("major.minor"):

* a file of a newer MAJOR version is refused, naming both versions;
* keys this version does not know (a newer MINOR version's) are kept in ``extra`` and written back;
* files written before records had versions (neuronreg 0.1) are migrated on read, without loss.

Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ClassVar

from .errors import RecordError
from .limits import INT64

SCHEMA_VERSION = "1.0"
# More tokens than any corpus holds, yet small enough that the tokens of thousands of languages add up
# within int64.
MAX_TOKENS = 10**15


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tool_version() -> str:
    from . import __version__

    return __version__


def parse_version(text: object, where: str) -> tuple[int, int]:
    try:
        major, minor = str(text).split(".")
        return int(major), int(minor)
    except ValueError as exc:
        raise RecordError(f"{where}: schema_version {text!r} is not 'major.minor'.") from exc


@dataclass(kw_only=True)
class Record:
    """Base class: typed fields, strict reading, unknown keys kept in ``extra``."""

    extra: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # An optional key left at its default None is left out: files stay short and readable.
            if f.name != "extra" and not (value is None and f.default is None):
                out[f.name] = _dump(value)
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "record"):
        if not isinstance(data, dict):
            raise RecordError(f"{where}: must be a JSON object, not {type(data).__name__}.")
        hints = _hints(cls)
        values, extra = {}, {}
        for key, value in data.items():
            if key == "extra" or key not in hints:
                extra[key] = value
            else:
                values[key] = _load(hints[key], value, f"{where}: {key}")
        for f in dataclasses.fields(cls):
            if f.name not in values and f.name != "extra" and f.default is dataclasses.MISSING \
                    and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: {f.name} is missing.")
        record = cls(**values, extra=extra)
        record.check(where)
        return record

    def check(self, where: str) -> None:
        """Checks across fields, beyond types; subclasses raise RecordError."""


@dataclass(kw_only=True)
class VersionedRecord(Record):
    """A record stored on its own (a file's provenance, a run config): it carries its schema version."""

    KIND: ClassVar[str] = ""
    SCHEMA: ClassVar[str] = SCHEMA_VERSION  # the version this neuronreg writes (a kind may move on alone)
    schema_version: str = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: object, where: str = "record"):
        if isinstance(data, dict):
            if "schema_version" not in data:
                data = cls.migrate_unversioned(dict(data))
            mine, theirs = parse_version(cls.SCHEMA, where), parse_version(data.get("schema_version"), where)
            if theirs[0] > mine[0]:
                raise RecordError(f"{where} was written with {cls.KIND} schema {data['schema_version']}, newer than "
                                  f"this neuronreg reads ({cls.SCHEMA}).", fix="upgrade",
                                  advice="Upgrade neuronreg (pip install -U neuronreg).")
        return super().from_dict(data, where)

    @property
    def major(self) -> int:
        """The major version the file was written with (it decides the file's layout where one changed)."""
        return parse_version(self.schema_version, self.KIND)[0]

    @classmethod
    def migrate_unversioned(cls, data: dict) -> dict:
        """A dict written before records had versions, in this version's shape."""
        data["schema_version"] = "1.0"
        return data


# -- the records ------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class ModelInfo(Record):
    """What a model is: the one description every file and run records (built in ``models.model_info``)."""

    name: str  # registry name
    id: str | None  # Hub id, or a local folder's NAME (never its path: provenance is published)
    revision: str | None  # Hub commit, or a content fingerprint of a local folder ('local-...')
    num_layers: int
    intermediate_size: int
    hidden_size: int | None = None
    architecture: str | None = None
    mlp_layout: str = "gated"
    num_parameters: int | None = None

    def check(self, where: str) -> None:
        # Bounds far above any model, low enough that a hostile file cannot make a reader allocate much.
        for key, top in (("num_layers", 1 << 16), ("intermediate_size", 1 << 24)):
            if getattr(self, key) <= 0 or getattr(self, key) > top:
                raise RecordError(f"{where}: {key} {getattr(self, key)} is out of range.")
        if self.hidden_size is not None and not 0 < self.hidden_size <= 1 << 24:
            raise RecordError(f"{where}: hidden_size {self.hidden_size} is out of range.")

    @property
    def neurons(self) -> int:
        return self.num_layers * self.intermediate_size


@dataclass(kw_only=True)
class LanguageInfo(Record):
    code: str
    name: str | None = None
    iso639_3: str | None = None
    script: str | None = None
    flores200: str | None = None

    @classmethod
    def of(cls, language) -> LanguageInfo:
        """From a manifest :class:`~neuronreg.manifest.Language`."""
        return cls(code=language.code, name=language.name, iso639_3=language.iso639_3, script=language.script,
                   flores200=language.flores200)


@dataclass(kw_only=True)
class CorpusInfo(Record):
    """Where a language's text came from, precise enough to tell two corpora apart."""

    kind: str  # "local" or "hub"
    file: str | None = None  # a local file's NAME
    sha256: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str | None = None
    text_field: str | None = None

    def text_key(self) -> str | None:
        """One string per text: the file's hash, or the Hub dataset, config and split."""
        if self.kind == "local":
            return self.sha256
        return f"hub:{self.dataset}:{self.config}:{self.split}"

    def describe(self) -> str:
        if self.kind == "hub":
            return f"{self.dataset} ({self.config}, {self.split})"
        return f"{self.file} (sha256 {str(self.sha256)[:12]}...)"


@dataclass(kw_only=True)
class CountKey(Record):
    """What makes two counts of one language comparable: a change needs ``force``."""

    model_id: str
    revision: str | None
    corpus: CorpusInfo
    tokens_requested: int
    seq_len: int
    dtype: str
    # "bos": every row was fed after the tokenizer's BOS (not counted), as a Gemma or Llama 3 tokenizer
    # encodes text; None: rows start with their own text (files written before this key read as None).
    row_start: str | None = None

    def changed(self, other: CountKey) -> list[str]:
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


@dataclass(kw_only=True)
class FileRecord(VersionedRecord):
    """What every registry file says of itself: its kind, what made it and when, for which model and
    language."""

    kind: str
    tool: str = "neuronreg"
    version: str = field(default_factory=tool_version)
    created: str = field(default_factory=now)
    model: ModelInfo
    language: LanguageInfo

    def check(self, where: str) -> None:
        if self.kind != self.KIND:
            raise RecordError(f"{where}: kind is {self.kind!r}, not {self.KIND!r}.")


# The counts file's layout changed in 2.0 (one row per neuron in (layer, neuron) order, no layer and neuron
# columns, integer counts of the width they need, float32 means instead of float64 sums): a reader of 1.x
# cannot read it, so the major version moved, and 1.x refuses a 2.0 file naming both versions.
COUNTS_SCHEMA_VERSION = "2.0"


@dataclass(kw_only=True)
class CountsRecord(FileRecord):
    """The provenance of ``<model>/counts/<lang>.parquet``; ``schema_version`` says the file's layout (1.x:
    layer, neuron, count int64 and optional float64 sums; 2.x: see :mod:`neuronreg.store.counts`)."""

    KIND: ClassVar[str] = "counts"
    SCHEMA: ClassVar[str] = COUNTS_SCHEMA_VERSION
    schema_version: str = COUNTS_SCHEMA_VERSION
    kind: str = "counts"
    corpus: CorpusInfo
    tokens: int
    seq_len: int
    dtype: str
    settings: CountKey

    def check(self, where: str) -> None:
        super().check(where)
        if self.tokens < 0 or self.seq_len <= 0:
            raise RecordError(f"{where}: tokens must not be negative and seq_len must be positive.")
        if self.tokens > MAX_TOKENS:
            raise RecordError(f"{where}: tokens {self.tokens} is out of range.")

    @classmethod
    def migrate_unversioned(cls, data: dict) -> dict:
        return _dims_into_model(super().migrate_unversioned(data))


@dataclass(kw_only=True)
class ImportInfo(Record):
    """Where an imported mask came from (a LAPE authors' file)."""

    file: str
    sha256: str
    format: str = "lape-pt"
    index: int | None = None  # the language's position in the file


@dataclass(kw_only=True)
class SelectionInfo(Record):
    """How a selection was made: LAPE with its parameters, or imported from a file."""

    method: str  # "lape" or "imported"
    languages: list[str]
    top_rate: float | None = None
    filter_rate: float | None = None
    activation_bar_ratio: float | None = None
    filter_threshold: float | None = None
    activation_bar: float | None = None
    selected_total: int | None = None
    tie_break: str | None = None

    def check(self, where: str) -> None:
        if self.method not in ("lape", "imported"):
            raise RecordError(f"{where}: selection method {self.method!r} is neither 'lape' nor 'imported'.")
        for key in ("top_rate", "filter_rate", "activation_bar_ratio"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                raise RecordError(f"{where}: {key} {value!r} is not between 0 and 1.")


@dataclass(kw_only=True)
class MaskSource(Record):
    """Where a mask came from, in terms that may be published: what it IS (its selection, repo, revision,
    the file's name, the seed it was drawn with), never the local folder it lay in.

    ``kind``: ``registry`` (a local registry), ``repo`` (a Hub dataset repo), ``file`` (a mask file),
    ``random`` (drawn with ``seed``, ``per_layer`` neurons in each layer) or ``derived`` (computed from
    other masks, e.g. without the neurons that ``exclusive_of`` hold)."""

    KINDS: ClassVar[tuple[str, ...]] = ("registry", "repo", "file", "random", "derived")

    kind: str
    selection: str | None = None  # the selection's name in its registry or repo
    repo: str | None = None
    revision: str | None = None  # as asked for (a branch or tag)
    commit: str | None = None  # the commit the file was read at
    file: str | None = None  # a mask file's name (not its path)
    seed: int | None = None
    per_layer: list[int] | None = None
    exclusive_of: list[str] | None = None

    def check(self, where: str) -> None:
        if self.kind not in self.KINDS:
            raise RecordError(f"{where}: mask source kind {self.kind!r} is not one of {', '.join(self.KINDS)}.")

    @classmethod
    def from_dict(cls, data: object, where: str = "record"):
        if isinstance(data, dict) and "kind" not in data:
            data = cls.migrate_untyped(data)
        return super().from_dict(data, where)

    @staticmethod
    def migrate_untyped(data: dict) -> dict:
        """The untyped dicts of neuronreg <= 0.1.x ({"registry": path}, {"repo", "revision", "commit"},
        {"file"}, {"random": {...}}), without the local path they held."""
        if isinstance(data.get("random"), dict):
            random = data["random"]
            return {"kind": "random", "seed": random.get("seed"), "per_layer": random.get("per_layer")}
        kind = "repo" if data.get("repo") else "file" if data.get("file") else "registry"
        if data.get("exclusive_of"):
            kind = "derived"
        keep = {k: data[k] for k in ("selection", "repo", "revision", "commit", "file", "exclusive_of") if k in data}
        return {"kind": kind, **keep}

    def describe(self) -> str:
        """For people: 'selection top1 of acme/lape-neurons@v1.0 (commit 1a2b3c4d5e6f)', 'random (seed 0)' ..."""
        if self.kind == "random":
            return f"random neurons (seed {self.seed})"
        what = f"selection {self.selection}" if self.selection else "a mask"
        if self.kind == "repo":
            at = f"@{self.revision}" if self.revision and self.revision != "main" else ""
            commit = f" (commit {self.commit[:12]})" if self.commit else ""
            return f"{what} of {self.repo}{at}{commit}"
        if self.kind == "file":
            return f"the file {self.file}"
        if self.kind == "derived" and self.exclusive_of:
            return f"{what}, without the neurons of {', '.join(self.exclusive_of)}"
        return f"{what} of a local registry"


@dataclass(kw_only=True)
class CountSummary(Record):
    """What a selection read from one language's counts."""

    tokens: int
    corpus: CorpusInfo | None = None
    seq_len: int | None = None
    dtype: str | None = None
    revision: str | None = None
    created: str | None = None

    def check(self, where: str) -> None:
        if not 0 <= self.tokens <= MAX_TOKENS:
            raise RecordError(f"{where}: tokens {self.tokens} is out of range.")


@dataclass(kw_only=True)
class NeuronsRecord(FileRecord):
    """The provenance of ``<model>/<lang>.parquet``: one language's part of a selection."""

    KIND: ClassVar[str] = "neurons"
    kind: str = "neurons"
    selection: SelectionInfo
    num_neurons: int
    counts: dict[str, CountSummary] = field(default_factory=dict)  # every language of the selection
    imported: ImportInfo | None = None

    def check(self, where: str) -> None:
        super().check(where)
        if not 0 <= self.num_neurons <= self.model.neurons:
            raise RecordError(f"{where}: num_neurons {self.num_neurons} is out of range.")

    @property
    def own_counts(self) -> CountSummary | None:
        return self.counts.get(self.language.code)

    @classmethod
    def migrate_unversioned(cls, data: dict) -> dict:
        data = _dims_into_model(super().migrate_unversioned(data))
        selection = dict(data.get("selection") or {})
        if selection.pop("imported", False):
            selection["method"] = "imported"
        data["selection"] = selection
        for key in ("tokens", "corpus", "seq_len", "dtype"):  # the language's counts summary says these
            data.pop(key, None)
        return data


def _dims_into_model(data: dict) -> dict:
    model = dict(data.get("model") or {})
    for key in ("num_layers", "intermediate_size", "hidden_size"):
        if key in data:
            model.setdefault(key, data.pop(key))
    data["model"] = model
    return data


# -- typed reading ----------------------------------------------------------------------------------
_HINTS: dict[type, dict] = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "extra"}
    return _HINTS[cls]


def _dump(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
              dict: "an object"}


def _load(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _load(options[0], value, where)
        raise RecordError(f"{where} has an unsupported type.")  # not used by the records above
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, where)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise RecordError(f"{where} must be a list.")
        return [_load(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where} must be an object.")
        if not args:
            return dict(value)
        return {str(k): _load(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{where} must be a number.")
        try:
            return float(value)
        except OverflowError as exc:  # an integer of 400 digits
            raise RecordError(f"{where} is out of range.") from exc
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecordError(f"{where} must be an integer.")
        if not -INT64 <= value <= INT64:  # numpy and torch hold int64: 10**30 would overflow there
            raise RecordError(f"{where} is out of range.")
        return value
    if hint in (str, bool):
        if not isinstance(value, hint):
            raise RecordError(f"{where} must be {KIND_NAMES[hint]}.")
        return value
    raise RecordError(f"{where} has an unsupported type {hint!r}.")
