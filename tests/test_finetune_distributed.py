"""Fine-tuning on more than one device: data-parallel processes (torch DDP over gloo on CPU) give the
deltas of one process with the same global batch, resume per rank, and write once; device_map="auto"
gives the deltas of a plain run."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from neuronreg.errors import FinetuneError
from neuronreg.finetune.training import finetune
from neuronreg.manifest import load_manifest
from neuronreg.mask import NeuronMask
from neuronreg.provenance import LanguageInfo, ModelInfo, NeuronsRecord, SelectionInfo
from neuronreg.store.local import LocalRegistry

from support.runs import finetune_settings
from support.tiny import save_model, tiny_model, write_corpus

EN = {0: [3, 7, 11, 20, 33], 1: [5, 6, 40]}
# Two processes of 2 rows each and one of 4 rows train on the same global batch. The deltas agree to
# float rounding: the gradients are sums in another order (each rank's, then the all-reduce), and
# AdamW's first steps (update ~ lr * sign(g)) turn a rounding difference of a near-zero gradient
# into at most a small multiple of lr * 1e-3 here.
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ftdist")
    save_model(tiny_model("llama"), root / "llama")
    mask = NeuronMask.from_per_layer([sorted(EN[0]), sorted(EN[1])], model="llama", language="en",
                                     intermediate_size=48)
    mask.provenance = NeuronsRecord(
        model=ModelInfo(name="llama", id="llama", revision=None, num_layers=2, intermediate_size=48, hidden_size=32),
        language=LanguageInfo(code="en"), selection=SelectionInfo(method="lape", languages=["en"], top_rate=0.1),
        num_neurons=len(mask))
    mask.save(root / "reg" / "llama" / "en.parquet")
    write_corpus(root / "texts", {"en": "en"}, docs=80)
    return root


def train(root: Path, out: Path, *, on_step=None, **kw):
    base = dict(data=str(root / "texts"), out=str(out), steps=4, batch_size=2, grad_accum=2, seq_len=32,
                eval_every=2, lr=1e-2, device="cpu")
    settings, load = finetune_settings(**{**base, **kw})
    return finetune(str(root / "llama"), "en", settings, load=load, manifest=load_manifest(),
                    registry=LocalRegistry(root / "reg"), on_step=on_step)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stop(Exception):
    pass


def plain_sgd(params, lr, weight_decay):
    """Instead of AdamW, whose update hardly depends on the gradient's scale: with SGD the deltas are
    the summed gradients themselves, so a wrongly normalised or half-reduced gradient shows."""
    return torch.optim.SGD(params, lr=lr)


def _worker(rank, world, port, root, out, stop_at, record, sgd):
    """One rank, as torchrun would start it; records how it ended."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if sgd:
        torch.optim.AdamW = plain_sgd

    def on_step(step):
        if step == stop_at:
            raise Stop(f"stopped at {step}")

    try:
        run = train(Path(root), Path(out), on_step=on_step, clip=0.0 if sgd else 1.0)
        result = f"ok|{run.is_main}|{run.config.best_step}"
    except Exception as exc:  # recorded for the parent to check
        result = f"{type(exc).__name__}|{exc}"
    Path(record, f"rank{rank}.txt").write_text(result)
    # Leave without the interpreter's teardown (a gloo thread torn down there can abort the process).
    os._exit(0)


def spawn(root: Path, out: Path, record: Path, stop_at: int = -1, world: int = 2, sgd: bool = False) -> list[str]:
    record.mkdir(exist_ok=True)
    for old in record.glob("*.txt"):
        old.unlink()
    mp.start_processes(_worker, args=(world, free_port(), str(root), str(out), stop_at, str(record), sgd),
                       nprocs=world, start_method="spawn")
    return [(record / f"rank{r}.txt").read_text() for r in range(world)]


def assert_same_deltas(a: Path, b: Path, **tol) -> None:
    x, y = load_file(str(a / "delta.safetensors")), load_file(str(b / "delta.safetensors"))
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(x[key], y[key], **tol)


@pytest.mark.slow
def test_two_processes_give_the_deltas_of_one_with_the_same_global_batch_and_resume(setup, tmp_path):
    one = train(setup, tmp_path / "one", batch_size=4)  # 2 micro-batches of 4 rows per step
    assert one.is_main and os.environ.get("WORLD_SIZE") is None

    outcomes = spawn(setup, tmp_path / "two", tmp_path / "record")  # 2 ranks x 2 rows x 2 micro-batches
    assert outcomes == [f"ok|True|{one.config.best_step}", f"ok|False|{one.config.best_step}"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["delta.safetensors", "neuronreg_delta.json",
                                                                     "steps.csv"]
    recorded = json.loads((tmp_path / "two" / "neuronreg_delta.json").read_text())["training"]
    assert recorded["world_size"] == 2 and one.config.training.world_size == 1  # the run says how it was spread
    assert_same_deltas(tmp_path / "one", tmp_path / "two", **TOL)
    moved = load_file(str(tmp_path / "two" / "delta.safetensors"))["model.layers.0.mlp.gate_delta"]
    assert moved.abs().max() > 1e-3  # the deltas did train

    # Interrupted at step 2 (after its checkpoint), then resumed by two processes: the same result, exactly.
    stopped = spawn(setup, tmp_path / "resumed", tmp_path / "record", stop_at=2)
    assert all(o.startswith("Stop|") for o in stopped), stopped
    assert (tmp_path / "resumed" / "checkpoint.pt").is_file()
    # One process refuses a checkpoint of two.
    with pytest.raises(FinetuneError, match="2 process"):
        train(setup, tmp_path / "resumed")
    assert spawn(setup, tmp_path / "resumed", tmp_path / "record")[0].startswith("ok|True")
    assert_same_deltas(tmp_path / "two", tmp_path / "resumed", rtol=0, atol=0)
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_two_processes_reduce_the_gradients_of_the_global_batch(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", plain_sgd)
    train(setup, tmp_path / "one", batch_size=4, clip=0.0)
    assert spawn(setup, tmp_path / "two", tmp_path / "record", sgd=True)[0].startswith("ok|True")
    assert_same_deltas(tmp_path / "one", tmp_path / "two", rtol=1e-5, atol=1e-7)


def test_device_map_auto_gives_the_deltas_of_a_plain_run(setup, tmp_path):
    pytest.importorskip("accelerate")
    train(setup, tmp_path / "plain", steps=2)
    spread = train(setup, tmp_path / "spread", steps=2, device_map="auto")
    assert spread.is_main and spread.config.training.device_map == "auto"
    assert_same_deltas(tmp_path / "plain", tmp_path / "spread", rtol=1e-6, atol=1e-7)


def test_device_map_with_several_processes_is_refused(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FinetuneError, match="data-parallel"):
        train(setup, tmp_path / "x", device_map="auto")


def test_the_chunked_loss_trains_the_same_deltas(setup, tmp_path):
    train(setup, tmp_path / "plain", steps=2, chunked_loss=False)
    train(setup, tmp_path / "chunked", steps=2, chunked_loss=True)
    assert_same_deltas(tmp_path / "plain", tmp_path / "chunked", **TOL)
