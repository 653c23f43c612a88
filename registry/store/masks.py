"""The one query for masks: which languages' masks, of which selection, of which model, from where.

Every command and function that reads masks (``show``, ``fetch``, ``export``, ``overlap``, ``ablate``,
steering, ``finetune`` and :func:`load_mask`) asks :func:`find_masks`, so the model, the languages and the
selection are resolved the same way everywhere:

* the model: anything :func:`~neuronreg.resolve.resolve_model` accepts (alias, Hub id, folder, registry
  name); a repo is searched by the name the model has in registries;
* the languages: any of their codes or names, or a set (``@seed12``); a code the selection holds is
  taken even where the manifest does not know it; None means every language of the selection;
* the selection: a :class:`~neuronreg.store.index.SelectionRef` (a name, a top rate, or the model's
  default), spelled the same way everywhere;
* from where: a local registry (the default), a Hub dataset repo (``repo``, at ``revision``: one file
  per language is downloaded, through the Hub cache), or one mask file (``file``, any format
  :meth:`NeuronMask.save` writes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import MaskError
from ..manifest import Manifest
from ..mask import NeuronMask
from .index import SelectionEntry, SelectionRef
from .local import LocalRegistry


@dataclass
class MaskSet:
    """The masks a query found, by language code (in the order asked, else the selection's)."""

    model: str  # the registry name
    selection: str  # the selection's name ("file" for a mask file)
    masks: dict[str, NeuronMask]
    where: str  # the registry folder, repo@revision or file, for messages
    entry: SelectionEntry | None = None  # the selection's index entry (None for a file)

    @property
    def languages(self) -> list[str]:
        return list(self.masks)

    def __getitem__(self, language: str) -> NeuronMask:
        return self.masks[language]

    def __len__(self) -> int:
        return len(self.masks)

    def one(self) -> NeuronMask:
        """The only mask of a query for one language."""
        if len(self.masks) != 1:
            raise MaskError(f"Expected one language's mask, found {len(self.masks)} ({', '.join(self.masks)}).")
        return next(iter(self.masks.values()))


def find_masks(model: str, languages: Iterable[str] | str | None = None, *,
               selection: SelectionRef | str | float | None = None, top_rate: float | None = None,
               registry: LocalRegistry | str | Path | None = None, repo: str | None = None,
               revision: str | None = None, file: str | Path | None = None, manifest: Manifest | None = None,
               token: str | None = None) -> MaskSet:
    """The masks of ``languages`` (None: all of the selection) of ``model`` (as typed, or a resolved
    :class:`~neuronreg.resolve.ModelRef`), of its ``selection`` (or ``top_rate``;
    neither: its default), from ``file``, else ``repo``, else the local ``registry`` (None: the default
    one). A missing model, selection or language is one error naming what there is."""
    from ..manifest import load_manifest

    manifest = manifest or load_manifest()
    ref = SelectionRef.of(selection, top_rate)
    if file is not None:
        return _from_file(Path(file), model, languages, manifest, registry)
    if repo is not None:
        return _from_repo(model, languages, ref, repo, revision, token, manifest)
    return _from_registry(model, languages, ref, _registry(registry), manifest)


def load_mask(model: str, language: str, *, repo: str | None = None, revision: str | None = None,
              registry: LocalRegistry | str | Path | None = None, token: str | None = None,
              manifest: Manifest | None = None, selection: SelectionRef | str | float | None = None,
              top_rate: float | None = None) -> NeuronMask:
    """A language's mask: from ``repo`` on the Hub when given, else from the local registry when it holds
    it, else from the manifest's default registry repo.

    ``model`` is anything the resolver accepts (alias, Hub id, folder, registry name); ``language`` any
    of its codes or its name; ``selection`` (a name or a rate) or ``top_rate`` chooses among the model's
    selections (default: its default selection)."""
    from ..manifest import load_manifest

    manifest = manifest or load_manifest()
    local = _registry(registry)
    ref = SelectionRef.of(selection, top_rate)
    if repo is None:
        name = _name(model, manifest, local, any_name=True)
        if local.selections(name):
            entry = local.selection(name, ref)
            from ..resolve import language_code

            if language_code(language, manifest, entry.languages) in entry.languages:
                return _from_registry(model, [language], ref, local, manifest).one()
    return _from_repo(model, [language], ref, repo or manifest.registry_repo, revision, token, manifest).one()


def _registry(registry: LocalRegistry | str | Path | None) -> LocalRegistry:
    return registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)


def _name(model, manifest: Manifest, registry: LocalRegistry | None = None, any_name: bool = False) -> str:
    """The registry name of ``model``: a ModelRef already resolved, or what a user typed."""
    from ..resolve import ModelRef, resolve_model

    if isinstance(model, ModelRef):
        return model.name
    return resolve_model(model, manifest, registry=registry, any_name=any_name).name


def _from_registry(model, languages, ref: SelectionRef, registry: LocalRegistry, manifest: Manifest) -> MaskSet:
    from ..resolve import language_codes

    name = _name(model, manifest, registry)
    entry = registry.selection(name, ref)
    codes = language_codes(languages, manifest, entry.languages) if languages else list(entry.languages)
    return MaskSet(name, entry.name, registry.read_masks(name, codes, entry.name), str(registry.root), entry)


def _from_repo(model, languages, ref: SelectionRef, repo: str, revision: str | None, token: str | None,
               manifest: Manifest) -> MaskSet:
    from ..resolve import language_codes
    from .hub import fetch_mask, read_remote_index
    from .index import find_selection

    name = _name(model, manifest, any_name=True)
    entry = None
    if not languages:  # every language of the selection: the card says which
        index = read_remote_index(repo, revision=revision, token=token)
        entry = find_selection(index, name, ref, where=repo)
        codes = list(entry.languages)
    else:
        codes = language_codes(languages, manifest)
    masks = {code: fetch_mask(name, code, repo=repo, revision=revision, token=token, selection=ref) for code in codes}
    chosen = next(iter(masks.values())).source.selection if masks else (entry.name if entry else "default")
    where = f"{repo}@{revision}" if revision else repo
    return MaskSet(name, chosen, masks, where, entry)


def _from_file(path: Path, model, languages, manifest: Manifest, registry) -> MaskSet:
    from ..resolve import language_codes

    name = _name(model, manifest, _registry(registry) if registry is not None else None, any_name=True)
    codes = language_codes(languages, manifest) if languages else []
    if len(codes) > 1:
        raise MaskError(f"The mask file {path.name} holds one language; {len(codes)} were asked for.")
    mask = NeuronMask.load(path, model=name)
    if codes and mask.language and mask.language != codes[0]:
        raise MaskError(f"The mask file {path.name} holds the neurons of {mask.language}, not of {codes[0]}.",
                        fix="mask_file", advice="Give the mask file of that language.")
    code = codes[0] if codes else mask.language
    mask.language = code
    return MaskSet(name, mask.source.selection if mask.source and mask.source.selection else "file", {code: mask},
                   str(path))
