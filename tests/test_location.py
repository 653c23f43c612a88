"""Where the registry lives by default (the user data folder, not the cache) and the one move from where
neuronreg kept it before: once, whole, said on stderr, never when the user named a folder."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import neuronreg.store.location as location
from neuronreg.store.local import LocalRegistry
from neuronreg.store.locks import lock

from support.cli import run

LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the XDG folders are Linux's")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """HOME and the XDG folders in tmp_path, $NEURONREG_REGISTRY unset: the default registry is in play."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NEURONREG_REGISTRY", raising=False)
    return tmp_path


class Said(logging.Handler):
    """What the library said on its logger (attached to it directly: the CLI's setup stops propagation)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture
def said():
    handler = Said()
    logger = logging.getLogger("neuronreg")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.WARNING
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def old_default(root: Path) -> Path:
    return root / "cache" / "neuronreg" / "registry"


def new_default(root: Path) -> Path:
    return root / "data" / "neuronreg" / "registry"


def plant(folder: Path) -> dict[str, bytes]:
    """A registry-shaped tree (card, counts, a selection, a checkpoint in progress); its files' bytes."""
    files = {"README.md": b"---\nconfigs: []\n---\n# card\n", "m/counts/en.parquet": os.urandom(3000),
             "m/counts/sw.parquet": os.urandom(5000), "m/top1/v1/sw.parquet": os.urandom(700),
             "m/.partial/de.safetensors": os.urandom(1200)}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every file's bytes, every link's target, by path."""
    return {p.relative_to(folder).as_posix(): os.readlink(p) if p.is_symlink() else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() or p.is_symlink()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@LINUX
def test_the_default_is_the_user_data_folder(home, monkeypatch):
    assert location.default_registry() == new_default(home)
    assert LocalRegistry().root == new_default(home)
    monkeypatch.delenv("XDG_DATA_HOME")
    assert location.default_registry() == home / "home" / ".local" / "share" / "neuronreg" / "registry"
    monkeypatch.setenv("NEURONREG_REGISTRY", "~/mine")
    assert location.default_registry() == home / "home" / "mine"
    assert not (home / "data").exists() and not (home / "cache").exists()  # asking moves or creates nothing


@LINUX
def test_an_old_default_registry_moves_once_whole_and_says_so(home, said):
    files = plant(old_default(home))
    assert LocalRegistry().root == new_default(home)
    assert tree(new_default(home)) == files and not old_default(home).exists()
    assert said.lines == [
        f"Moved the registry from {old_default(home)} to {new_default(home)}: a cache folder is no place for counts "
        "that took GPU-hours (set NEURONREG_REGISTRY to keep it elsewhere)."]
    said.lines.clear()
    assert LocalRegistry().root == new_default(home)
    assert said.lines == []


@LINUX
def test_nothing_moves_when_the_user_names_a_folder(home, monkeypatch, said):
    files = plant(old_default(home))
    assert LocalRegistry(old_default(home)).root == old_default(home)
    assert LocalRegistry(home / "elsewhere").root == home / "elsewhere"
    monkeypatch.setenv("NEURONREG_REGISTRY", str(old_default(home)))
    assert LocalRegistry().root == old_default(home)
    monkeypatch.setenv("NEURONREG_REGISTRY", str(home / "elsewhere"))
    assert location.default_registry() == home / "elsewhere"
    assert tree(old_default(home)) == files and not new_default(home).exists() and said.lines == []


@LINUX
def test_a_registry_at_the_new_place_wins_and_the_old_one_stays(home):
    old, new = plant(old_default(home)), plant(new_default(home))
    old["README.md"] = b"old card"
    (old_default(home) / "README.md").write_bytes(old["README.md"])
    assert location.default_registry() == new_default(home)
    assert tree(old_default(home)) == old and tree(new_default(home)) == new
    # An empty folder at the new place holds nothing: the old registry moves into its place.
    shutil.rmtree(new_default(home))
    new_default(home).mkdir()
    assert location.default_registry() == new_default(home) and tree(new_default(home)) == old


def other_filesystem(path: Path) -> Path | None:
    """A folder on another filesystem than ``path`` (tmpfs /dev/shm), or None."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) or shm.stat().st_dev == path.stat().st_dev:
        return None
    return Path(tempfile.mkdtemp(prefix="neuronreg-test-", dir=shm))


