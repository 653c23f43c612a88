"""The catalogue of model aliases and languages (``manifest.json``), validated at every level on load.

Every key of every entry is checked: an unknown key (a typo such as ``mlp_layuot``), a missing one
or a value of the wrong type is a :class:`ManifestError` naming the file and the path of the key
(``models[mistral-nemo].mlp_layuot: unknown key``), never a traceback. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from .errors import ManifestError, UnknownLanguage
from .layouts import BY_NAME as LAYOUTS
from .limits import load_json

MANIFEST_ENV = "NEURONREG_MANIFEST"
# A language code becomes a `datasets` split name, which must match this.
SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")
SCRIPT = re.compile(r"^[A-Z][a-z]{3}$")
FLORES = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
ISO639_3 = re.compile(r"^[a-z]{3}$")
ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")


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
    family: str | None = None  # "Indo-European/Germanic": top-level family, then the branch where one is known
    corpus_note: str | None = None  # a remark on the default corpus's config (no data, merged labels ...)

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
    language_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the manifest's own; see sets()
    _index: dict[str, list[Language]] = field(default_factory=dict, repr=False, compare=False)

    def sets(self) -> dict[str, tuple[str, ...]]:
        """Every language set, by name (used as ``@name``): ``all``, ``ntrex`` (every language with NTREX-128
        text) and the manifest's own (``seed12``: the seed paper's 12, ``lape7``: the LAPE authors' 7)."""
        return {"all": tuple(lang.code for lang in self.languages),
                "ntrex": tuple(lang.code for lang in self.languages if lang.ntrex),
                **self.language_sets}

    def lookup(self, name: str) -> Language | None:
        """The language ``name`` stands for, None when it stands for none; UnknownLanguage when ambiguous."""
        found = self._index.get(_norm(name), []) if isinstance(name, str) else []
        if len(found) == 1:
            return found[0]
        if found:
            # Regional variants share their ISO 639-3 code with the base language: prefer the base.
            base = [lang for lang in found if lang.variant_of is None and "_" not in lang.code]
            if len(base) == 1:
                return base[0]
            codes = ", ".join(lang.code for lang in found)
            raise UnknownLanguage(f"Language {name!r} is ambiguous: it may be {codes}. Use one of those codes.")
        return None

    def suggest(self, name: str, extra: list[str] = ()) -> str:
        """' Did you mean x, y?' for a misspelt language, or ''."""
        keys = {**{k: langs[0].code for k, langs in self._index.items()}, **{_norm(e): e for e in extra}}
        close = difflib.get_close_matches(_norm(str(name)), list(keys), n=3, cutoff=0.6)
        codes = list(dict.fromkeys(keys[c] for c in close))
        return f" Did you mean {', '.join(codes)}?" if codes else ""

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
        raw = load_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"Manifest {path} does not exist.", fix="manifest") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"Manifest {path} is not valid JSON ({exc}). Fix the file.") from exc
    return _Validator(Path(path)).manifest(raw)


# -- validation -------------------------------------------------------------------------------------
# Each entry kind: key -> (check, required). A check takes (value, where) and returns the value to keep.
Check = Callable[[object, str], object]


