"""Counting across processes (gloo on CPU) equals one process, bit for bit, and resumes per rank."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch.multiprocessing as mp
from click.testing import CliRunner

from neuronreg.cli import cli

from support.tiny import PLANTED, planted_model, save_model, write_corpus

ARGS = ["--tokens", "3k", "--seq-len", "64", "--batch-size", "2", "--checkpoint-tokens", "128", "-q"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_model(planted_model(PLANTED), root / "model")
    write_corpus(root / "texts", {"en": "en", "ru": "ru"})
    single = root / "single"
    result = CliRunner().invoke(cli, ["compute", str(root / "model"), "en", "ru", "--corpus", str(root / "texts"),
                                      "--registry", str(single), *ARGS])
    assert result.exit_code == 0, result.output
    return root


def counts(registry: Path, lang: str) -> list[int]:
    return pq.read_table(registry / "model" / "counts" / f"{lang}.parquet")["count"].to_pylist()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(setup, tmp_path):
    reg = tmp_path / "reg"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "neuronreg", "compute", str(setup / "model"), "en", "ru", "--corpus", str(setup / "texts"),
           "--registry", str(reg), *ARGS]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("counted") == 2  # results once, from rank 0
    for lang in ("en", "ru"):
        assert counts(reg, lang) == counts(setup / "single", lang)
    assert not list((reg / "model" / ".partial").glob("*"))


def _worker(rank, world, port, root, reg, fail_rank, out):
    """One rank, as torchrun would start it; records what it raised."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import neuronreg.lape.compute as compute_module
    from neuronreg import LocalRegistry, load_manifest
    from neuronreg.lape.compute import CountSettings
    from neuronreg.options import LoadOptions

    if rank == fail_rank:
        real = compute_module.pack_rows

        def dying(*args, **kwargs):
            for i, row in enumerate(real(*args, **kwargs)):
                if i == 21:  # this rank's 11th row: mid-language
                    raise RuntimeError("disk on fire")
                yield row

        compute_module.pack_rows = dying
    try:
        compute_module.compute(str(root / "model"), ["ru"], manifest=load_manifest(), registry=LocalRegistry(reg),
                               settings=CountSettings(corpus=str(root / "texts"), tokens=3000, seq_len=64,
                                                      batch_size=2, checkpoint_tokens=128),
                               load=LoadOptions(device="cpu"))
        result = "ok"
    except Exception as exc:  # recorded for the parent to check
        result = f"{type(exc).__name__}|{getattr(exc, 'silent', '-')}|{exc}"
    Path(out, f"rank{rank}.txt").write_text(result)
    # Leave without the interpreter's teardown: under load, a gloo worker thread torn down there
    # now and then aborts the process (SIGABRT) after all the work is done and recorded.
    os._exit(0)


@pytest.mark.slow
def test_a_failed_rank_stops_all_then_resume_gives_the_same_counts(setup, tmp_path):
    reg, out = tmp_path / "reg", tmp_path / "out"
    out.mkdir()
    mp.start_processes(_worker, args=(2, free_port(), setup, reg, 1, out), nprocs=2, start_method="spawn")
    rank0, rank1 = (out / "rank0.txt").read_text(), (out / "rank1.txt").read_text()
    # Rank 0 reports rank 1's error; rank 1 stays silent (the message is shown once).
    assert rank0 == "RankFailed|False|rank 1: RuntimeError: disk on fire"
    assert rank1.startswith("RankFailed|True|")
    assert not (reg / "model" / "counts" / "ru.parquet").exists()  # no partial file
    partial = sorted(p.name for p in (reg / "model" / ".partial").glob("*"))
    assert partial == ["ru.rank0-of-2.safetensors", "ru.rank1-of-2.safetensors"]

    mp.start_processes(_worker, args=(2, free_port(), setup, reg, -1, out), nprocs=2, start_method="spawn")
    assert (out / "rank0.txt").read_text() == "ok" and (out / "rank1.txt").read_text() == "ok"
    assert counts(reg, "ru") == counts(setup / "single", "ru")
    assert not list((reg / "model" / ".partial").glob("*"))


def test_device_map_auto_gives_the_same_counts(setup, tmp_path):
    pytest.importorskip("accelerate")
    reg = tmp_path / "reg"
    result = CliRunner().invoke(cli, ["compute", str(setup / "model"), "en", "--corpus", str(setup / "texts"),
                                      "--device-map", "auto", "--registry", str(reg), *ARGS])
    assert result.exit_code == 0, result.output
    assert counts(reg, "en") == counts(setup / "single", "en")
