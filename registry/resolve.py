"""The one place where what a user typed becomes a model or a language.

Every command and every public function resolves MODEL and LANGUAGE arguments here, so whatever one
command accepted, every other command accepts and means the same thing:

* a model is a manifest alias (``mistral-nemo``), a Hub id (``facebook/opt-6.7b``), a local folder
  holding a saved ``transformers`` model, or a registry name (``facebook--opt-6.7b``, what a Hub id
  is stored as). Each resolves to a :class:`ModelRef` with one safe registry name;
* a language is any of its codes (ISO 639-1/3, FLORES-200, NTREX), its name, case-insensitive, or a
  code that a registry holds; a misspelling gets "did you mean". :func:`language` is the one door
  (the manifest itself only looks names up).

Nothing here loads weights or imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import UnknownLanguage, UnknownModel
from .files import MAX_NAME, safe_name
from .manifest import Language, Manifest, ModelEntry


@dataclass(frozen=True)
class ModelRef:
    """A model, resolved before any weights are loaded."""

    name: str  # its registry name: a manifest alias, 'org--name' for a Hub id, or a folder's name
    source: str | None  # where its weights load from: a Hub id or an absolute folder; None if unknown
    revision: str | None = None  # the manifest's pinned revision, if any
    local: bool = False
    entry: ModelEntry | None = None

    @property
    def hub_id(self) -> str | None:
        return None if self.local else self.source

    def describe(self) -> str:
        """How the model is named to the user: 'facebook/opt-6.7b (registry name facebook--opt-6.7b)'."""
        shown = Path(self.source).name if self.local and self.source else self.source
        return self.name if shown in (None, self.name) else f"{shown} (registry name {self.name})"


def registry_name(model_id: str) -> str:
    """A Hub id made into one folder and config name: 'org/Name' -> 'org--Name'."""
    return model_id.strip("/").replace("/", "--")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model(spec: str, manifest: Manifest, *, name: str | None = None, registry=None,
                  any_name: bool = False) -> ModelRef:
    """Resolve MODEL; ``registry`` (a LocalRegistry, optional) adds the names it holds.

    ``name`` overrides the registry name (``--name``). With ``any_name``, a safe name that is nothing
    else is taken as a registry name (for a registry elsewhere, such as a Hub repo).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModel("No model was named.", fix="models", advice="Give a manifest alias, a Hub id or a folder.")
    spec = spec.strip()
    try:
        ref = _resolve(spec, manifest, registry)
    except UnknownModel:
        if not any_name:
            raise
        ref = ModelRef(safe_name(spec, "Model"), None)
    if name is not None:
        ref = ModelRef(safe_name(name, "Model"), ref.source, ref.revision, ref.local, ref.entry)
    return ref


