"""Locks on the registry, so that two writers never interleave.

A lock is a file holding who took it: pid, host, command and time. It is written whole under a
temporary name and then hard-linked into place, which fails when the lock exists (``O_EXCL``'s
guarantee, also on network filesystems where ``flock`` is not), so no lock is ever empty or half
written. A second writer waits up to its ``timeout`` and then fails with a one-line message naming
the holder. A lock is stale, and taken over with a warning, when its holder is a process of THIS
host that no longer runs, or when it holds no valid holder at all (empty, damaged, a pid of 0, -1,
a string or one no system has). A lock held on another host is never broken automatically (its
holder may still run); the message says which file to delete once you know it has died.

Two kinds are used: a model's lock (``<model>/.lock``) for everything that writes one model's
counts or selections (held for the whole of a ``compute``), and the registry's lock (``.lock``) for
the short commit of a new card, which covers every model.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from ..errors import RegistryError
from ..files import temp_beside
from ..limits import load_json

log = logging.getLogger("neuronreg")
POLL = 0.05  # seconds between attempts


class RegistryBusy(RegistryError):
    """Another process holds the lock."""


INVALID_GRACE = 2.0  # seconds an empty or damaged lock is waited on before it is taken over
MAX_PID = (1 << 22) - 1  # Linux's largest pid_max; other systems stay well below it
INVALID = {}  # what a lock holds when it is not a lock neuronreg wrote (empty, damaged, impossible values)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder(path: Path) -> dict | None:
    """Who holds the lock: its record; None when there is no lock; INVALID when what is there cannot be a
    holder (a lock is written whole, so an empty or damaged one is no writer's, see :func:`_create`)."""
    try:
        data = load_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return INVALID
    if not isinstance(data, dict):
        return INVALID
    pid, host = data.get("pid"), data.get("host")
    # pid 0 and -1 would make kill() signal a whole group, and 10**23 overflow it: no holder has those.
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= MAX_PID or not isinstance(host, str):
        return INVALID
    return data


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _describe(holder: dict, path: Path) -> str:
    if holder is INVALID:
        return f"another process (lock file {path})"
    since = holder.get("since", "?")
    return (f"pid {holder['pid']} on {holder['host']} ({holder.get('command', '?')}, since {since})")


# errno values of a filesystem without hard links (some FUSE and SMB mounts)
NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def _create(path: Path, content: str) -> bool:
    """Create the lock file ``path`` holding ``content``, all at once: True, or False when it exists.

    The content goes to a temporary file first, which is then hard-linked to ``path`` (the link fails if
    ``path`` exists: ``O_EXCL``'s guarantee). A full disk, or a kill, while writing leaves no lock at
    all, never an empty one. Where the filesystem has no hard links, the file is created with
    ``O_EXCL`` and written, and removed again if the write fails.
    """
    data = content.encode("utf-8")
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp = Path(temp_beside(path))
        except FileNotFoundError:  # the folder went meanwhile (a failed run removing its empty folder)
            continue
        try:
            _write(os.open(tmp, os.O_WRONLY), data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            except FileNotFoundError:  # the temporary file was tidied away by a write's clean-up
                continue
            except OSError as exc:
                if exc.errno not in NO_LINKS:
                    raise
        finally:
            tmp.unlink(missing_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            _write(fd, data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return True


def _write(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` and close it (closed also when a write fails)."""
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


@contextmanager
def lock(path: Path, what: str, *, timeout: float = 0.0, command: str | None = None):
    """Hold the lock file ``path`` for the block; RegistryBusy after ``timeout`` seconds of waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv[:3]),
          "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    deadline = time.monotonic() + timeout
    invalid_since = None
    while not _create(path, json.dumps(me)):
        holder = _holder(path)
        if holder is None:
            continue  # released between our attempt and the read
        if holder is INVALID:
            # Ours are written whole, but one created on a filesystem without hard links is empty for an
            # instant: an invalid lock is taken over once it has been so for INVALID_GRACE, no sooner.
            invalid_since = invalid_since or time.monotonic()
            if time.monotonic() - invalid_since < INVALID_GRACE and _age(path) < INVALID_GRACE:
                time.sleep(POLL)
                continue
        else:
            invalid_since = None
        if holder is INVALID or (holder["host"] == me["host"] and not _alive(holder["pid"])):
            why = "whose lock file holds no valid pid and host" if holder is INVALID else "which no longer runs"
            log.warning("Taking over the lock of %s from %s, %s.", what, _describe(holder, path), why)
            _remove_if(path, holder)
            continue
        if time.monotonic() >= deadline:
            raise RegistryBusy(f"{what} is being written by {_describe(holder, path)}.", fix="busy",
                               advice=f"Wait for it to finish; if it died on another machine, delete {path}.")
        time.sleep(POLL)
    try:
        yield
    finally:
        _remove_if(path, me)


def _remove_if(path: Path, holder: dict) -> None:
    """Remove the lock file only while it still holds ``holder`` (never someone else's lock)."""
    if _holder(path) == holder:
        path.unlink(missing_ok=True)


def in_use(registry: Path) -> str | None:
    """Who holds a lock in the registry folder ``registry`` (its own, or a model's): a description of a
    holder that may still run, or None (no lock, or only stale ones: of a process of this host that no
    longer runs, or holding no valid holder)."""
    me = socket.gethostname()
    for path in [registry / ".lock", *registry.glob("*/.lock")]:
        holder = _holder(path)
        if holder is None or holder is INVALID or (holder["host"] == me and not _alive(holder["pid"])):
            continue
        return _describe(holder, path)
    return None