class _Validator:
    def __init__(self, path: Path):
        self.path = path

    def bad(self, where: str, what: str) -> ManifestError:
        return ManifestError(f"Manifest {self.path}: {where} {what}. Fix that entry.")

    # value checks
    def string(self, pattern: re.Pattern | None = None, shape: str = "") -> Check:
        def check(value, where):
            if not isinstance(value, str) or not value.strip():
                raise self.bad(where, "must be a non-empty string")
            if pattern is not None and not pattern.fullmatch(value):
                raise self.bad(where, f"must be {shape}")
            return value

        return check

    def positive(self, value, where):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.bad(where, "must be a positive integer")
        return value

    def optional(self, check: Check) -> Check:
        return lambda value, where: None if value is None else check(value, where)

    def choice(self, options) -> Check:
        def check(value, where):
            if value not in options:
                raise self.bad(where, f"must be one of {', '.join(options)}")
            return value

        return check

    def strings(self, value, where):
        if not isinstance(value, list) or not all(isinstance(a, str) and a.strip() for a in value):
            raise self.bad(where, "must be a list of non-empty strings")
        return tuple(value)

    def entry(self, raw, where: str, spec: dict[str, tuple[Check, bool]]) -> dict:
        if not isinstance(raw, dict):
            raise self.bad(where, "must be a JSON object")
        for key in raw:
            if key not in spec:
                close = difflib.get_close_matches(str(key), list(spec), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(spec)})"
                raise self.bad(f"{where}.{key}", f"is an unknown key{hint}")
        out = {}
        for key, (check, required) in spec.items():
            if key not in raw or raw[key] is None:
                if required:
                    raise self.bad(f"{where}.{key}", "is missing")
                out[key] = None
                continue
            out[key] = check(raw[key], f"{where}.{key}")
        return out

    # entries
    def manifest(self, raw) -> Manifest:
        top = self.entry(raw, "the manifest", {
            "manifest_version": (self.positive, False),
            "registry_repo": (self.string(REPO_ID, "a Hub repo id like org/name"), True),
            "default_corpus": (self.corpus, True),
            "models": (self.object_of("models"), True),
            "languages": (self.list_of("languages"), True),
            "language_sets": (self.object_of("language sets"), False),
        })
        if top["manifest_version"] not in (None, 1):
            raise self.bad("manifest_version", f"is {top['manifest_version']}, and this neuronreg reads version 1")
        models = {}
        for alias, entry in top["models"].items():
            where = f"models[{alias}]"
            if not ALIAS.fullmatch(alias):
                raise self.bad(where, "is not a valid alias (letters, digits, '-', '_', '.')")
            models[alias] = ModelEntry(alias=alias, **self.entry(entry, where, {
                "hub_id": (self.string(REPO_ID, "a Hub id like org/name"), True),
                "revision": (self.optional(self.string()), False),
                "num_layers": (self.positive, True),
                "hidden_size": (self.positive, True),
                "intermediate_size": (self.positive, True),
                "license": (self.optional(self.string()), False),
                "num_parameters": (self.optional(self.positive), False),
                "mlp_layout": (self.choice(list(LAYOUTS)), False),
            }))
            if models[alias].mlp_layout is None:
                models[alias] = ModelEntry(**{**models[alias].__dict__, "mlp_layout": "gated"})
        languages, codes = [], set()
        for i, raw_lang in enumerate(top["languages"]):
            label = raw_lang.get("code") if isinstance(raw_lang, dict) and isinstance(raw_lang.get("code"), str) else i
            where = f"languages[{label}]"
            lang = self.entry(raw_lang, where, {
                "code": (self.string(SPLIT_NAME, "a valid split name (letters, digits, '_'; no '-')"), True),
                "name": (self.string(), True),
                "iso639_3": (self.string(ISO639_3, "three lower-case letters"), True),
                "script": (self.string(SCRIPT, "an ISO 15924 code such as 'Latn'"), True),
                "flores200": (self.optional(self.string(FLORES, "like 'swh_Latn'")), False),
                "corpus": (self.language_corpus, True),
                "aliases": (self.strings, False),
                "variant_of": (self.optional(self.string()), False),
                "ntrex": (self.optional(self.string()), False),
                "family": (self.optional(self.string()), False),
            })
            if lang["code"] in codes:
                raise self.bad(f"{where}.code", "is listed twice")
            codes.add(lang["code"])
            languages.append(Language(code=lang["code"], name=lang["name"], iso639_3=lang["iso639_3"],
                                      script=lang["script"], flores200=lang["flores200"],
                                      corpus_config=lang["corpus"]["config"], aliases=lang["aliases"] or (),
                                      variant_of=lang["variant_of"], ntrex=lang["ntrex"], family=lang["family"],
                                      corpus_note=lang["corpus"]["note"]))
        for lang in languages:
            if lang.variant_of is not None and lang.variant_of not in codes:
                raise self.bad(f"languages[{lang.code}].variant_of", f"names {lang.variant_of!r}, which is not a code "
                                                                     "of this manifest")
        sets = {}
        for name, members in (top["language_sets"] or {}).items():
            where = f"language_sets[{name}]"
            if not ALIAS.fullmatch(name) or name in ("all", "ntrex"):
                raise self.bad(where, "is not a set name neuronreg can use (letters, digits, '-', '_'; not all or "
                                      "ntrex, which are built in)")
            sets[name] = self.strings(members, where)
            unknown = [code for code in sets[name] if code not in codes]
            if unknown:
                raise self.bad(where, f"lists {', '.join(unknown)}, not canonical codes of this manifest")
        manifest = Manifest(self.path, top["registry_repo"], top["default_corpus"], models, tuple(languages), sets)
        for lang in languages:
            for key in dict.fromkeys(_norm(k) for k in lang.keys()):
                manifest._index.setdefault(key, []).append(lang)
        # A canonical code always means its own language, even where it is another's alias.
        for lang in languages:
            manifest._index[_norm(lang.code)] = [lang]
        return manifest

    def object_of(self, what: str) -> Check:
        def check(value, where):
            if not isinstance(value, dict) or not value:
                raise self.bad(where, f"must be a non-empty object of {what}")
            return value

        return check

    def list_of(self, what: str) -> Check:
        def check(value, where):
            if not isinstance(value, list) or not value:
                raise self.bad(where, f"must be a non-empty list of {what}")
            return value

        return check

    def corpus(self, value, where):
        entry = self.entry(value, where, {
            "dataset": (self.string(REPO_ID, "a Hub dataset id like org/name"), True),
            "split": (self.string(), False),
            "text_field": (self.string(), False),
            "configs_source": (self.string(), False),  # where the languages' config names were checked
        })
        return {key: val for key, val in entry.items() if val is not None}

    def language_corpus(self, value, where):
        return self.entry(value, where, {"config": (self.string(), True), "note": (self.string(), False)})
