"""Fine-tuning methods are objects registered by name: a new one is one class (the README's example, DoRA),
and every part of a run (training, loading, release checks, updates) asks the method."""

from pathlib import Path

import pytest
import torch

from neuronreg.finetune.adapters import LoraMethod
from neuronreg.finetune.config import FinetuneSettings
from neuronreg.finetune.loading import load_sparse_model
from neuronreg.finetune.method import _METHODS, get_method, method_names, read_run, register_method
from neuronreg.finetune.training import finetune

from support.cli import assert_one_line_error, run
from support.tiny import save_model, tiny_model, write_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("methods")
    save_model(tiny_model("llama"), root / "llama")
    write_corpus(root / "texts", {"en": "en"}, docs=60)
    return root


@pytest.fixture
def dora():
    """The README's example, registered for one test."""

    @register_method
    class DoraMethod(LoraMethod):
        name = "dora"
        trains = "a DoRA adapter (LoRA with a learned magnitude)"

        def peft_config(self, options, targets, feedforward, fan_in_fan_out):
            config, info = super().peft_config(options, targets, feedforward, fan_in_fan_out)
            config.use_dora = True
            return config, info

    yield DoraMethod
    _METHODS.pop("dora")


def test_the_builtin_methods_are_registered_and_know_their_kind():
    assert method_names() == ["lape", "random", "lora", "ia3", "ffn", "full"]
    kinds = {name: get_method(name).kind for name in method_names()}
    assert kinds == {"lape": "delta", "random": "delta", "lora": "adapter", "ia3": "adapter", "ffn": "dense",
                     "full": "dense"}
    assert [name for name in method_names() if get_method(name).needs_mask] == ["lape", "random"]


def test_a_method_added_in_one_class_trains_loads_and_releases_checks(setup, tmp_path, dora):
    out = tmp_path / "run"
    result = finetune(str(setup / "llama"), "en", FinetuneSettings(data=str(setup / "texts"), out=str(out),
                                                                   subset="dora", steps=2, batch_size=2, seq_len=32,
                                                                   eval_every=1, lr=1e-2, options={"r": 4}))
    assert result.config.subset == "dora" and result.config.adapter.method == "dora"
    config, method = read_run(out)
    assert isinstance(method, dora)
    method.check_run(out, config)  # what a release checks
    model = load_sparse_model(out)
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
    ids = torch.tensor([[5, 6, 7, 8]])
    merged = load_sparse_model(out, merge=True)
    torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # The command line takes it by name, and an unknown name is one line naming the registered ones.
    run("finetune", setup / "llama", "en", "--subset", "dora", "--lora-r", 2, "--data", setup / "texts", "--steps",
        1, "--seq-len", 32, "--out", tmp_path / "cli", "-q")
    assert_one_line_error(run("finetune", setup / "llama", "en", "--subset", "dorra", "--data", setup / "texts",
                              "--out", tmp_path / "x", ok=False), "Unknown subset 'dorra'", "dora", "--subset")
