"""Writing files so that nothing is ever half-written, and names that cannot escape their folder.

Every file neuronreg writes goes to a temporary name in the target's folder and is renamed into
place (``os.replace`` is atomic on one filesystem), so a reader sees the old file or the new one.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import RegistryError

# A model or language name used as one path part: no separators, no '..', no leading dot. \A and \Z,
# not ^ and $: '$' also matches before a final newline, so "x\n" would pass a `match`.
SAFE_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
# Far below the 255 bytes a file name may have, leaving room for what names are built into
# ('<lang>.parquet', '.<name>.<random>.tmp') and for '<model>-<selection>' config names.
MAX_NAME = 200
TEMP_SUFFIX = ".tmp"


def safe_name(name: str, what: str) -> str:
    """``name`` itself when it can be one folder or file name inside a registry, else RegistryError."""
    if isinstance(name, str) and len(name) > MAX_NAME:
        raise RegistryError(f"{what} name {name[:40]!r}... is {len(name)} characters long; a registry name has at "
                            f"most {MAX_NAME}.")
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise RegistryError(f"{what} name {name!r} cannot be a registry path: use letters, digits, '-', '_' and '.' "
                            "(not '..'), starting with a letter or digit.")
    return name


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def temp_beside(target: Path, private: bool = False) -> str:
    """A new empty file next to ``target``.

    ``mkstemp`` makes files 0600; a registry is shared and served, so the user's umask decides, as
    for any file they create (``private`` keeps 0600, for files that hold secrets).
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    if not private:
        os.chmod(tmp, 0o666 & ~umask())
    return tmp


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``target`` that replaces it only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(target)
    try:
        yield Path(tmp)
        # Some writers (safetensors) replace the file they were given: set the mode on what is there.
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def atomic_write_json(target: str | os.PathLike, data) -> Path:
    """JSON for people and programs alike: indented, non-ASCII text kept, a final newline."""
    return atomic_write_text(target, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


@contextmanager
def atomic_csv(target: str | os.PathLike) -> Iterator:
    """A ``csv.writer`` whose file replaces ``target`` only when the block ends without an error."""
    with atomic_path(target) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        yield csv.writer(f)


@contextmanager
def atomic_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``target`` that replaces it (and whatever it held) only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        # Whatever wrote the files (safetensors makes them 0600), they follow the umask like any other.
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old{TEMP_SUFFIX}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def output_folder(folder: str | os.PathLike) -> Path:
    """An output folder, created and checked writable (before an hour of work, not after)."""
    from .errors import NeuronregError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise NeuronregError(f"Cannot write to {folder}: {exc.strerror or exc}.", fix="out",
                             advice="Choose another output folder.") from exc
    return folder


def inside(root: Path, path: Path) -> bool:
    """Whether ``path``, with every link followed, lies inside ``root`` (also with links followed)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def write_parquet(table, path: Path) -> None:
    """Write a Parquet file; an empty table gets no row group at all, which `datasets` reads as 0 rows
    (a zero-row group makes it fail on the whole config, not only on that split)."""
    import pyarrow.parquet as pq

    if table.num_rows == 0:
        pq.ParquetWriter(path, table.schema, compression="zstd").close()
    else:
        pq.write_table(table, path, compression="zstd")