@LINUX
def test_across_filesystems_it_is_copied_then_renamed_and_never_half(home, monkeypatch, said):
    other = other_filesystem(home)
    if other is None:
        pytest.skip("no second filesystem here")
    try:
        monkeypatch.setenv("XDG_DATA_HOME", str(other))
        new = other / "neuronreg" / "registry"
        plant(old_default(home))
        os.symlink("counts/en.parquet", old_default(home) / "m" / "link.parquet")  # links stay links
        os.chmod(old_default(home) / "m" / "counts" / "sw.parquet", 0o640)
        files = tree(old_default(home))

        # A copy that fails (here on a named pipe, which is no registry file) leaves the new place as it was
        # and the old registry whole.
        os.mkfifo(old_default(home) / "m" / "pipe")
        assert location.default_registry() == old_default(home)
        assert not new.exists() and leftovers(new.parent) == [] and tree(old_default(home)) == files
        assert said.lines == [f"Could not move the registry from {old_default(home)} to {new} "
                              f"({old_default(home) / 'm' / 'pipe'}: `{old_default(home) / 'm' / 'pipe'}` is a named "
                              "pipe); using it where it is."]
        (old_default(home) / "m" / "pipe").unlink()

        said.lines.clear()
        assert location.default_registry() == new
        assert "Moved the registry" in said.text
        assert tree(new) == files and not old_default(home).exists()
        assert os.readlink(new / "m" / "link.parquet") == "counts/en.parquet"
        assert (new / "m" / "counts" / "sw.parquet").stat().st_mode & 0o777 == 0o640
        assert leftovers(new.parent) == [] and leftovers(old_default(home).parent) == []
    finally:
        shutil.rmtree(other, ignore_errors=True)


@LINUX
def test_a_registry_in_use_is_not_moved_from_under_its_writer(home, said):
    files = plant(old_default(home))
    with lock(old_default(home) / "m" / ".lock", "model m", command="neuronreg compute m"):
        assert location.default_registry() == old_default(home)
        assert "in use by pid" in said.text and "neuronreg compute m" in said.text
        assert not new_default(home).exists()
    # A lock its process left behind (that pid no longer runs) does not hold the move up.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (old_default(home) / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert location.default_registry() == new_default(home)
    assert tree(new_default(home)) == {**files, ".lock": (new_default(home) / ".lock").read_bytes()}


@LINUX
def test_a_linked_registry_is_linked_from_the_new_place(home):
    target = home / "big-disk" / "registry"
    files = plant(target)
    old_default(home).parent.mkdir(parents=True)
    os.symlink(target, old_default(home))
    assert location.default_registry() == new_default(home)
    assert new_default(home).is_symlink() and new_default(home).resolve() == target.resolve()
    assert not os.path.lexists(old_default(home)) and tree(target) == files


MOVE = "from neuronreg.store.location import default_registry\nprint(default_registry())\n"


@LINUX
def test_two_processes_starting_at_once_move_it_once(home):
    files = plant(old_default(home))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", MOVE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    assert [out.strip() for out, _ in outs] == [str(new_default(home))] * 3
    assert sum("Moved the registry" in err for _, err in outs) == 1
    assert tree(new_default(home)) == files and not old_default(home).exists()


@LINUX
def test_the_cli_moves_it_and_keeps_caches_in_the_cache(home, planted, monkeypatch):
    old = old_default(home)
    run("compute", planted / "model", "en", "ru", "--corpus", planted / "texts", "--tokens", 600, "--seq-len", 64,
        "--top-rate", 0.05, "--registry", old, "-q")
    before = tree(old)
    # Named with --registry or $NEURONREG_REGISTRY, the old folder is used where it is.
    assert "model" in run("ls", "--registry", old).stdout
    monkeypatch.setenv("NEURONREG_REGISTRY", str(old))
    assert "model" in run("show", "model", "ru").stdout
    monkeypatch.delenv("NEURONREG_REGISTRY")
    assert tree(old) == before and not new_default(home).exists()
    # A process of its own: what a user sees on stderr, with no logging set up by an earlier command.
    first = subprocess.run([sys.executable, "-m", "neuronreg", "ls"], capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert [line for line in first.stderr.splitlines() if "registry" in line] == [
        f"Moved the registry from {old} to {new_default(home)}: a cache folder is no place for counts that took "
        "GPU-hours (set NEURONREG_REGISTRY to keep it elsewhere)."]
    assert "model" in first.stdout and not old.exists() and tree(new_default(home)) == before
    again = run("show", "model", "ru")
    assert "Moved" not in again.stderr and "ru" in again.stdout
    # The hashes of local weights are a cache: they stay in the cache folder.
    assert (home / "cache" / "neuronreg" / "file-hashes.json").is_file()
    assert not any(p.name == "file-hashes.json" for p in (home / "data").rglob("*"))
