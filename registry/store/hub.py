"""The registry on the Hugging Face Hub: publish a local registry, list and fetch what a repo holds.

A published repo holds, per model: every selection at ``<model>/<selection>/<lang>.parquet``, the
default selection also at ``<model>/<lang>.parquet`` (neuronreg 0.1's layout, so its readers keep
working), the raw counts at ``<model>/counts/<lang>.parquet`` and a plot; and one ``README.md``
dataset card whose ``configs`` make every selection loadable with ``datasets`` and whose metadata
holds the index (so that a repo can be listed from its card alone).

Publishing checks everything local before it touches the Hub (only regular files inside the
registry, each read back and validated), then makes ONE ``create_commit`` against the head it
planned on, so it is all or nothing; a tag that exists already is refused before committing; a
repo it created is deleted again if the commit fails. What is read from a repo (its card, other
models' files) is validated, and what is not neuronreg's or is malformed is skipped with a warning.
Fetching downloads one file through the Hub cache, so a second fetch (and ``HF_HUB_OFFLINE=1``)
needs no network. Tokens never appear in a message.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import HubError, MaskError, RecordError, RegistryError
from ..files import SAFE_NAME, write_parquet
from ..hubcalls import (
    CommitTarget,
    UploadPlan,
    check_ref_name,
    check_repo_id,
    commit_to,
    hub_error,
    hub_errors,
    lfs_sha256,
    retrying,
    same_content,
)
from ..mask import NeuronMask, read_mask_file
from ..plots import neurons_per_layer_png, require_matplotlib
from ..provenance import MaskSource
from .cards import OVERLAP_NAME, PER_LAYER_NAME, PLOT_NAME, dataset_card, model_card_entry, remote_index, remote_path
from .index import INDEX_KEY, RegistryIndex, SelectionEntry, SelectionRef, find_selection
from .local import CARD, COUNTS, LocalRegistry, read_card_metadata

log = logging.getLogger("neuronreg")
REPO_TYPE = "dataset"


@dataclass
class PublishResult:
    """What a publish did. ``uploaded`` are the paths whose content was new or changed; of their bytes,
    ``sent_bytes`` went over the network (each content once, and none the repo already stored: the Hub
    keeps LFS files by sha256); ``present``/``present_bytes`` count the files that were there already,
    byte for byte, and were not sent; ``skipped`` are local files left out (symbolic links), whose copy
    in the repo, if any, was kept."""

    repo_id: str
    changed: bool
    commit: str | None  # the new commit, or the head that already held everything
    url: str | None = None
    pull_request: str | None = None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    sent_bytes: int = 0
    present: int = 0
    present_bytes: int = 0
    skipped: list[str] = field(default_factory=list)


def ours(path: str) -> bool:
    """A repo path of neuronreg's layout: safe names only, no '..', nothing absolute."""
    parts = path.split("/")
    return (0 < len(parts) <= 4 and all(SAFE_NAME.fullmatch(p) and ".." not in p for p in parts)
            and not path.startswith("/"))


def _models_in(files: list[str]) -> set[str]:
    """The models a repo holds (0.1's layout included), from its file list."""
    return {f.split("/")[0] for f in files if ours(f) and f.count("/") >= 1 and f.endswith(".parquet")
            and f.split("/")[0] != COUNTS}


