"""The seed paper's PEFT baselines (finetune subset lora / ia3) on tiny real models: they train, save a
standard PEFT adapter that PEFT alone loads, resume bit for bit, and count their trainable weights."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from neuronreg.finetune.loading import load_sparse_model, merge_run
from neuronreg.finetune.method import read_run
from neuronreg.finetune.release import delta_card
from neuronreg.finetune.training import finetune
from neuronreg.manifest import load_manifest
from neuronreg.models import find_mlp_sites
from neuronreg.runs import read_run_config
from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, run
from support.hubserver import TEST_USER
from support.runs import finetune_settings
from support.tiny import save_model, tiny_model, write_corpus

# PEFT (called directly here, as a user would) asks transformers 5 for a renamed attribute.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("peft")
    for arch in ("llama", "gpt2"):
        save_model(tiny_model(arch), root / arch)
    write_corpus(root / "texts", {"en": "en"}, docs=80)
    return root


def train(setup, arch, out, *, on_step=None, **kw):
    base = dict(data=str(setup / "texts"), out=str(out), steps=4, batch_size=2, seq_len=32, eval_every=2, lr=1e-2)
    settings, load = finetune_settings(**{**base, **kw})
    return finetune(str(setup / arch), "en", settings, load=load, manifest=load_manifest(),
                    registry=LocalRegistry(setup / "reg"), on_step=on_step)


def base_model(setup, arch="llama"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(setup / arch).eval()


def expected_trainable(arch: str, subset: str, r: int = 32) -> int:
    """By hand from the tiny models' shapes: LoRA r x (in + out) per projection; IA3 one scale per output
    of the first projections and per input of the second."""
    total = 0
    for site in find_mlp_sites(tiny_model(arch)):
        mlp = site.mlp
        if arch == "llama":
            shapes = [(m.in_features, m.out_features) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        else:  # GPT-2's Conv1D weights are [in, out]
            shapes = [tuple(m.weight.shape) for m in (mlp.c_fc, mlp.c_proj)]
        if subset == "lora":
            total += sum(r * (i + o) for i, o in shapes)
        else:
            total += sum(o for _, o in shapes[:-1]) + shapes[-1][0]
    return total


@pytest.mark.parametrize("subset", ["lora", "ia3"])
def test_adapter_run_trains_and_plain_peft_loads_the_run_folder(setup, tmp_path, subset):
    from peft import PeftModel

    out = tmp_path / subset
    result = train(setup, "llama", out, subset=subset, steps=8, eval_every=4, lr=2e-2 if subset == "lora" else 5e-2)
    curve = [p["val_loss"] for p in result.curve]
    assert curve[-1] < curve[0] - 0.02, curve
    config = read_run_config(out)
    assert config.subset == subset and config.adapter.method == subset
    assert config.adapter.target_modules == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    if subset == "ia3":
        assert config.adapter.feedforward_modules == ["mlp.down_proj"] and config.adapter.r is None
    else:
        assert (config.adapter.r, config.adapter.alpha, config.adapter.dropout) == (32, 64.0, 0.1)
    assert config.trainable_parameters == expected_trainable("llama", subset)
    assert config.trainable_share == pytest.approx(config.trainable_parameters / config.base_model.num_parameters)
    assert config.training.master_dtype == "float32" and config.neurons is None and config.mask is None
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                               "neuronreg_delta.json", "steps.csv"}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    assert sum(t.numel() for t in weights.values()) == config.trainable_parameters

    ids = torch.randint(3, 80, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = PeftModel.from_pretrained(base_model(setup), out).eval()  # PEFT alone, no neuronreg
    ours = load_sparse_model(out)
    assert isinstance(ours, PeftModel)
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=0, atol=0)
        assert not torch.allclose(base_model(setup)(input_ids=ids).logits, want, atol=1e-3)  # it learned
        merged = load_sparse_model(out, merge=True)
        assert type(merged).__name__ == "LlamaForCausalLM"
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,subset", [("gpt2", "lora"), ("llama", "ia3")])  # GPT-2: dropout and Conv1D
def test_adapter_run_resumes_to_the_uninterrupted_result(setup, tmp_path, arch, subset):
    kw = dict(subset=subset, steps=6, eval_every=2, grad_accum=2)
    whole = train(setup, arch, tmp_path / "whole", **kw)

    def stop(step):
        if step == 5:
            raise KeyboardInterrupt  # after the checkpoint of step 4: step 5 is done again

    with pytest.raises(KeyboardInterrupt):
        train(setup, arch, tmp_path / "parts", on_step=stop, **kw)
    saved = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and sum(t.numel() for t in saved["trainable"].values()) == \
        expected_trainable(arch, subset)
    resumed = train(setup, arch, tmp_path / "parts", **kw)
    assert resumed.resumed_from == 4 and whole.curve == resumed.curve
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "parts" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.config.trainable_parameters == expected_trainable(arch, subset)


def test_lora_options_from_the_command_line_and_a_merged_bfloat16_run(setup, tmp_path):
    out = tmp_path / "run"
    result = run("finetune", setup / "llama", "en", "--subset", "lora", "--lora-r", 4, "--lora-alpha", 8,
                 "--lora-dropout", 0, "--target-modules", "up_proj,down_proj", "--data", setup / "texts",
                 "--steps", 2, "--seq-len", 32, "--eval-every", 1, "--dtype", "bfloat16", "--merged", "--out", out)
    config = json.loads((out / "neuronreg_delta.json").read_text())
    assert config["adapter"]["r"] == 4 and config["adapter"]["alpha"] == 8.0 and config["adapter"]["dropout"] == 0
    assert config["adapter"]["target_modules"] == ["up_proj", "down_proj"]
    assert config["trainable_parameters"] == 2 * 4 * (32 + 48) * 2
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["down_proj", "up_proj"]
    # Merging into bfloat16 is measured and said.
    merge = config["merge"]
    assert merge["dtype"] == "bfloat16" and merge["operation"] == "merge" and merge["elements"] > 0
    assert "Merged into bfloat16:" in result.stderr
    assert (out / "merged" / "config.json").is_file()
    # In float32 the merge is exact up to one float32 addition.
    loaded, info = merge_run(out, merge_dtype="float32")
    assert info.dtype == "float32" and info.lost == 0 and info.relative_error < 1e-6
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_bad_adapter_settings_are_one_line_errors(setup, tmp_path):
    common = ("--data", setup / "texts", "--steps", 1, "--seq-len", 32, "--out", tmp_path / "run", "-q")
    assert_one_line_error(run("finetune", setup / "llama", "en", "--lora-r", 8, *common, ok=False),
                          "Option r applies to subset 'lora' only, not to subset 'lape'", "--lora-r")
    assert_one_line_error(run("finetune", setup / "llama", "en", "--subset", "ia3", "--lora-alpha", 8, *common,
                              ok=False), "alpha", "not to subset 'ia3'")
    assert_one_line_error(run("finetune", setup / "llama", "en", "--target-modules", "down_proj", *common,
                              ok=False), "target_modules applies to subsets 'lora' and 'ia3' only")
    unknown = run("finetune", setup / "llama", "en", "--subset", "lora", "--target-modules", "up_proj,nope_proj",
                  *common, ok=False)
    assert_one_line_error(unknown, "Unknown target module 'nope_proj'", "mlp.gate_proj, mlp.up_proj, mlp.down_proj",
                          "--target-modules")
    assert_one_line_error(run("finetune", setup / "llama", "en", "--subset", "ia3", "--target-modules", "mlp",
                              *common, ok=False), "not a linear projection")
    assert_one_line_error(run("finetune", setup / "llama", "en", "--merge-dtype", "float32", *common, ok=False),
                          "merge_dtype", "--merged")
    assert not (tmp_path / "run").exists()


def test_release_publishes_a_standard_peft_adapter_repo(setup, tmp_path, hub):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(setup, "llama", out, subset="lora", steps=2, lora_r=4)
    repo = f"{TEST_USER}/tiny-en-lora"
    run("release", out, "--repo", repo, "-q")
    assert set(hub.files("model", repo)) >= {"adapter_config.json", "adapter_model.safetensors",
                                             "neuronreg_delta.json", "README.md"}
    assert "delta.safetensors" not in hub.files("model", repo)
    published = json.loads(hub.file_bytes("model", repo, "adapter_config.json"))
    assert published["base_model_name_or_path"] is None  # a local base: its path is never published
    assert str(tmp_path) not in hub.file_bytes("model", repo, "neuronreg_delta.json").decode()
    card = hub.file_bytes("model", repo, "README.md").decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "PeftModel.from_pretrained" in card

    ids = torch.randint(3, 80, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = load_sparse_model(out)(input_ids=ids).logits
        remote = PeftModel.from_pretrained(base_model(setup), repo).eval()
        torch.testing.assert_close(remote(input_ids=ids).logits, want, rtol=0, atol=0)
        ours = load_sparse_model(repo, base=setup / "llama")
        torch.testing.assert_close(ours(input_ids=ids).logits, want, rtol=0, atol=0)

    # Merged: the merged model takes the root (transformers loads it), the adapter moves to adapter/.
    merged_repo = f"{TEST_USER}/tiny-en-lora-merged"
    result = run("release", out, "--repo", merged_repo, "--merged", "--merge-dtype", "float32")
    assert "Merged into float32:" in result.stderr
    files = set(hub.files("model", merged_repo))
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.json",
            "model.safetensors"} <= files and "adapter_config.json" not in files
    config = json.loads(hub.file_bytes("model", merged_repo, "neuronreg_delta.json"))
    assert config["merge"]["dtype"] == "float32" and config["merge"]["lost"] == 0
    with torch.no_grad():
        served = AutoModelForCausalLM.from_pretrained(merged_repo).eval()
        torch.testing.assert_close(served(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        sub = PeftModel.from_pretrained(base_model(setup), merged_repo, subfolder="adapter").eval()
        torch.testing.assert_close(sub(input_ids=ids).logits, want, rtol=0, atol=0)


def test_the_card_of_an_adapter_on_a_hub_base_names_it(setup, tmp_path):
    out = tmp_path / "run"
    train(setup, "llama", out, subset="ia3", steps=1, eval_every=1)
    config = read_run_config(out)
    config.base_path, config.base_model.id, config.base_model.revision = None, "acme/tiny-llama", "abc123"
    meta = yaml.safe_load(delta_card(config, "acme/tiny-llama-en-ia3", merged=False).split("---")[1])
    assert meta["base_model"] == "acme/tiny-llama" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    merged = yaml.safe_load(delta_card(config, "acme/tiny-llama-en-ia3", merged=True).split("---")[1])
    assert merged["base_model_relation"] == "merge" and merged["library_name"] == "transformers"


def test_evaluate_measures_an_adapter_run_unmerged(setup, tmp_path):
    out = tmp_path / "run"
    train(setup, "llama", out, subset="lora", steps=8, eval_every=4, lr=2e-2)
    heldout = write_corpus(tmp_path / "heldout", {"en": "en"}, docs=10, seed=5)
    data = json.loads(run("evaluate", out, "--data", heldout, "--seq-len", 32, "--json").output)
    en = data["scores"]["en"]
    assert en["tuned_perplexity"] < en["base_perplexity"]


def test_run_configs_without_the_new_fields_still_load_and_an_adapter_run_needs_its_settings(setup, tmp_path):
    from neuronreg.errors import RecordError
    from neuronreg.runs import RunConfig

    out = tmp_path / "run"
    train(setup, "llama", out, subset="lora", steps=1, eval_every=1, lora_r=2)
    data = json.loads((out / "neuronreg_delta.json").read_text())
    older = {k: v for k, v in data.items() if k not in ("adapter", "merge")}
    older["subset"] = "ffn"
    older["training"] = {k: v for k, v in data["training"].items()
                         if k not in ("master_dtype", "world_size", "device_map", "chunked_loss")}
    config = RunConfig.from_dict(older, "old.json")
    assert config.adapter is None and config.merge is None and config.training.master_dtype is None
    assert (config.training.world_size, config.training.device_map, config.training.chunked_loss) == (1, None, None)
    (out / "neuronreg_delta.json").write_text(json.dumps({**older, "subset": "lora"}))
    with pytest.raises(RecordError, match="subset 'lora' needs adapter settings"):
        read_run(out)
