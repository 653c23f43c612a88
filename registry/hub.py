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
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .cards import PLOT_NAME, dataset_card, model_card_entry, neurons_per_layer_png
from .errors import HubError, RegistryError
from .mask import NeuronMask, read_mask_file
from .store import LocalRegistry

REPO_TYPE = "dataset"
LOGIN_HINT = "Log in with 'hf auth login', set HF_TOKEN, or pass --token."


@dataclass
class PublishResult:
    repo_id: str
    changed: bool
    commit: str | None  # the new commit, or the head that already held everything
    url: str | None = None
    pull_request: str | None = None
    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


@contextmanager
def hub_errors(repo_id: str, what: str = "the Hub"):
    """Turn huggingface_hub's exceptions into one-line messages that say what to do."""
    from huggingface_hub import errors as e

    try:
        yield
    except e.GatedRepoError:
        raise HubError(f"{repo_id} is gated: request access on its Hub page, then use a token with access. "
                       f"{LOGIN_HINT}") from None
    except e.RepositoryNotFoundError:
        raise HubError(f"{repo_id} was not found on {what}, or it is private and your token cannot see it. Check "
                       f"the name. {LOGIN_HINT}") from None
    except e.RevisionNotFoundError:
        raise HubError(f"{repo_id} has no such revision (branch, tag or commit). Check --revision.") from None
    except e.LocalEntryNotFoundError:
        raise HubError(f"Not in the local Hub cache and the Hub cannot be reached (offline?) for {repo_id}. Fetch it "
                       "once online, or unset HF_HUB_OFFLINE.") from None
    except e.EntryNotFoundError:
        raise  # the caller knows which file was missing and what to list
    except e.OfflineModeIsEnabled:
        raise HubError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be reached. Unset it to use the Hub.") from None
    except e.LocalTokenNotFoundError:
        raise HubError(f"Not logged in. {LOGIN_HINT}") from None
    except e.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubError(f"The Hub refused the token for {repo_id} (401). {LOGIN_HINT}") from None
        if status == 403:
            raise HubError(f"Your token may not write to {repo_id} (403). Use a token with write access.") from None
        if status == 412:
            raise HubError(f"{repo_id} changed while publishing (someone pushed). Nothing was committed; run publish "
                           "again.") from None
        raise HubError(f"The Hub answered {status} for {repo_id}: {_first_line(exc)}. Try again later.") from None
    except (ConnectionError, TimeoutError, OSError) as exc:
        if isinstance(exc, (HubError, RegistryError)):
            raise
        raise HubError(f"Cannot reach the Hub for {repo_id} ({type(exc).__name__}). Check your network, or set "
                       "HF_HUB_OFFLINE=1 to use cached files.") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def retrying(call, attempts: int = 3, delay: float = 0.5):
    """Run an idempotent Hub call again on transient failures (5xx, dropped connections)."""
    from huggingface_hub import errors as e

    for attempt in range(attempts):
        try:
            return call()
        except e.HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status is None or status < 500 or attempt == attempts - 1:
                raise
        except (ConnectionError, TimeoutError) as exc:
            if isinstance(exc, e.OfflineModeIsEnabled) or attempt == attempts - 1:
                raise
        time.sleep(delay * 2**attempt)


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
) -> PublishResult:
    """Push the chosen models (default: all) of a local registry to a dataset repo in one commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download

    available = [m for m in registry.models() if registry.selected_languages(m)]
    if not available:
        raise RegistryError(f"The registry at {registry.root} has no neurons to publish. Run 'neuronreg compute' first.")
    models = list(dict.fromkeys(models or available))
    missing = [m for m in models if m not in available]
    if missing:
        raise RegistryError(f"No neurons for {', '.join(missing)} in {registry.root} (available: {', '.join(available)}).")

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

        uploads = {path: local for path, local in files.items() if not _unchanged(remote.get(path), local.read_bytes())}
        # Files of a published model that the local registry no longer has (a language dropped
        # from the selection) go, so the repo shows one consistent selection per model.
        deletions = sorted(p for p in remote if p.split("/")[0] in models and p not in files)
        if not uploads and not deletions:
            result = PublishResult(repo_id, False, head)
        else:
            operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in sorted(uploads.items())]
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
        with hub_errors(repo):
            path = retrying(lambda: hf_hub_download(repo, filename, repo_type=REPO_TYPE, revision=revision,
                                                    token=token))
    except e.EntryNotFoundError:
        raise HubError(_missing_entry(repo, model, language, revision, token)) from None
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
    holds it, else from the manifest's default registry repo. ``language`` may be any of its codes."""
    from .manifest import load_manifest

    manifest = manifest or load_manifest()
    try:
        code = manifest.language(language).code
    except Exception:  # a code the manifest does not know may still be in a registry
        code = language
    if repo is None:
        local = registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)
        if local.neuron_path(model, code).is_file():
            table, provenance = local.read_neurons(model, code)
            from .mask import mask_from_table

            return mask_from_table(table, provenance, model, code, {"registry": str(local.root)})
        repo = manifest.registry_repo
    return fetch_mask(model, code, repo=repo, revision=revision, token=token)
