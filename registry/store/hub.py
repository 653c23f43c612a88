"""The registry on the Hugging Face Hub: publish a local registry, fetch one language's mask.

A published repo has the local registry's layout (``<model>/<lang>.parquet``, ``<model>/counts/``,
a ``README.md`` dataset card with ``configs:``) plus one plot per model. Publishing is ONE
``create_commit`` against the head it was planned on, so it is all or nothing; publishing what is
already there makes no commit. Fetching downloads one file through the Hub cache, so a second
fetch (and ``HF_HUB_OFFLINE=1``) needs no network. Tokens come from the caller, ``HF_TOKEN`` or the
Hub login, and never appear in a message.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import HubError, RegistryError
from ..hubcalls import hub_error, hub_errors, retrying
from ..mask import NeuronMask, read_mask_file
from .cards import PLOT_NAME, dataset_card, model_card_entry
from .figures import neurons_per_layer_png
from .local import LocalRegistry

REPO_TYPE = "dataset"


@dataclass
class PublishResult:
    repo_id: str
    changed: bool
    commit: str | None  # the new commit, or the head that already held everything
    url: str | None = None
    pull_request: str | None = None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _unchanged(remote, data: bytes) -> bool:
    """Whether a remote file (a RepoSibling with metadata) holds exactly ``data``."""
    if remote is None:
        return False
    lfs = getattr(remote, "lfs", None)
    if lfs:
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        return sha == hashlib.sha256(data).hexdigest()
    return getattr(remote, "blob_id", None) == _git_blob_sha1(data)


def _models_in(files: list[str]) -> set[str]:
    return {f.split("/")[0] for f in files if f.count("/") == 1 and f.endswith(".parquet")}


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
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download

    from ..manifest import load_manifest
    from ..resolve import resolve_model

    available = [m for m in registry.models() if registry.selected_languages(m)]
    if not available:
        raise RegistryError(f"The registry at {registry.root} has no neurons to publish.", fix="compute")
    manifest = manifest or load_manifest()
    models = [resolve_model(m, manifest, registry=registry).name for m in models or []]
    models = list(dict.fromkeys(models or available))
    missing = [m for m in models if m not in available]
    if missing:
        raise RegistryError(f"No neurons for {', '.join(missing)} in {registry.root} (available: "
                            f"{', '.join(available)}).")

    api = HfApi(token=token)
    with hub_errors(repo_id):
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
        if revision and revision != "main" and not create_pr:
            api.create_branch(repo_id, repo_type=REPO_TYPE, branch=revision, exist_ok=True)
        info = retrying(lambda: api.repo_info(repo_id, repo_type=REPO_TYPE, revision=revision, files_metadata=True))
    head = info.sha
    remote = {s.rfilename: s for s in (info.siblings or [])}

    with tempfile.TemporaryDirectory(prefix="neuronreg-publish-") as tmp:
        staging = Path(tmp)
        files: dict[str, Path] = {}
        entries = []
        for model in models:
            for lang in registry.selected_languages(model):
                files[f"{model}/{lang}.parquet"] = registry.neuron_path(model, lang)
            for lang in registry.counted_languages(model):
                files[f"{model}/counts/{lang}.parquet"] = registry.counts_path(model, lang)
            entry = model_card_entry(registry, model, plot=f"{model}/{PLOT_NAME}")
            files[f"{model}/{PLOT_NAME}"] = neurons_per_layer_png(entry, staging / model / PLOT_NAME)
            entries.append(entry)
        # Models already in the repo but not published now stay on the card: read their neuron files.
        others = LocalRegistry(staging / "remote")
        for model in sorted(_models_in(list(remote)) - set(models)):
            with hub_errors(repo_id):
                for name in sorted(f for f in remote if f.startswith(f"{model}/") and f.count("/") == 1
                                   and f.endswith(".parquet")):
                    src = retrying(lambda name=name: hf_hub_download(repo_id, name, repo_type=REPO_TYPE,
                                                                     revision=head, token=token))
                    target = others.root / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(Path(src).read_bytes())
            plot = f"{model}/{PLOT_NAME}" if f"{model}/{PLOT_NAME}" in remote else None
            if entry := model_card_entry(others, model, plot=plot):
                entries.append(entry)
        card = staging / "README.md"
        card.write_text(dataset_card(sorted(entries, key=lambda e: e["name"]), repo_id), encoding="utf-8")
        files["README.md"] = card

        uploads = {path: local for path, local in files.items()
                   if not _unchanged(remote.get(path), local.read_bytes())}
        # Files of a published model that the local registry no longer has (a language dropped
        # from the selection) go, so the repo shows one consistent selection per model.
        deletions = sorted(p for p in remote if p.split("/")[0] in models and p not in files)
        if not uploads and not deletions:
            result = PublishResult(repo_id, False, head)
        else:
            operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f))
                          for p, f in sorted(uploads.items())]
            operations += [CommitOperationDelete(path_in_repo=p) for p in deletions]
            with hub_errors(repo_id):
                commit = api.create_commit(
                    repo_id, operations, repo_type=REPO_TYPE, revision=revision, create_pr=create_pr,
                    parent_commit=head,
                    commit_message=message or f"Publish {', '.join(models)} (neuronreg {__version__})",
                )
            result = PublishResult(repo_id, True, commit.oid, commit.commit_url, commit.pr_url,
                                   sorted(uploads), deletions)
    if tag:
        with hub_errors(repo_id):
            api.create_tag(repo_id, tag=tag, revision=result.commit, repo_type=REPO_TYPE, exist_ok=False)
    return result


def fetch_mask(model: str, language: str, *, repo: str, revision: str | None = None,
               token: str | None = None) -> NeuronMask:
    """Download (or take from the cache) one language's neuron file and validate it."""
    from huggingface_hub import errors as e
    from huggingface_hub import hf_hub_download

    filename = f"{model}/{language}.parquet"
    try:
        path = retrying(lambda: hf_hub_download(repo, filename, repo_type=REPO_TYPE, revision=revision, token=token))
    except Exception as exc:
        if isinstance(exc, e.EntryNotFoundError) and not isinstance(exc, e.LocalEntryNotFoundError):
            raise HubError(_missing_entry(repo, model, language, revision, token)) from exc
        raise hub_error(exc, repo) or exc
    # The cache keeps files under .../snapshots/<commit>/<path>: the commit this mask came from.
    commit = Path(path).parents[filename.count("/")].name
    source = {"repo": repo, "revision": revision or "main", "commit": commit}
    return read_mask_file(Path(path), model, language, source)


