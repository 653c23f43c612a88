"""Calling the Hugging Face Hub: huggingface_hub's exceptions as one-line neuronreg errors, and
retries of idempotent calls. Used by every module that talks to the Hub (loading models, streaming
corpora, publishing, fetching, releasing). Tokens never appear in a message."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import HubError, NeuronregError

log = logging.getLogger("neuronreg")


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "h11", "h2")


def is_network_error(exc: BaseException) -> bool:
    """A dropped connection or time-out, from the socket or any HTTP library the Hub client uses
    (httpx, or its successor httpx2: matched by module, so either works)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    mro = type(exc).__mro__
    if any("HTTPStatus" in cls.__name__ or cls.__module__.startswith("huggingface_hub") for cls in mro):
        return False  # an answer from the server, not a lost connection
    return any(cls.__module__.split(".")[0].rstrip("0123456789") in NETWORK_MODULES for cls in mro)


def offline_mode() -> bool:
    """Whether HF_HUB_OFFLINE is set, by huggingface_hub's own rule (its constant, read at import, or the
    variable as it is now, for a process that set it later)."""
    import os

    from huggingface_hub import is_offline_mode
    from huggingface_hub.constants import _is_true

    return is_offline_mode() or _is_true(os.environ.get("HF_HUB_OFFLINE"))


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def hub_error(exc: BaseException, repo_id: str, what: str = "the Hub") -> HubError | None:
    """The HubError for an exception huggingface_hub (or the network below it) raised; None if it is
    not such an exception."""
    try:
        from huggingface_hub import errors as e
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    if isinstance(exc, NeuronregError):
        return None
    if isinstance(exc, e.GatedRepoError):
        return HubError(f"{repo_id} is gated: request access on its Hub page, then use a token with access.",
                        fix="login", advice="Pass token= or set HF_TOKEN.")
    if isinstance(exc, e.RepositoryNotFoundError):
        return HubError(f"{repo_id} was not found on {what}, or it is private and your token cannot see it. Check "
                        "the name.", fix="login", advice="Pass token= or set HF_TOKEN.")
    if isinstance(exc, e.RevisionNotFoundError):
        return HubError(f"{repo_id} has no such revision (branch, tag or commit).", fix="revision")
    if isinstance(exc, e.EntryNotFoundError) and not isinstance(exc, e.LocalEntryNotFoundError):
        return HubError(f"{repo_id} has no such file: {first_line(exc)}")
    if isinstance(exc, e.LocalEntryNotFoundError):
        if offline_mode():
            return HubError(f"{repo_id} is not in the local Hub cache, and HF_HUB_OFFLINE is set.", fix="offline",
                            advice="Fetch it once with HF_HUB_OFFLINE unset.")
        return HubError(f"{repo_id} is not in the local Hub cache and the Hub cannot be reached.", fix="network",
                        advice="Check your network.")
    if isinstance(exc, e.OfflineModeIsEnabled):
        return HubError(f"HF_HUB_OFFLINE is set, so {repo_id} cannot be reached on the Hub.", fix="offline",
                        advice="Unset HF_HUB_OFFLINE to use the Hub.")
    if isinstance(exc, e.LocalTokenNotFoundError):
        return HubError("Not logged in to the Hub.", fix="login", advice="Pass token= or set HF_TOKEN.")
    if isinstance(exc, e.HFValidationError):
        return HubError(f"{repo_id!r} is not a valid Hub repo id or revision: {first_line(exc)}")
    if isinstance(exc, e.HfHubHTTPError):
        status = _status(exc)
        if status == 401:
            return HubError(f"The Hub refused the token for {repo_id} (401).", fix="login",
                            advice="Pass token= or set HF_TOKEN.")
        if status == 403:
            return HubError(f"Your token may not write to {repo_id} (403).", fix="write_token",
                            advice="Use a token with write access.")
        if status == 412:
            return HubError(f"{repo_id} changed while publishing (someone pushed). Nothing was committed.",
                            fix="again", advice="Publish again.")
        return HubError(f"The Hub answered {status} for {repo_id}: {first_line(exc)}.", fix="later",
                        advice="Try again later.")
    if isinstance(exc, RuntimeError) and str(exc).startswith("Error while uploading"):
        # huggingface_hub wraps a failed file upload; the cause says why
        cause = hub_error(exc.__cause__, repo_id, what) if exc.__cause__ is not None else None
        why = cause.message if cause else first_line(exc.__cause__ or exc)
        return HubError(f"{first_line(exc).rstrip('.')}: {why}", fix=cause.fix if cause else "later")
    if isinstance(exc, ValueError) and str(exc).startswith("Invalid metadata"):
        # huggingface_hub's own check of a card before a commit (the Hub's validate-yaml answered no)
        return HubError(f"The Hub refused the card's metadata for {repo_id}: {first_line(exc)}", fix="later")
    if is_network_error(exc):
        return HubError(f"Cannot reach the Hub for {repo_id} ({type(exc).__name__}).", fix="network",
                        advice="Check your network, or set HF_HUB_OFFLINE=1 to use cached files.")
    return None


