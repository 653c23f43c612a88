"""Where the local registry lives by default, and moving it from where neuronreg kept it before.

The registry holds counts that took GPU-hours: it belongs in the user's data folder (platformdirs'
``user_data_dir``: ``$XDG_DATA_HOME/neuronreg/registry``, by default ``~/.local/share/neuronreg/registry``
on Linux; ``~/Library/Application Support/neuronreg/registry`` on macOS;
``%LOCALAPPDATA%\\neuronreg\\registry`` on Windows), not in a cache folder, which cache cleaners and
clusters' ``XDG_CACHE_HOME`` policies empty. neuronreg up to 0.1 kept it in
``$XDG_CACHE_HOME/neuronreg/registry`` (``~/.cache/...``); the first use of the default moves a registry
found there, once, and says so on stderr. ``$NEURONREG_REGISTRY`` (or a folder given to
``LocalRegistry``) is used as it is, and nothing is moved then. Caches (downloaded models, hashes of
local weights) stay in the cache folder.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ..files import TEMP_SUFFIX
from .locks import in_use

log = logging.getLogger("neuronreg")

REGISTRY_ENV = "NEURONREG_REGISTRY"
APP = "neuronreg"


def data_registry() -> Path:
    """The default registry: ``registry`` in the user's data folder for neuronreg."""
    from platformdirs import user_data_path

    return user_data_path(APP, appauthor=False) / "registry"


def legacy_registry() -> Path:
    """Where neuronreg up to 0.1 kept the default registry: the user's cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / APP / "registry"


def default_registry() -> Path:
    """``$NEURONREG_REGISTRY`` when set; else :func:`data_registry`, with a registry found at
    :func:`legacy_registry` moved there first (see :func:`adopt`)."""
    if os.environ.get(REGISTRY_ENV):
        return Path(os.environ[REGISTRY_ENV]).expanduser()
    return adopt(legacy_registry(), data_registry())


def _holds_something(path: Path) -> bool:
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return False


def adopt(old: Path, new: Path) -> Path:
    """The registry folder to use: ``new``, after moving ``old`` there when ``old`` holds anything and
    ``new`` does not (an empty folder counts as nothing).

    The move is one rename on one filesystem; across filesystems, a copy beside ``new`` renamed into
    place, then ``old`` renamed away and deleted, so neither path ever holds half a registry. While a
    neuronreg process holds a lock in ``old`` (a ``compute`` of an older version still running), or when
    the move fails, ``old`` is used where it is, with a warning, and the move is tried again next time."""
    if not _holds_something(old) or _holds_something(new) or new.is_symlink():
        return new
    holder = in_use(old)
    if holder:
        log.warning("The registry at %s is in use by %s; using it there this time (it moves to %s once no "
                    "neuronreg process writes to it).", old, holder, new)
        return old
    try:
        _move(old, new)
    except OSError as exc:
        if _holds_something(new):  # another process moved it meanwhile (new only ever appears whole)
            return new
        log.warning("Could not move the registry from %s to %s (%s); using it where it is.", old, new, _why(exc))
        return old
    log.warning("Moved the registry from %s to %s: a cache folder is no place for counts that took GPU-hours "
                "(set %s to keep it elsewhere).", old, new, REGISTRY_ENV)
    return new


def _why(exc: OSError) -> str:
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        source, _, reason = exc.args[0][0]  # copytree's first failure: (source, destination, reason)
        return f"{source}: {reason}"
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc.strerror or exc)


def _move(old: Path, new: Path) -> None:
    new.parent.mkdir(parents=True, exist_ok=True)
    if new.is_dir():  # empty (checked by the caller): rmdir, so that a rename or a link can take its place
        new.rmdir()
    if old.is_symlink():  # a registry kept elsewhere through a link: link the new place there too
        os.symlink(os.path.realpath(old), new, target_is_directory=True)
        old.unlink()
        return
    try:
        os.rename(old, new)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = Path(tempfile.mkdtemp(prefix=f".{new.name}.", suffix=TEMP_SUFFIX, dir=new.parent))
    try:
        shutil.copytree(old, tmp, symlinks=True, dirs_exist_ok=True)
        shutil.copystat(old, tmp)
        os.rename(tmp, new)  # fails if another process put a registry there meanwhile: theirs stays
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # The copy is in place; the original leaves its path in one rename, then goes.
    gone = Path(tempfile.mkdtemp(prefix=f".{old.name}.moved.", suffix=TEMP_SUFFIX, dir=old.parent))
    os.rename(old, gone / old.name)
    shutil.rmtree(gone, ignore_errors=True)