def _missing_entry(repo: str, model: str, language: str, revision: str | None, token: str | None) -> str:
    from huggingface_hub import HfApi

    try:
        files = HfApi(token=token).list_repo_files(repo, repo_type=REPO_TYPE, revision=revision)
    except Exception:  # the listing only improves the message
        return f"No {language} neurons for {model} in {repo}."
    models = sorted(_models_in(files))
    if model not in models:
        return f"{repo} has no model {model} (available: {', '.join(models) or 'none'})."
    langs = sorted(f.split("/")[1][: -len(".parquet")] for f in files
                   if f.startswith(f"{model}/") and f.count("/") == 1 and f.endswith(".parquet"))
    return f"No {language} neurons for {model} in {repo} (available: {', '.join(langs)})."


def load_mask(model: str, language: str, *, repo: str | None = None, revision: str | None = None,
              registry: LocalRegistry | str | None = None, token: str | None = None, manifest=None) -> NeuronMask:
    """A language's mask: from ``repo`` on the Hub when given, else from the local registry when it
    holds it, else from the manifest's default registry repo.

    ``model`` is anything the resolver accepts (alias, Hub id, folder, registry name); ``language``
    any of its codes or its name.
    """
    from ..manifest import load_manifest
    from ..resolve import language_code, resolve_model

    manifest = manifest or load_manifest()
    local = registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)
    name = resolve_model(model, manifest, registry=local, any_name=True).name
    code = language_code(language, manifest, local.selected_languages(name))
    if repo is None:
        if code in local.selected_languages(name):
            return local.read_mask(name, code)
        repo = manifest.registry_repo
    return fetch_mask(name, code, repo=repo, revision=revision, token=token)
