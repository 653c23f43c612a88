"""The catalogue of model aliases and languages (``manifest.json``), validated on load."""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import ManifestError, UnknownLanguage

MANIFEST_ENV = "NEURONREG_MANIFEST"
# A language code becomes a `datasets` split name, which must match this.
SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")
SCRIPT = re.compile(r"^[A-Z][a-z]{3}$")
FLORES = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")


@dataclass(frozen=True)
class ModelEntry:
    alias: str
    hub_id: str
    revision: str | None
    num_layers: int
    hidden_size: int
    intermediate_size: int
    license: str | None = None
    num_parameters: int | None = None
    mlp_layout: str = "gated"


@dataclass(frozen=True)
class Language:
    code: str
    name: str
    iso639_3: str
    script: str
    flores200: str | None
    corpus_config: str
    aliases: tuple[str, ...] = ()
    variant_of: str | None = None
    ntrex: str | None = None

    def keys(self) -> list[str]:
        """Every name this language may be given by, most specific first."""
        keys = [self.code, self.iso639_3, *(self.aliases), self.name]
        if self.flores200:
            keys.append(self.flores200)
        if self.ntrex:
            keys.append(self.ntrex)
        return keys


@dataclass(frozen=True)
class Manifest:
    path: Path
    registry_repo: str
    default_corpus: dict
    models: dict[str, ModelEntry]
    languages: tuple[Language, ...]
    _index: dict[str, list[Language]] = field(default_factory=dict, repr=False, compare=False)

    def language(self, name: str) -> Language:
        """Resolve a language given by any of its codes or its name (case-insensitive)."""
        found = self._index.get(_norm(name), [])
        if len(found) == 1:
            return found[0]
        if found:
            # Regional variants share their ISO 639-3 code with the base language: prefer the base.
            base = [lang for lang in found if lang.variant_of is None and "_" not in lang.code]
            if len(base) == 1:
                return base[0]
            codes = ", ".join(lang.code for lang in found)
            raise UnknownLanguage(f"Language {name!r} is ambiguous: it may be {codes}. Use one of those codes.")
        close = difflib.get_close_matches(_norm(name), list(self._index), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(self._index[c][0].code for c in close)}?" if close else ""
        raise UnknownLanguage(
            f"Unknown language {name!r}.{hint} Run 'neuronreg languages' to list them, or add it to the manifest."
        )

    def model_for_hub_id(self, hub_id: str) -> ModelEntry | None:
        for entry in self.models.values():
            if entry.hub_id.lower() == hub_id.lower():
                return entry
        return None


def _norm(key: str) -> str:
    return key.strip().lower().replace("-", "_")


def default_manifest_path() -> Path:
    return Path(__file__).with_name("manifest.json")