def _resolve(spec: str, manifest: Manifest, registry) -> ModelRef:
    if spec in manifest.models:
        entry = manifest.models[spec]
        return ModelRef(entry.alias, entry.hub_id, entry.revision, False, entry)
    path = Path(spec).expanduser()
    if _is_dir(path):
        if not (path / "config.json").is_file():
            raise UnknownModel(f"Folder {spec} has no config.json, so it is not a saved transformers model.",
                               advice="Point to a folder written by save_pretrained.")
        folder = path.resolve()
        return ModelRef(safe_name(registry_name(folder.name), "Model"), str(folder), None, True)
    if _looks_like_hub_id(spec):
        entry = manifest.model_for_hub_id(spec)
        if entry is not None:
            return ModelRef(entry.alias, entry.hub_id, entry.revision, False, entry)
        return ModelRef(safe_name(registry_name(spec), "Model"), spec, None, False)
    held = registry.models() if registry is not None else []
    if spec in held:
        # A folder's registry name names the folder it was computed from (the registry remembers it
        # locally); a Hub id's registry name ('org--name') names that Hub id.
        folder = registry.model_source(spec)
        if folder is not None:
            return ModelRef(spec, folder, None, True)
        org, sep, rest = spec.partition("--")
        if sep and "--" not in rest:
            hub_id = f"{org}/{rest}"
            entry = manifest.model_for_hub_id(hub_id)
            return ModelRef(spec, hub_id, entry.revision if entry else None, False, entry)
        return ModelRef(spec, None)
    org, sep, rest = spec.partition("--")
    if sep and org and rest and "--" not in rest and "/" not in spec:
        return _resolve(f"{org}/{rest}", manifest, None)
    if len(spec) > MAX_NAME:
        safe_name(spec, "Model")  # says it is too long for any registry, rather than "unknown"
    known = list(manifest.models) + list(held)
    close = difflib.get_close_matches(spec, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModel(f"Unknown model {spec!r}.{hint}", fix="models",
                       advice="Give a manifest alias (neuronreg.load_manifest().models), a Hub id like org/name, a "
                              "local folder, or a name the registry holds.")


def _is_dir(path: Path) -> bool:
    """Whether ``path`` is a folder; False for what cannot be one (a part over 255 bytes, a NUL)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def split_names(values: Iterable[str] | str | None) -> list[str]:
    """'sw,mt' and ['sw', 'mt,is'] -> ['sw', 'mt', 'is'] (order kept, blanks dropped)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


def language_code(name: str, manifest: Manifest, available: Iterable[str] = ()) -> str:
    """The canonical code of a language given by any of its codes or its name.

    A code of ``available`` (what a registry holds) is taken as it is, even where the manifest does
    not know it (a registry made with another manifest).
    """
    available = list(available)
    if name in available:
        return name
    lang = manifest.lookup(name)
    if lang is not None:
        return lang.code
    raise UnknownLanguage(f"Unknown language {name!r}.{manifest.suggest(name, available)}", fix="languages",
                          advice="neuronreg.load_manifest().languages lists them; or add it to the manifest.")


def language(name: str, manifest: Manifest, known: Iterable = ()) -> Language:
    """THE door for a language: its manifest entry, given by any of its codes or its name.

    ``known`` are the languages a registry or run holds (codes, or records with ``code``, ``name``,
    ``iso639_3``, ``script``, ``flores200`` such as :class:`~neuronreg.provenance.LanguageInfo`): one of
    them the manifest does not know is accepted as it is, so every command takes what ``show`` takes.
    """
    infos = {getattr(k, "code", k): k for k in known}
    code = language_code(name, manifest, infos)
    found = manifest.lookup(code)
    if found is not None:
        return found
    info = infos[code]

    def field(key: str) -> str | None:
        return getattr(info, key, None)

    return Language(code=code, name=field("name") or code, iso639_3=field("iso639_3") or "",
                    script=field("script") or "", flores200=field("flores200"), corpus_config="{code}")


def language_codes(names: Iterable[str] | str | None, manifest: Manifest, available: Iterable[str] = ()
                   ) -> list[str]:
    """Canonical codes of comma-separated names, each once, in the order given. ``@name`` stands for a
    language set (``@all``, ``@ntrex``, ``@seed12``, or one the manifest defines)."""
    available = list(available)
    codes = []
    for name in split_names(names):
        if name.startswith("@"):
            sets = manifest.sets()
            if name[1:] not in sets:
                raise UnknownLanguage(f"Unknown language set {name!r} (sets: "
                                      f"{', '.join('@' + s for s in sets)}).", fix="languages")
            codes.extend(sets[name[1:]])
        else:
            codes.append(language_code(name, manifest, available))
    return list(dict.fromkeys(codes))


def languages(names: Iterable[str] | str | None, manifest: Manifest, known: Iterable = ()) -> list[Language]:
    """:func:`language` for comma-separated names and sets."""
    known = list(known)
    return [language(code, manifest, known) for code in language_codes(names, manifest,
                                                                          [getattr(k, "code", k) for k in known])]
