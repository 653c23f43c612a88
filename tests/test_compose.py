"""neuronreg compose: several languages' runs of one base as one run, with the rule for shared neurons, the
collisions counted, and the result a run like any other (evaluate, report, release, load_sparse_model)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuronreg.finetune.compose import compose
from neuronreg.finetune.deltas import apply_delta_tensors
from neuronreg.finetune.loading import load_sparse_model
from neuronreg.mask import NeuronMask
from neuronreg.provenance import LanguageInfo, ModelInfo, NeuronsRecord, SelectionInfo

from support.cli import assert_one_line_error, run
from support.hubserver import TEST_USER
from support.tiny import save_model, tiny_model, write_corpus

# Per language: neurons of the 2 x 48 tiny Llama. en and ru are disjoint; el shares neuron 2 of layer 0 with en.
MASKS = {"en": {0: [1, 2], 1: [3]}, "ru": {0: [5], 1: [7, 8]}, "el": {0: [2, 9]}}


def write_mask(folder: Path, lang: str, per_layer: dict) -> Path:
    mask = NeuronMask.from_per_layer([sorted(per_layer.get(i, [])) for i in range(2)], model="llama", language=lang,
                                     intermediate_size=48)
    mask.provenance = NeuronsRecord(
        model=ModelInfo(name="llama", id="llama", revision=None, num_layers=2, intermediate_size=48, hidden_size=32),
        language=LanguageInfo(code=lang), selection=SelectionInfo(method="lape", languages=[lang], top_rate=0.1),
        num_neurons=len(mask))
    return mask.save(folder / f"{lang}.parquet")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compose")
    save_model(tiny_model("llama"), root / "llama")
    write_corpus(root / "texts", {"en": "en", "ru": "ru", "el": "el"}, docs=60)
    common = ("--data", root / "texts", "--steps", 2, "--eval-every", 1, "--seq-len", 32, "--lr", 5e-2, "-q")
    for lang, per_layer in MASKS.items():
        mask = write_mask(root / "masks", lang, per_layer)
        run("finetune", root / "llama", lang, "--mask", mask, "--out", root / "runs" / f"{lang}-lape", *common)
        run("finetune", root / "llama", lang, "--subset", "random", "--mask", mask, "--out",
            root / "runs" / f"{lang}-random", *common)
    for lang in ("en", "ru"):
        run("finetune", root / "llama", lang, "--subset", "lora", "--lora-r", 2, "--out",
            root / "runs" / f"{lang}-lora", *common)
        run("finetune", root / "llama", lang, "--subset", "ffn", "--out", root / "runs" / f"{lang}-ffn", *common)
    run("finetune", root / "llama", "en", "--subset", "ia3", "--out", root / "runs" / "en-ia3", *common)
    return root


def merged_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_disjoint_runs_composed_equal_applying_them_one_after_the_other_exactly(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    runs = [setup / "runs" / "en-lape", setup / "runs" / "ru-lape"]
    done = compose(runs, tmp_path / "en+ru")
    assert done.collisions == [0, 0] and done.config.neurons.per_layer == [3, 3]
    composed = merged_weights(load_sparse_model(tmp_path / "en+ru", merge=True, merge_dtype="float32"))
    # One after the other: the first run's delta merged into the base, then the second's into the result.
    model = AutoModelForCausalLM.from_pretrained(setup / "llama").float()
    for folder in runs:
        apply_delta_tensors(model, load_file(str(folder / "delta.safetensors")), merge=True, dtype=torch.float32)
    sequential = merged_weights(model)
    assert composed.keys() == sequential.keys()
    assert all(torch.equal(composed[k], sequential[k]) for k in composed)
    # Unmerged, the composed delta gives the outputs of the two deltas applied together.
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(load_sparse_model(tmp_path / "en+ru")(input_ids=ids).logits,
                               model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", ["sum", "mean", "first"])
def test_a_shared_neuron_follows_the_rule_and_is_counted(setup, tmp_path, rule):
    en, el = (load_file(str(setup / "runs" / f"{lang}-lape" / "delta.safetensors")) for lang in ("en", "el"))
    done = compose([setup / "runs" / "en-lape", setup / "runs" / "el-lape"], tmp_path / rule, rule=rule)
    assert done.collisions == [1, 0] and done.config.composition.rule == rule
    got = load_file(str(tmp_path / rule / "delta.safetensors"))
    prefix = "model.layers.0.mlp"
    assert got[f"{prefix}.neurons"].tolist() == [1, 2, 9]
    row_en, row_el = en[f"{prefix}.gate_delta"][1], el[f"{prefix}.gate_delta"][0]  # neuron 2 in each
    want = {"sum": row_en + row_el, "mean": (row_en + row_el) / 2, "first": row_en}[rule]
    torch.testing.assert_close(got[f"{prefix}.gate_delta"][1], want, rtol=0, atol=1e-7)
    col_en, col_el = en[f"{prefix}.down_delta"][:, 1], el[f"{prefix}.down_delta"][:, 0]
    want = {"sum": col_en + col_el, "mean": (col_en + col_el) / 2, "first": col_en}[rule]
    torch.testing.assert_close(got[f"{prefix}.down_delta"][:, 1], want, rtol=0, atol=1e-7)
    assert torch.equal(got[f"{prefix}.gate_delta"][0], en[f"{prefix}.gate_delta"][0])  # neuron 1: en's alone
    assert torch.equal(got[f"{prefix}.up_delta"][2], el[f"{prefix}.up_delta"][1])  # neuron 9: el's alone


def test_lora_and_dense_runs_compose_to_the_sum_of_their_updates(setup, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(setup / "llama").float().state_dict()
    parts = [merged_weights(load_sparse_model(setup / "runs" / f"{lang}-lora", merge=True, merge_dtype="float32"))
             for lang in ("en", "ru")]
    compose([setup / "runs" / "en-lora", setup / "runs" / "ru-lora"], tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 4
    composed = merged_weights(load_sparse_model(tmp_path / "lora", merge=True, merge_dtype="float32"))
    for key in base:
        expected = (parts[0][key] - base[key]) + (parts[1][key] - base[key])
        torch.testing.assert_close(composed[key] - base[key], expected, rtol=1e-5, atol=1e-6)
    # plain PEFT loads the composed adapter folder
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(setup / "llama"), str(tmp_path / "lora"))
    compose([setup / "runs" / "en-ffn", setup / "runs" / "ru-ffn"], tmp_path / "ffn", rule="mean")
    dense = merged_weights(load_sparse_model(tmp_path / "ffn"))
    tuned = [merged_weights(load_sparse_model(setup / "runs" / f"{lang}-ffn")) for lang in ("en", "ru")]
    for key in base:
        torch.testing.assert_close(dense[key], base[key] + ((tuned[0][key] - base[key]) + (tuned[1][key] - base[key]))
                                   / 2, rtol=1e-5, atol=1e-6)


def test_what_does_not_compose_is_refused_in_one_line(setup, tmp_path):
    runs = setup / "runs"
    for pair, fragment in ((("en-lape", "ru-random"), "treatment and its control"),
                           (("en-lape", "ru-lora"), "different kinds"),
                           (("en-ia3", "en-ia3"), "scales"),
                           (("en-lape",), "two runs or more")):
        assert_one_line_error(run("compose", *(runs / p for p in pair), "-o", tmp_path / "x", ok=False), fragment)
    assert_one_line_error(run("compose", runs / "en-lora", runs / "ru-lora", "--rule", "first", "-o", tmp_path / "x",
                              ok=False), "Rule 'first'", "--rule sum")
    assert not (tmp_path / "x").exists()


def test_a_composed_run_is_evaluated_reported_and_released_like_any_run(setup, tmp_path, hub):
    runs = [setup / "runs" / "en-lape", setup / "runs" / "ru-lape"]
    shown = run("compose", *runs, "-o", tmp_path / "en+ru")
    assert "neurons trained by two runs or more, per layer: 0 0" in shown.stdout
    heldout = write_corpus(tmp_path / "heldout", {"en": "en", "ru": "ru"}, docs=6, seed=3)
    copies = []
    for folder in runs:  # evaluated copies: the module's runs stay as they are
        copy = tmp_path / folder.name
        shutil.copytree(folder, copy)
        copies.append(copy)
    run("evaluate", tmp_path / "en+ru", *copies, "--data", heldout, "--languages", "en,ru", "--seq-len", 32,
        "--tokens", 300, "-q")
    scores = json.loads((tmp_path / "en+ru" / "eval" / "heldout.json").read_text())["scores"]
    assert set(scores) == {"en", "ru"}
    report = run("report", tmp_path / "en+ru", *copies, "-o", tmp_path / "report").stdout
    assert "Composed runs: what each part keeps" in report and "| en+ru | en-lape | en (its own) |" in report
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    kept = [r for r in data["interference"] if r["part"] == "en-lape" and r["language"] == "en"
            and r["metric"] == "bits_per_character"][0]
    assert kept["kept"] == pytest.approx(kept["composed_change"] / kept["alone"])
    run("release", tmp_path / "en+ru", "--repo", f"{TEST_USER}/en-ru-composed", "-q")
    card = hub.file_bytes("model", f"{TEST_USER}/en-ru-composed", "README.md").decode()
    assert "composition (sum where parts overlap) of 2 lape runs" in card


def test_random_runs_drawn_with_one_seed_are_composed_with_a_warning_that_they_are_nested(setup, tmp_path):
    import logging

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    common = ("--data", setup / "texts", "--steps", 1, "--eval-every", 1, "--seq-len", 32, "-q")
    run("finetune", setup / "llama", "el", "--subset", "random", "--seed", 1, "--mask", setup / "masks" / "el.parquet",
        "--out", tmp_path / "el-random-s1", *common)
    kept = Kept()  # the CLI's logging setup may stop propagation to pytest's handler: listen on the logger itself
    logger = logging.getLogger("neuronreg")
    logger.addHandler(kept)
    try:
        compose([setup / "runs" / "en-random", setup / "runs" / "ru-random"], tmp_path / "same")
        assert len(kept.messages) == 1 and "same seed (0)" in kept.messages[0] and "nested" in kept.messages[0]
        kept.messages.clear()
        compose([setup / "runs" / "en-random", tmp_path / "el-random-s1"], tmp_path / "distinct")
        assert kept.messages == []
    finally:
        logger.removeHandler(kept)