# -- reading a repo ------------------------------------------------------------------------------------
def _download(repo: str, filename: str, revision: str | None, token: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    with hub_errors(repo):
        return Path(retrying(lambda: hf_hub_download(repo, filename, repo_type=REPO_TYPE, revision=revision,
                                                     token=token)))


def read_remote_index(repo: str, *, revision: str | None = None, token: str | None = None,
                      files: list[str] | None = None) -> RegistryIndex:
    """What a repo holds, from its card alone (one small download, which the Hub cache serves again, also
    with ``HF_HUB_OFFLINE=1``); only where the card holds no index (a repo published by neuronreg 0.1, or one
    without a card) from its file list. ``files``: the repo's file list, when the caller has it already (the
    card is then read only if the list holds one). No Parquet file is downloaded."""
    if files is None or CARD in files:
        index = _card_index(repo, revision, token)
        if index is not None:
            return index
    if files is None:
        from huggingface_hub import HfApi

        with hub_errors(repo):
            files = retrying(lambda: HfApi(token=token).list_repo_files(repo, repo_type=REPO_TYPE,
                                                                         revision=revision))
    index = RegistryIndex()
    for model in sorted(_models_in(files)):
        langs = sorted(f.split("/")[1][: -len(".parquet")] for f in files
                       if f.startswith(f"{model}/") and f.count("/") == 1 and f.endswith(".parquet") and ours(f))
        if langs:  # neuronreg 0.1: one selection per model, at <model>/<lang>.parquet
            index = index.with_selection(model, SelectionEntry(name="default", path=model, languages=langs),
                                         make_default=True)
    return index


def _card_index(repo: str, revision: str | None, token: str | None) -> RegistryIndex | None:
    """The index in the repo's card; None where the repo has no card, or a card without an index neuronreg
    can read (both are listed from their files instead)."""
    from huggingface_hub import errors as e

    try:
        text = _download_raw(repo, CARD, revision, token).read_text(encoding="utf-8")
    except e.EntryNotFoundError as exc:
        if isinstance(exc, e.LocalEntryNotFoundError):  # offline, or no network, and not in the cache
            raise hub_error(exc, repo) or exc
        return None
    except UnicodeDecodeError as exc:
        log.warning("The card of %s is not UTF-8 text (%s); listing its files instead.", repo, exc)
        return None
    try:
        raw = read_card_metadata(text, f"{repo}/{CARD}").get(INDEX_KEY)
        if raw is None:
            return None
        return _only_ours(RegistryIndex.from_dict(raw, f"the index in {repo}/{CARD}"), repo)
    except (RecordError, RegistryError) as exc:
        log.warning("The card of %s has no index neuronreg can read (%s); listing its files instead.", repo, exc)
        return None


def _only_ours(index: RegistryIndex, repo: str) -> RegistryIndex:
    """The index without entries whose names or paths are not neuronreg's (a hostile or foreign card)."""
    clean = RegistryIndex()
    for model, found in index.models.items():
        if not SAFE_NAME.fullmatch(model):
            log.warning("Ignoring model %r in the card of %s: not a name neuronreg writes.", model, repo)
            continue
        for entry in index.entries(model):
            if not all(SAFE_NAME.fullmatch(lang) for lang in entry.languages):
                log.warning("Ignoring selection %s of %s in %s: odd language names.", entry.name, model, repo)
                continue
            clean = clean.with_selection(model, entry, make_default=entry.name == found.default)
    return clean


def _remote_file(model: str, entry: SelectionEntry, lang: str, default: bool) -> str:
    if entry.path == model:  # neuronreg 0.1's layout
        return f"{model}/{lang}.parquet"
    return remote_path(model, None if default else entry.name, lang)


# -- publish -------------------------------------------------------------------------------------------
def publish(
    registry: LocalRegistry,
    repo_id: str,
    models: list[str] | None = None,
    *,
    private: bool = False,
    tag: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    message: str | None = None,
    manifest=None,
) -> PublishResult:
    """Push the chosen models (default: all) of a local registry to a dataset repo in one commit.

    ``models`` are anything the resolver accepts (alias, Hub id, folder, registry name).
    """
    from huggingface_hub import HfApi

    from ..manifest import load_manifest
    from ..resolve import resolve_model

    available = [m for m in registry.models() if registry.selections(m)]
    if not available:
        raise RegistryError(f"The registry at {registry.root} has no neurons to publish.", fix="compute")
    manifest = manifest or load_manifest()
    models = [resolve_model(m, manifest, registry=registry).name for m in models or []]
    models = list(dict.fromkeys(models or available))
    missing = [m for m in models if m not in available]
    if missing:
        raise RegistryError(f"No neurons for {', '.join(missing)} in {registry.root} (available: "
                            f"{', '.join(available)}).")
    check_repo_id(repo_id)
    check_ref_name(revision, "revision")
    check_ref_name(tag, "tag")
    require_matplotlib("The dataset card's plots need matplotlib")  # said before the Hub is touched
    local = _local_files(registry, models)  # everything read back and validated before the Hub is touched

    with commit_to(HfApi(token=token), repo_id, REPO_TYPE, revision=revision, create_pr=create_pr, tag=tag,
                   private=private, what="this publish") as target:
        result = _publish(target, registry, repo_id, models, local, token=token, message=message,
                          manifest=manifest)
    return result


def _local_files(registry: LocalRegistry, models: list[str]) -> dict[str, dict]:
    """Per model: the neuron files of each selection and the counts files, all read back and validated.
    Only regular files inside the registry are taken (no symbolic links: they could point anywhere); a
    counts file that is a link is left out with a warning, and listed under ``skipped``."""
    from ..files import inside

    clash = registry.index().duplicate_config(models)
    if clash:  # a registry of an older neuronreg: its card would hide one of them on the Hub too
        raise RegistryError(clash, fix="config_name", advice="Store one of the models under another name (name=...).")
    found = {}
    for model in models:
        selections = {}
        for entry in registry.selections(model):
            files = {}
            for lang in entry.languages:
                path = registry.neuron_path(model, lang, entry.name)
                _regular(registry, path)
                registry.read_mask(model, lang, entry.name)  # schema, provenance, ranges, order
                files[lang] = path
            selections[entry.name] = files
        counts = {}
        for lang in registry.counted_languages(model):
            path = registry.counts_path(model, lang)
            _regular(registry, path)
            registry.check_counts(model, lang)  # every neuron once, counts within [0, tokens], means valid
            counts[lang] = path
        skipped = []
        folder = registry.model_dir(model) / COUNTS
        for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
            if SAFE_NAME.match(path.stem) and path.stem not in counts:
                log.warning("%s is %s: not published (the repo's copy, if it has one, is kept).", path,
                            "a symbolic link" if path.is_symlink() else "not a regular file")
                skipped.append(f"{model}/{COUNTS}/{path.name}")
        found[model] = {"selections": selections, "counts": counts, "skipped": skipped}
        assert all(inside(registry.root, p) for files in selections.values() for p in files.values())
    return found


def _regular(registry: LocalRegistry, path: Path) -> None:
    from ..files import inside

    if path.is_symlink() or not path.is_file() or not inside(registry.root, path):
        raise RegistryError(f"{path} is not a regular file inside the registry; only those are published.",
                            fix="recompute")


def _publish(target: CommitTarget, registry: LocalRegistry, repo_id: str, models: list[str], local: dict, *,
             token, message, manifest) -> PublishResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    head = target.head
    remote = target.files
    skipped = sorted(p for model in models for p in local[model]["skipped"])
    with tempfile.TemporaryDirectory(prefix="neuronreg-publish-") as tmp:
        staging = Path(tmp)
        files: dict[str, Path] = {}
        entries, index = [], RegistryIndex()
        for model in models:
            for position, entry in enumerate(registry.selections(model)):
                for lang, path in local[model]["selections"][entry.name].items():
                    files[remote_path(model, entry.name, lang)] = path
                    if position == 0:
                        files[remote_path(model, None, lang)] = path
                index = index.with_selection(model, entry, make_default=position == 0)
            for lang, path in local[model]["counts"].items():
                files[f"{model}/{COUNTS}/{lang}.parquet"] = path
            entry = model_card_entry(registry, model, remote=True, plot=f"{model}/{PLOT_NAME}")
            files[f"{model}/{PLOT_NAME}"] = neurons_per_layer_png(entry, staging / model / PLOT_NAME)
            files.update(_overlap_figures(registry, model, staging, entry, manifest))
            entries.append(entry)
        # Models already in the repo but not published now stay on the card.
        kept, kept_index = _remote_models(repo_id, head, token, remote, exclude=set(models), staging=staging,
                                          ours=index, registry=registry)
        entries += kept
        for model, found in kept_index.models.items():
            for entry in kept_index.entries(model):
                index = index.with_selection(model, entry, make_default=entry.name == found.default)
        card = staging / CARD
        card.write_text(dataset_card(sorted(entries, key=lambda e: e["name"]), remote_index(index), repo_id),
                        encoding="utf-8")
        files[CARD] = card

        plan = UploadPlan(files, remote)
        # Files of a published model that the local registry no longer has (a language dropped from a
        # selection, a selection replaced) go, so the repo shows what the registry holds; a file left out
        # locally (a link) is not "no longer there", and its copy stays.
        deletions = sorted(p for p in remote if ours(p) and p.split("/")[0] in models and p not in files
                           and p not in skipped)
        additions = {p: CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f))
                     for p, f in sorted(plan.uploads.items())}
        operations = [*additions.values(), *(CommitOperationDelete(path_in_repo=p) for p in deletions)]
        commit = target.commit(operations, message or f"Publish {', '.join(models)} (neuronreg {__version__})",
                               first=[additions[p] for p in plan.first_of_repeated()])
    numbers = dict(sent_bytes=plan.sent_bytes, present=len(plan.present), present_bytes=plan.present_bytes,
                   skipped=skipped)
    if commit is None:
        return PublishResult(repo_id, False, head, **numbers)
    return PublishResult(repo_id, True, commit.oid, commit.commit_url, commit.pr_url, sorted(plan.uploads), deletions,
                         **numbers)