@contextmanager
def hub_errors(repo_id: str, what: str = "the Hub"):
    """Inside the block, huggingface_hub's exceptions become one-line HubErrors (chained)."""
    try:
        yield
    except Exception as exc:
        mapped = hub_error(exc, repo_id, what)
        if mapped is None:
            raise
        raise mapped from exc


def _transient() -> tuple[tuple[int, ...], tuple[type[BaseException], ...]]:
    """The status codes and exceptions huggingface_hub's own backoff retries (its uploads use it), so that
    what neuronreg retries cannot drift from what the Hub client does; its defaults where they move."""
    try:
        from huggingface_hub.utils import _http

        return tuple(_http._DEFAULT_RETRY_ON_STATUS_CODES), tuple(_http._DEFAULT_RETRY_ON_EXCEPTIONS)
    except (ImportError, AttributeError):  # pragma: no cover - another huggingface_hub layout
        return (408, 429, 500, 502, 503, 504), ()


def retrying(call, attempts: int = 3, delay: float = 0.5):
    """Run an idempotent Hub call (a listing, a download) again on what huggingface_hub's backoff treats
    as transient (408, 429, 5xx; time-outs and dropped connections), waiting ``delay`` x 2^attempt; the
    client backs off by itself only for uploads."""
    from huggingface_hub import errors as e

    codes, exceptions = _transient()
    for attempt in range(attempts):
        try:
            return call()
        except e.HfHubHTTPError as exc:
            if _status(exc) not in codes or attempt == attempts - 1:
                raise
        except Exception as exc:
            if isinstance(exc, e.OfflineModeIsEnabled) or attempt == attempts - 1 or not (
                    isinstance(exc, exceptions) or is_network_error(exc)):
                raise
        time.sleep(delay * 2**attempt)


def check_repo_id(repo_id: str) -> None:
    """A one-line HubError for a repo id the Hub would refuse; called before any long work."""
    from huggingface_hub.utils import validate_repo_id

    with hub_errors(repo_id):
        validate_repo_id(repo_id)


@contextmanager
def repo_for_commit(api, repo_id: str, repo_type: str, *, private: bool = False, what: str = "this commit"):
    """The repo ``repo_id``, created (``private`` or not) when it does not exist yet; if the block then
    fails, a repo created here is deleted again, so a failed publish or release leaves no empty repo
    behind. Yields whether it was created."""
    from huggingface_hub import errors as e

    created = False
    with hub_errors(repo_id):
        try:
            retrying(lambda: api.repo_info(repo_id, repo_type=repo_type))
        except Exception as exc:
            if not isinstance(exc, e.RepositoryNotFoundError) or isinstance(exc, e.GatedRepoError):
                raise
            api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
            created = True
    try:
        yield created
    except BaseException:
        if created:
            try:
                api.delete_repo(repo_id, repo_type=repo_type)
            except Exception as exc:  # the error that matters is the one being raised
                log.warning("Could not delete the repo %s created for %s (%s).", repo_id, what, type(exc).__name__)
        raise


