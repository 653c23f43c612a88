"""Calling the Hugging Face Hub: huggingface_hub's exceptions as one-line neuronreg errors, and
retries of idempotent calls. Used by every module that talks to the Hub (loading models, streaming
corpora, publishing, fetching, releasing). Tokens never appear in a message."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

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
        import os

        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
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


def retrying(call, attempts: int = 3, delay: float = 0.5):
    """Run an idempotent Hub call again on transient failures (5xx, dropped connections)."""
    from huggingface_hub import errors as e

    for attempt in range(attempts):
        try:
            return call()
        except e.HfHubHTTPError as exc:
            status = _status(exc)
            if status is None or status < 500 or attempt == attempts - 1:
                raise
        except Exception as exc:
            if not is_network_error(exc) or isinstance(exc, e.OfflineModeIsEnabled) or attempt == attempts - 1:
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