def _overlap_figures(registry: LocalRegistry, model: str, staging: Path, entry: dict, manifest) -> dict[str, Path]:
    """The overlap heatmap and neurons-per-layer plot of the model's default selection, for the card (languages
    grouped by the manifest's scripts and families: the one given to publish)."""
    from ..overlap import overlap

    default = registry.default_selection(model)
    masks = registry.read_masks(model, default.languages, default.name)
    if len(masks) < 2:
        return {}
    report = overlap(masks, manifest)
    names = {"overlap": f"{model}/{OVERLAP_NAME}", "per_layer": f"{model}/{PER_LAYER_NAME}"}
    report.draw(staging / names["overlap"], staging / names["per_layer"])
    entry["overlap_plot"], entry["per_layer_plot"] = names["overlap"], names["per_layer"]
    return {path: staging / path for path in names.values()}


def _remote_models(repo_id: str, head: str, token, remote: dict, *, exclude: set[str], staging: Path,
                   ours: RegistryIndex, registry: LocalRegistry):
    """Card entries of the models a repo holds that are not being published now: their neuron files
    are read (at ``head``) and validated; what is malformed, or would give a ``datasets`` config the
    name of one of ``ours`` (or of another kept one), is skipped with a warning. A file whose content is
    at hand, checked against the repo's hash of it (the same file in ``registry``, or in the Hub cache
    from an earlier download), is not downloaded again; with no other model in the repo, not even the
    card is."""
    if not _models_in(list(remote)) - exclude:
        return [], RegistryIndex()
    index = read_remote_index(repo_id, revision=head, token=token, files=list(remote))
    others = LocalRegistry(staging / "remote")
    kept = RegistryIndex()
    for model in sorted(set(index.models) - exclude):
        found = index.models[model]
        for entry in index.entries(model):
            taken = RegistryIndex(models={**(ours.models if ours else {}), **kept.models})
            clash = taken.config_clash(model, None) or taken.config_clash(model, entry.name)
            if clash:
                log.warning("Leaving selection %s of model %s in %s off the card: %s", entry.name, model, repo_id,
                            clash[0].lower() + clash[1:])
                continue
            folder = others.root / model / entry.name / "v1"
            languages = []
            for lang in entry.languages:
                name = _remote_file(model, entry, lang, default=entry.name == found.default)
                if name not in remote:
                    log.warning("%s lists %s but the repo has no such file; skipped.", repo_id, name)
                    continue
                try:
                    held = _at_hand(registry, repo_id, remote[name], model, entry.name, lang)
                    path = held or _download(repo_id, name, head, token)
                    mask = read_mask_file(path, model, lang,
                                          MaskSource(kind="repo", repo=repo_id, commit=head, selection=entry.name),
                                          where=f"{name} from {repo_id}")
                except (MaskError, RecordError) as exc:
                    log.warning("Skipping %s of %s: %s", name, repo_id, exc)
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                write_parquet(mask.to_table(), folder / f"{lang}.parquet")
                languages.append(lang)
            if languages:
                clean = SelectionEntry.from_dict({**entry.to_dict(), "languages": languages,
                                                  "path": folder.relative_to(others.root).as_posix()}, "index")
                kept = kept.with_selection(model, clean, make_default=entry.name == found.default)
    view = LocalRegistry(others.root, index=kept)
    entries = []
    for model in sorted(kept.models):
        plot = f"{model}/{PLOT_NAME}" if f"{model}/{PLOT_NAME}" in remote else None
        if entry := model_card_entry(view, model, remote=True, plot=plot):
            entries.append(entry)
    return entries, kept