def check_new_tag(api, repo_id: str, repo_type: str, tag: str | None) -> dict[str, str]:
    """The repo's tags (name -> commit) when ``tag`` is asked for; checked BEFORE committing, so that a
    command refused for its tag has changed nothing."""
    if not tag:
        return {}
    with hub_errors(repo_id):
        return {t.name: t.target_commit for t in api.list_repo_refs(repo_id, repo_type=repo_type).tags}


# -- one commit path -------------------------------------------------------------------------------------
# git check-ref-format: no control characters, space, ~ ^ : ? * [ \, no "..", "@{", "//", no component that
# starts with "." or ends with ".lock", not "@", not starting or ending with "/" or ending with ".".
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|(^|/)\.|\.lock(/|$)|^/|/$|\.$|^@$")


def check_ref_name(name: str | None, what: str) -> None:
    """HubError unless ``name`` is a branch or tag name git (and so the Hub) accepts; a tag may not be
    ``main`` or look like a commit id (both would be ambiguous). Checked before anything is created."""
    if name is None:
        return
    if not isinstance(name, str) or not name or len(name) > 255 or _BAD_REF.search(name):
        raise HubError(f"{name!r} is not a valid {what} name (git's rules: no spaces, '..', '~', '^', ':', '?', '*', "
                       "'[', '\\', control characters, leading '/' or '.', or trailing '.lock').", fix=what)
    if what == "tag" and (name == "main" or re.fullmatch(r"[0-9a-f]{40}", name)):
        raise HubError(f"{name!r} cannot be a tag: it would be read as a branch or a commit.", fix="tag")


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_sha256(remote) -> str | None:
    """The sha256 the repo gives a file it stores in LFS (a RepoSibling with metadata), or None."""
    lfs = getattr(remote, "lfs", None)
    if not lfs:
        return None
    return lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)


def same_content(remote, local: Path | bytes) -> bool:
    """Whether a repo file (a RepoSibling with metadata) holds exactly ``local`` (a file's bytes, or bytes):
    by sha256 for LFS files, by git blob id otherwise."""
    if remote is None:
        return False
    data = local if isinstance(local, bytes) else Path(local).read_bytes()
    sha = lfs_sha256(remote)
    if sha:
        return sha == hashlib.sha256(data).hexdigest()
    return getattr(remote, "blob_id", None) == _git_blob_sha1(data)


class UploadPlan:
    """Which of ``files`` (repo path -> local file) differ from the repo's ``remote`` files (path ->
    RepoSibling with metadata), and how many bytes sending them takes: each content once, and nothing
    the repo already stores under any path (the Hub keeps LFS files by sha256)."""

    def __init__(self, files: dict[str, Path], remote: dict):
        stored = {sha for sibling in remote.values() if (sha := lfs_sha256(sibling))}
        self.uploads: dict[str, Path] = {}
        self.present: list[str] = []
        self.present_bytes = self.sent_bytes = 0
        self.contents: dict[str, list[str]] = {}  # sha256 -> the paths to upload that hold it
        for path, src in sorted(files.items()):
            data = Path(src).read_bytes()
            if same_content(remote.get(path), data):
                self.present.append(path)
                self.present_bytes += len(data)
                continue
            self.uploads[path] = src
            sha = hashlib.sha256(data).hexdigest()
            if sha not in stored and sha not in self.contents:
                self.sent_bytes += len(data)
            self.contents.setdefault(sha, []).append(path)

    def first_of_repeated(self) -> list[str]:
        """One path of each content that several uploads share: sent on its own first, so the commit's
        other copies find it stored and it travels once."""
        return [paths[0] for paths in self.contents.values() if len(paths) > 1]


