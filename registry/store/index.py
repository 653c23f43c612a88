"""The registry's index: which selections each model has, where their files are, which is the default.

The index lives in the dataset card's YAML metadata (key ``neuronreg``), next to the ``configs`` that
``datasets`` reads. That makes the card the registry's single commit point: a new selection's files
are written into a fresh version folder no card points to yet, and one atomic rename of the card
makes the files AND the configs visible together. A reader (``datasets`` or neuronreg) sees the old
card and the old files, or the new card and the new files, never a mix (the files a card named stay
until the write after the one that replaced them).

A selection is identified by how it was made: LAPE with its rates (and the language set, when the
user chose one), or imported from a file. Its name says so: ``top1``, ``top5``, ``top5-f90-b90``,
``top1-mt-sw``, ``imported-top5``.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import RecordError, RegistryError
from ..provenance import Record, SelectionInfo, VersionedRecord

INDEX_KEY = "neuronreg"
DEFAULT_RATE = 0.95
VERSION_DIR = re.compile(r"\Av([0-9]+)\Z")


def percent(rate: float) -> str:
    """0.01 -> '1', 0.05 -> '5', 0.005 -> '0.5' (as few digits as the rate needs)."""
    return f"{rate * 100:.6g}"


def selection_name(info: SelectionInfo, explicit_languages: list[str] | None = None,
                   source_stem: str | None = None) -> str:
    """The readable name of a selection's identity."""
    if info.method == "imported":
        if info.top_rate is not None:
            return f"imported-top{percent(info.top_rate)}"
        stem = re.sub(r"[^A-Za-z0-9_.\-]", "-", source_stem or "file").strip(".-") or "file"
        return f"imported-{stem}"[:120]
    name = f"top{percent(info.top_rate)}"
    if info.filter_rate is not None and not math.isclose(info.filter_rate, DEFAULT_RATE):
        name += f"-f{percent(info.filter_rate)}"
    if info.activation_bar_ratio is not None and not math.isclose(info.activation_bar_ratio, DEFAULT_RATE):
        name += f"-b{percent(info.activation_bar_ratio)}"
    if explicit_languages:
        codes = sorted(explicit_languages)
        name += "-" + ("-".join(codes) if len(codes) <= 4 else
                       "L" + hashlib.sha256(",".join(codes).encode()).hexdigest()[:6])
    return name