def _at_hand(registry: LocalRegistry, repo_id: str, sibling, model: str, selection: str, lang: str) -> Path | None:
    """A local file holding exactly what the repo holds in ``sibling`` (its sha256, or git blob id), or None."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    candidates = []
    try:
        candidates.append(registry.neuron_path(model, lang, selection))
    except (RegistryError, MaskError):
        pass
    blob = lfs_sha256(sibling) or getattr(sibling, "blob_id", None)
    if blob and SAFE_NAME.match(blob):  # the Hub cache keeps a download as blobs/<its etag: sha256 or blob id>
        candidates.append(Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=REPO_TYPE)
                          / "blobs" / blob)
    for path in candidates:
        try:
            if path.is_file() and same_content(sibling, path):
                return path
        except OSError:
            continue
    return None


# -- fetch ---------------------------------------------------------------------------------------------
def fetch_mask(model: str, language: str, *, repo: str, revision: str | None = None, token: str | None = None,
               selection: SelectionRef | str | float | None = None) -> NeuronMask:
    """Download (or take from the cache) one language's neuron file of one selection and validate it;
    ``model`` is a registry name, ``language`` a code (:func:`~neuronreg.store.masks.find_masks` resolves
    what a user typed).

    The default selection, or a selection named or given by its top rate, is one file at a known
    path (:meth:`SelectionRef.expected_name`), so a cold fetch is one request pair; the card is read
    only when that path does not exist (a selection of another name, or a message saying what the
    repo holds).
    """
    from huggingface_hub import errors as e

    ref = SelectionRef.of(selection)
    guess = ref.expected_name()
    filename = remote_path(model, guess, language)
    try:
        path = _download_raw(repo, filename, revision, token)
    except e.EntryNotFoundError as exc:
        if isinstance(exc, e.LocalEntryNotFoundError):
            raise hub_error(exc, repo) or exc
        index = read_remote_index(repo, revision=revision, token=token)
        entry = find_selection(index, model, ref, where=repo)
        if language not in entry.languages:
            raise HubError(f"No {language} neurons for {model} ({entry.name}) in {repo} (available: "
                           f"{', '.join(entry.languages)}).") from exc
        filename = _remote_file(model, entry, language, default=index.models[model].default == entry.name
                                and ref.is_default)
        if filename == remote_path(model, guess, language):
            raise HubError(f"{repo} lists {filename} but does not hold it.") from exc
        path = _download(repo, filename, revision, token)
        guess = entry.name
    # The cache keeps files under .../snapshots/<commit>/<path>: the commit this mask came from.
    commit = path.parents[filename.count("/")].name
    source = MaskSource(kind="repo", repo=repo, revision=revision or "main", commit=commit,
                        selection=guess or "default")
    return read_mask_file(path, model, language, source, where=f"{filename} from {repo}")


def _download_raw(repo: str, filename: str, revision: str | None, token: str | None) -> Path:
    """hf_hub_download, with every error but a missing file turned into a HubError."""
    from huggingface_hub import errors as e
    from huggingface_hub import hf_hub_download

    try:
        return Path(retrying(lambda: hf_hub_download(repo, filename, repo_type=REPO_TYPE, revision=revision,
                                                     token=token)))
    except e.EntryNotFoundError:
        raise
    except Exception as exc:
        raise hub_error(exc, repo) or exc