@dataclass
class CommitTarget:
    """Where a commit goes, as found before anything changed (see :func:`commit_to`)."""

    api: object
    repo_id: str
    repo_type: str
    revision: str | None  # the branch (None: main)
    create_pr: bool
    tag: str | None
    head: str  # the commit the change is planned on (the branch's head, or main's for a new branch)
    files: dict  # path -> RepoSibling (with metadata) at head
    branch_exists: bool
    tags: dict[str, str] = field(default_factory=dict)  # the repo's tags, name -> commit
    result: str | None = None  # the commit the block made, or head when nothing changed
    url: str | None = None
    pr_url: str | None = None

    def commit(self, operations: list, message: str, *, first: list = ()):
        """ONE ``create_commit`` of ``operations`` whose parent is ``head`` (someone who pushed in between makes
        it fail, nothing committed); a branch that does not exist is created only now, from ``head``. A tag
        that exists is refused here, before committing, unless it is on ``head`` and nothing changes.
        ``first``: additions among ``operations`` whose content is uploaded before the commit (see
        :meth:`UploadPlan.first_of_repeated`)."""
        if self.tag in self.tags and (operations or self.tags[self.tag] != self.head):
            raise HubError(f"{self.repo_id} already has the tag {self.tag!r} (on another commit); nothing was "
                           "committed.", fix="tag", advice="Choose another tag.")
        if not operations:
            self.result = self.head
            return None
        with hub_errors(self.repo_id):
            if self.revision and not self.create_pr and not self.branch_exists:
                self.api.create_branch(self.repo_id, repo_type=self.repo_type, branch=self.revision,
                                       revision=self.head, exist_ok=True)
            if first:
                self.api.preupload_lfs_files(self.repo_id, list(first), repo_type=self.repo_type,
                                             revision=self.revision, create_pr=self.create_pr)
            info = self.api.create_commit(self.repo_id, operations, repo_type=self.repo_type, revision=self.revision,
                                          create_pr=self.create_pr, parent_commit=self.head, commit_message=message)
        self.result, self.url, self.pr_url = info.oid, info.commit_url, info.pr_url
        return info


@contextmanager
def commit_to(api, repo_id: str, repo_type: str, *, revision: str | None = None, create_pr: bool = False,
              tag: str | None = None, private: bool = False, what: str = "this commit"):
    """The one way neuronreg commits to the Hub (publish and release): names checked as git checks them,
    the repo created when missing (and deleted again if the block fails), the branch's head and files
    read, the tag checked BEFORE anything is committed; yields a :class:`CommitTarget` whose ``commit``
    makes the one commit; afterwards the result is tagged (a tag already on it is left as it is, so
    running the same command again after a failed tag only adds the tag)."""
    from huggingface_hub import errors as e

    check_ref_name(revision, "revision")
    check_ref_name(tag, "tag")
    if revision == "main":
        revision = None
    with repo_for_commit(api, repo_id, repo_type, private=private, what=what):
        branch_exists = True
        with hub_errors(repo_id):
            try:
                info = retrying(lambda: api.repo_info(repo_id, repo_type=repo_type, revision=revision,
                                                      files_metadata=True))
            except e.RevisionNotFoundError:
                if not revision:
                    raise
                branch_exists = False  # created from main's head, and only if something is committed
                info = retrying(lambda: api.repo_info(repo_id, repo_type=repo_type, files_metadata=True))
        tags = check_new_tag(api, repo_id, repo_type, tag)
        target = CommitTarget(api, repo_id, repo_type, revision, create_pr, tag, info.sha,
                              {s.rfilename: s for s in (info.siblings or [])}, branch_exists, tags)
        yield target
        if tag and target.result and tags.get(tag) != target.result:
            with hub_errors(repo_id):
                api.create_tag(repo_id, tag=tag, revision=target.result, repo_type=repo_type, exist_ok=False)