@dataclass(kw_only=True)
class SelectionEntry(Record):
    """One selection of one model: where its files are and how it was made."""

    name: str
    path: str  # folder of its <lang>.parquet files, relative to the registry root, '/'-separated
    languages: list[str]  # every language with a file, including those that got no neuron
    method: str = "lape"
    top_rate: float | None = None
    filter_rate: float | None = None
    activation_bar_ratio: float | None = None
    over: list[str] | None = None  # the language set the user chose (None: every language counted)
    neurons: dict[str, int] = field(default_factory=dict)  # language -> neuron count

    def check(self, where: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", self.name) or ".." in self.name:
            raise RecordError(f"{where}: selection name {self.name!r} is not a safe name.")
        parts = self.path.split("/")
        if self.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise RecordError(f"{where}: path {self.path!r} leaves the registry.")

    def describe(self) -> str:
        if self.method == "imported":
            rate = f", top rate {self.top_rate}" if self.top_rate is not None else ""
            return f"imported{rate}"
        text = f"LAPE, top rate {self.top_rate}, filter rate {self.filter_rate}, bar ratio {self.activation_bar_ratio}"
        return text + (f", over {', '.join(self.over)}" if self.over else "")


@dataclass(kw_only=True)
class ModelSelections(Record):
    default: str
    selections: dict[str, SelectionEntry] = field(default_factory=dict)


@dataclass(kw_only=True)
class RegistryIndex(VersionedRecord):
    KIND: ClassVar[str] = "index"
    models: dict[str, ModelSelections] = field(default_factory=dict)

    def entries(self, model: str) -> list[SelectionEntry]:
        """The model's selections, the default first."""
        found = self.models.get(model)
        if found is None:
            return []
        return sorted(found.selections.values(), key=lambda e: (e.name != found.default, e.name))

    def default(self, model: str) -> SelectionEntry | None:
        found = self.models.get(model)
        return found.selections.get(found.default) if found else None

    def configs(self) -> dict[str, tuple[str, str | None]]:
        """The ``datasets`` config names the card gives: ``<model>`` (its default selection, ``None`` here)
        and ``<model>-<selection>``, each mapped to its (model, selection). Where an older registry holds
        two of one name, the first in order is kept (:meth:`duplicate_config` names them)."""
        found: dict[str, tuple[str, str | None]] = {}
        for config, owner in self._all_configs():
            found.setdefault(config, owner)
        return found

    def duplicate_config(self, models: list[str] | None = None) -> str | None:
        """Why two configs of ``models`` (default: all) share one name (a registry of an older neuronreg),
        or None."""
        found: dict[str, tuple[str, str | None]] = {}
        for config, owner in self._all_configs(models):
            if config in found:
                return (f"Two configs are named {config!r}: those of {describe_config(*found[config])} and of "
                        f"{describe_config(*owner)} (datasets could load only one of them).")
            found[config] = owner
        return None

    def _all_configs(self, models: list[str] | None = None):
        for model in sorted(self.models if models is None else models):
            yield model, (model, None)
            for entry in self.entries(model):
                yield config_name(model, entry.name), (model, entry.name)

    def config_clash(self, model: str, selection: str | None) -> str | None:
        """Why adding ``selection`` to ``model`` (None: the model alone) would give a config the name of
        another one, or None."""
        taken = self.configs()
        for mine in [(model, None)] + ([(model, selection)] if selection is not None else []):
            config = config_name(*mine)
            theirs = taken.get(config)
            if theirs is not None and theirs != mine:
                return (f"The config name {config!r} is taken: it is the config of {describe_config(*theirs)}, and "
                        f"would also be that of {describe_config(*mine)} (datasets could load only one of them).")
        return None

    def with_selection(self, model: str, entry: SelectionEntry, make_default: bool = False) -> RegistryIndex:
        """A new index with ``entry`` added or replacing the selection of the same name."""
        models = dict(self.models)
        current = models.get(model)
        selections = dict(current.selections) if current else {}
        selections[entry.name] = entry
        default = entry.name if make_default or current is None or current.default not in selections \
            else current.default
        models[model] = ModelSelections(default=default, selections=selections)
        return RegistryIndex(models=models, extra=dict(self.extra))


@dataclass(frozen=True)
class SelectionRef:
    """Which of a model's selections: by ``name``, by ``top_rate``, or (neither) the model's default.

    The one spelling of a selection everywhere (``--selection``, ``--top-rate``, ``overlap --against``,
    ``selection=`` in Python): :meth:`of` takes a SelectionRef, a name (``"top5-mt-sw"``), a rate as a number
    or as text (``0.05``, ``"0.05"``, ``"5%"``) or None."""

    name: str | None = None
    top_rate: float | None = None

    @classmethod
    def of(cls, selection: SelectionRef | str | float | None = None, top_rate: float | None = None) -> SelectionRef:
        if isinstance(selection, SelectionRef):
            ref = selection
        elif isinstance(selection, bool):
            raise RegistryError(f"A selection is a name or a top rate, not {selection!r}.", fix="selection")
        elif isinstance(selection, (int, float)):
            ref = cls(top_rate=float(selection))
        elif isinstance(selection, str) and selection.strip():
            ref = cls.parse(selection.strip())
        else:
            ref = cls()
        if top_rate is not None:
            if ref.name is not None or ref.top_rate is not None:
                raise RegistryError("Give a selection by name or by top rate, not both.", fix="selection")
            ref = cls(top_rate=float(top_rate))
        if ref.top_rate is not None and not (math.isfinite(ref.top_rate) and 0 < ref.top_rate <= 1):
            raise RegistryError(f"A top rate is a number in (0, 1], not {ref.top_rate!r}.", fix="selection")
        return ref

    @classmethod
    def parse(cls, text: str) -> SelectionRef:
        """``"0.05"`` or ``"5%"``: a top rate; anything else: a name."""
        number = text[:-1] if text.endswith("%") else text
        try:
            value = float(number)
        except ValueError:
            return cls(name=text)
        return cls(top_rate=value / 100 if text.endswith("%") else value)

    @property
    def is_default(self) -> bool:
        return self.name is None and self.top_rate is None

    def expected_name(self) -> str | None:
        """The name the selection most likely has (a plain LAPE selection of a rate is ``top<percent>``)."""
        return self.name if self.name is not None else (f"top{percent(self.top_rate)}" if self.top_rate else None)


# Whatever names a selection: a SelectionRef, a name, a top rate, or None (the model's default).
Which = SelectionRef | str | float | None


def config_name(model: str, selection: str | None) -> str:
    """The ``datasets`` config of a model's selection (``None``: its default)."""
    return model if selection is None else f"{model}-{selection}"


def describe_config(model: str, selection: str | None) -> str:
    return f"model {model}" if selection is None else f"selection {selection} of model {model}"


def find_selection(index: RegistryIndex, model: str, selection: Which = None,
                   top_rate: float | None = None, where: str = "the registry") -> SelectionEntry:
    """The selection a user asked for: by name, by top rate, or the model's default."""
    ref = SelectionRef.of(selection, top_rate)
    selection, top_rate = ref.name, ref.top_rate
    entries = index.entries(model)
    if not entries:
        if index.models:
            raise RegistryError(f"{where} has no model {model} (available: {', '.join(sorted(index.models))}).",
                                fix="compute")
        raise RegistryError(f"{where} has no neurons for {model}.", fix="compute")
    names = ", ".join(e.name + (" (default)" if e.name == index.models[model].default else "") for e in entries)
    if selection is not None:
        for entry in entries:
            if entry.name == selection:
                return entry
        raise RegistryError(f"{model} has no selection {selection!r} in {where} (available: {names}).",
                            fix="selection")
    if top_rate is None:
        return index.default(model)
    matches = [e for e in entries if e.top_rate is not None and math.isclose(e.top_rate, top_rate)]
    plain = [e for e in matches if e.method == "lape" and not e.over and e.name == f"top{percent(top_rate)}"]
    if len(plain) == 1 or len(matches) == 1:
        return (plain or matches)[0]
    if not matches:
        raise RegistryError(f"{model} has no selection with top rate {top_rate} in {where} (available: {names}).",
                            fix="selection")
    raise RegistryError(f"{model} has several selections with top rate {top_rate} in {where} "
                        f"({', '.join(e.name for e in matches)}).", fix="selection_name")