def manifest_path(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit)
    if os.environ.get(MANIFEST_ENV):
        return Path(os.environ[MANIFEST_ENV])
    return default_manifest_path()


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Load and validate a manifest (the packaged one unless a path or $NEURONREG_MANIFEST is given)."""
    return _load(str(manifest_path(path).resolve()))


@lru_cache(maxsize=8)
def _load(path: str) -> Manifest:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"Manifest {path} does not exist. Check --manifest or ${MANIFEST_ENV}.") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"Manifest {path} is not valid JSON ({exc}). Fix the file.") from None
    return _validate(raw, Path(path))


def _bad(path: Path, key: str, what: str) -> ManifestError:
    return ManifestError(f"Manifest {path}: {key} {what}. Fix that entry.")


def _require(entry: dict, key: str, kind: type, path: Path, where: str, optional: bool = False):
    value = entry.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise _bad(path, f"{where}.{key}", f"must be {'a string' if kind is str else 'an integer' if kind is int else kind.__name__}")
    if kind is str and not value.strip():
        raise _bad(path, f"{where}.{key}", "must not be empty")
    if kind is int and value <= 0:
        raise _bad(path, f"{where}.{key}", "must be positive")
    return value


def _layout(value: object, path: Path, where: str) -> str:
    from .summary import WEIGHTS_PER_NEURON

    if value not in WEIGHTS_PER_NEURON:
        raise _bad(path, f"{where}.mlp_layout", f"must be one of {', '.join(WEIGHTS_PER_NEURON)}")
    return value


def _validate(raw: object, path: Path) -> Manifest:
    if not isinstance(raw, dict):
        raise _bad(path, "the top level", "must be a JSON object")
    known = {"manifest_version", "registry_repo", "default_corpus", "models", "languages"}
    for key in raw:
        if key not in known:
            raise _bad(path, repr(key), f"is not a manifest key (known: {', '.join(sorted(known))})")
    registry_repo = _require(raw, "registry_repo", str, path, "manifest")
    corpus = raw.get("default_corpus")
    if not isinstance(corpus, dict) or not isinstance(corpus.get("dataset"), str):
        raise _bad(path, "default_corpus.dataset", "must be a Hub dataset id")
    models_raw = raw.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise _bad(path, "models", "must be a non-empty object of alias -> model")
    models = {}
    for alias, entry in models_raw.items():
        where = f"models.{alias}"
        if not isinstance(entry, dict):
            raise _bad(path, where, "must be an object")
        if not SPLIT_NAME.match(alias.replace("-", "_")) or "/" in alias:
            raise _bad(path, where, "is not a valid alias (letters, digits, '-', '_', '.')")
        models[alias] = ModelEntry(
            alias=alias,
            hub_id=_require(entry, "hub_id", str, path, where),
            revision=_require(entry, "revision", str, path, where, optional=True),
            num_layers=_require(entry, "num_layers", int, path, where),
            hidden_size=_require(entry, "hidden_size", int, path, where),
            intermediate_size=_require(entry, "intermediate_size", int, path, where),
            license=_require(entry, "license", str, path, where, optional=True),
            num_parameters=_require(entry, "num_parameters", int, path, where, optional=True),
            mlp_layout=_layout(entry.get("mlp_layout", "gated"), path, where),
        )
    langs_raw = raw.get("languages")
    if not isinstance(langs_raw, list) or not langs_raw:
        raise _bad(path, "languages", "must be a non-empty list")
    languages, codes = [], set()
    for i, entry in enumerate(langs_raw):
        where = f"languages[{i}]"
        if not isinstance(entry, dict):
            raise _bad(path, where, "must be an object")
        code = _require(entry, "code", str, path, where)
        where = f"languages[{code}]"
        if not SPLIT_NAME.match(code):
            raise _bad(path, f"{where}.code", "must be a valid split name (letters, digits, '_'; no '-')")
        if code in codes:
            raise _bad(path, f"{where}.code", "is listed twice")
        codes.add(code)
        script = _require(entry, "script", str, path, where)
        if not SCRIPT.match(script):
            raise _bad(path, f"{where}.script", "must be an ISO 15924 code such as 'Latn'")
        flores = _require(entry, "flores200", str, path, where, optional=True)
        if flores is not None and not FLORES.match(flores):
            raise _bad(path, f"{where}.flores200", "must look like 'swh_Latn'")
        iso3 = _require(entry, "iso639_3", str, path, where)
        if not re.fullmatch(r"[a-z]{3}", iso3):
            raise _bad(path, f"{where}.iso639_3", "must be three lower-case letters")
        corpus_cfg = entry.get("corpus", {})
        if not isinstance(corpus_cfg, dict) or not isinstance(corpus_cfg.get("config"), str):
            raise _bad(path, f"{where}.corpus.config", "must name the default corpus config")
        aliases = entry.get("aliases", [])
        if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
            raise _bad(path, f"{where}.aliases", "must be a list of strings")
        languages.append(
            Language(
                code=code,
                name=_require(entry, "name", str, path, where),
                iso639_3=iso3,
                script=script,
                flores200=flores,
                corpus_config=corpus_cfg["config"],
                aliases=tuple(aliases),
                variant_of=entry.get("variant_of"),
                ntrex=entry.get("ntrex"),
            )
        )
    manifest = Manifest(path, registry_repo, dict(corpus), models, tuple(languages))
    for lang in languages:
        for key in dict.fromkeys(_norm(k) for k in lang.keys()):
            manifest._index.setdefault(key, []).append(lang)
    # A canonical code always means its own language, even where it is another's alias.
    for lang in languages:
        manifest._index[_norm(lang.code)] = [lang]
    return manifest
