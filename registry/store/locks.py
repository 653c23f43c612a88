"""Locks on the registry, so that two writers never interleave.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic, also on network filesystems where
``flock`` is not) holding who took it: pid, host, command and time. A second writer waits up to its
``timeout`` and then fails with a one-line message naming the holder. A lock whose holder is a
process of THIS host that no longer runs is stale: it is taken over with a warning. A lock held on
another host is never broken automatically (its holder may still run); the message says which file
to delete once you know it has died.

Two kinds are used: a model's lock (``<model>/.lock``) for everything that writes one model's
counts or selections (held for the whole of a ``compute``), and the registry's lock (``.lock``) for
the short commit of a new card, which covers every model.
"""

from __future__ import annotations

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

log = logging.getLogger("neuronreg")
POLL = 0.05  # seconds between attempts


class RegistryBusy(RegistryError):
    """Another process holds the lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: treated as held


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _describe(holder: dict, path: Path) -> str:
    if not holder:
        return f"another process (lock file {path})"
    since = holder.get("since", "?")
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', '?')}, since "
            f"{since})")


@contextmanager
def lock(path: Path, what: str, *, timeout: float = 0.0, command: str | None = None):
    """Hold the lock file ``path`` for the block; RegistryBusy after ``timeout`` seconds of waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv[:3]),
          "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder is None:
                continue  # released between our attempt and the read
            if (holder.get("host") == me["host"] and isinstance(holder.get("pid"), int)
                    and not _alive(holder["pid"])) or (not holder and _age(path) > 30):
                log.warning("Taking over the lock of %s from %s, which no longer runs.", what, _describe(holder, path))
                _remove_if(path, holder)
                continue
            if time.monotonic() >= deadline:
                raise RegistryBusy(f"{what} is being written by {_describe(holder, path)}.", fix="busy",
                                   advice=f"Wait for it to finish; if it died on another machine, delete {path}.")
            time.sleep(POLL)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        _remove_if(path, me)


def _remove_if(path: Path, holder: dict) -> None:
    """Remove the lock file only while it still holds ``holder`` (never someone else's lock)."""
    if _holder(path) == holder:
        path.unlink(missing_ok=True)
