"""neuronreg finetune: training only a language's neurons, as row-sparse deltas, on tiny real models."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuronreg.errors import MaskError
from neuronreg.finetune.deltas import attach_deltas, merge_deltas
from neuronreg.finetune.loading import load_sparse_model
from neuronreg.finetune.training import finetune
from neuronreg.manifest import load_manifest
from neuronreg.mask import NeuronMask
from neuronreg.models import find_mlp_sites
from neuronreg.provenance import LanguageInfo, MaskSource, ModelInfo, NeuronsRecord, SelectionInfo
from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, run
from support.hubserver import TEST_USER
from support.runs import finetune_settings
from support.tiny import save_model, tiny_model, write_corpus

EN = {0: [3, 7, 11, 20, 33], 1: [5, 6, 40]}  # the "English" neurons of the 2 x 48 tiny models


def write_mask(registry: Path, model: str, lang: str, per_layer: dict[int, list[int]], layers=2, inter=48):
    mask = NeuronMask.from_per_layer([sorted(per_layer.get(i, [])) for i in range(layers)], model=model, language=lang,
                                     intermediate_size=inter)
    mask.provenance = NeuronsRecord(
        model=ModelInfo(name=model, id=model, revision=None, num_layers=layers, intermediate_size=inter,
                        hidden_size=32),
        language=LanguageInfo(code=lang), selection=SelectionInfo(method="lape", languages=[lang], top_rate=0.1),
        num_neurons=len(mask))
    mask.save(registry / model / f"{lang}.parquet")
    return mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    for arch in ("llama", "gpt2", "phi3"):
        save_model(tiny_model(arch), root / arch)
        write_mask(root / "reg", arch, "en", EN)
    write_mask(root / "reg", "llama", "ru", {})  # a language that got no neuron
    write_mask(root / "reg", "gpt2", "el", {0: [1]}, inter=64)  # a mask of another model's shape
    write_corpus(root / "texts", {"en": "en", "el": "el"}, docs=80)
    (root / "empty").mkdir()
    (root / "empty" / "en.txt").write_text("\n\n", encoding="utf-8")
    return root






def settings(setup, out, **kw):
    """The run's settings and load options (dtype, device) from one set of keywords."""
    base = dict(data=str(setup / "texts"), out=str(out), steps=4, batch_size=2, seq_len=32, eval_every=2, lr=1e-2)
    return finetune_settings(**{**base, **kw})


def train(setup, arch, out, lang="en", *, on_step=None, mask=None, **kw):
    run_settings, load = settings(setup, out, **kw)
    return finetune(str(setup / arch), lang, run_settings, load=load, manifest=load_manifest(),
                    registry=LocalRegistry(setup / "reg"), mask=mask, on_step=on_step)


# -- the row-sparse parameters ------------------------------------------------------------------------
def dense_rows(arch, model, layer, idx, inter):
    """A dense model's gradient rows [k, H] per first-projection block, bias rows, and second-projection columns."""
    site = find_mlp_sites(model)[layer]
    if arch == "gpt2":  # Conv1D weights are [in, out]
        return [site.mlp.c_fc.weight.grad[:, idx].T], site.mlp.c_fc.bias.grad[idx], site.mlp.c_proj.weight.grad[idx].T
    if arch == "phi3":
        g = site.mlp.gate_up_proj.weight.grad
        return [g[idx], g[idx + inter]], None, site.mlp.down_proj.weight.grad[:, idx]
    return [site.mlp.gate_proj.weight.grad[idx], site.mlp.up_proj.weight.grad[idx]], None, \
        site.mlp.down_proj.weight.grad[:, idx]


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_gradients_of_row_sparse_deltas_equal_masked_dense_gradients(arch):
    sparse, dense = tiny_model(arch).train(), tiny_model(arch).train()
    for model in (sparse, dense):
        model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.0
    per_layer = [torch.tensor(EN[0]), torch.tensor(EN[1])]
    layers = attach_deltas(sparse, per_layer)
    trainable = [n for n, p in sparse.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("delta", "bias_delta")) for n in trainable)
    for p in dense.parameters():
        p.requires_grad_(True)
    ids = torch.randint(3, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (sparse.eval(), dense.eval()):
        model(input_ids=ids, labels=ids).loss.backward()
    inter = find_mlp_sites(dense)[0].intermediate_size
    for layer, idx in zip(layers, per_layer):
        firsts, bias, second = dense_rows(arch, dense, layer.layer, idx, inter)
        k = idx.numel()
        got = [w.delta.grad for _, w in layer.first]
        got = [got[0][:k], got[0][k:]] if arch == "phi3" else got
        for have, want in zip(got, firsts):
            torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-6)
        if bias is not None:
            torch.testing.assert_close(layer.first[0][1].bias_delta.grad, bias, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.second[1].delta.grad, second, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "opt", "bloom"])
def test_merging_changes_only_the_selected_rows_and_columns_and_keeps_the_outputs(arch):
    model, base = tiny_model(arch), tiny_model(arch)
    per_layer = [torch.tensor([1, 5, 9]), torch.tensor([0, 47])]
    layers = attach_deltas(model, per_layer)
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.normal_(0, 0.3)
    ids = torch.randint(3, 80, (2, 10), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    merge_deltas(layers)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed and all(("mlp" in n or "fc" in n) for n in changed)
    for site, base_site, idx in zip(find_mlp_sites(model), find_mlp_sites(base), per_layer):
        w, w0 = site.projection.weight, base_site.projection.weight
        rows = (w != w0).any(0 if arch == "gpt2" else 1).nonzero().flatten()
        expect = torch.cat([idx, idx + 48]) if arch == "phi3" else idx
        assert rows.tolist() == expect.tolist()


# -- the command ---------------------------------------------------------------------------------------
def test_finetune_trains_only_the_mask_and_loads_back(setup, tmp_path):
    out = tmp_path / "run"
    result = run("finetune", setup / "llama", "en", "--mask", setup / "reg", "--data", setup / "texts", "--steps", 6,
                 "--seq-len", 32, "--eval-every", 3, "--lr", 1e-2, "--merged", "--out", out, "-q")
    assert "val_loss" in result.output
    config = json.loads((out / "neuronreg_delta.json").read_text())
    assert config["neurons"] == {"total": 8, "per_layer": [5, 3]} and config["subset"] == "lape"
    assert config["trainable_parameters"] == 8 * 3 * 32
    assert config["trainable_share"] == pytest.approx(8 * 3 * 32 / config["base_model"]["num_parameters"])
    assert config["base_model"]["revision"].startswith("local-") and config["language"]["code"] == "en"
    assert [p["step"] for p in config["validation_curve"]] == [0, 3, 6]
    assert config["training"]["lr"] == 1e-2
    assert config["mask"]["source"] == {"kind": "registry", "selection": "top10"}  # what it is, not where it lay
    assert len(config["mask"]["sha256"]) == 64 and str(setup) not in json.dumps(config["mask"])
    assert not (out / "checkpoint.pt").exists()

    tensors = load_file(str(out / "delta.safetensors"))
    assert tensors["model.layers.0.mlp.neurons"].tolist() == EN[0]
    assert tensors["model.layers.1.mlp.gate_delta"].shape == (3, 32)
    assert tensors["model.layers.1.mlp.down_delta"].shape == (32, 3)
    assert tensors["model.layers.0.mlp.up_delta"].abs().sum() > 0

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(setup / "llama")
    merged_saved = AutoModelForCausalLM.from_pretrained(out / "merged")
    merged = load_sparse_model(out, merge=True)
    unmerged = load_sparse_model(out)
    for name, w in merged.state_dict().items():
        assert torch.equal(w, merged_saved.state_dict()[name]), name
        w0 = base.state_dict()[name]
        if name.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight")):
            layer = int(name.split(".")[2])
            differs = (w != w0).any(0 if "down_proj" in name else 1).nonzero().flatten().tolist()
            assert differs == EN[layer], name
        else:
            assert torch.equal(w, w0), name
    ids = torch.randint(3, 80, (1, 16))
    torch.testing.assert_close(unmerged(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_loss_falls_on_the_target_text(setup, tmp_path):
    result = train(setup, "llama", tmp_path / "run", steps=12, eval_every=4, lr=2e-2)
    curve = [p["val_loss"] for p in result.curve]
    assert curve[-1] < curve[0] - 0.05, curve
    assert result.config.best_step in (4, 8, 12)


def test_optimizer_state_is_twice_the_trainable_weights(setup, tmp_path):
    def stop(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(setup, "llama", tmp_path / "run", checkpoint_every=1, on_step=stop)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    state = saved["optimizer"]["state"]
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values())
    trainable = sum(t.numel() for t in saved["trainable"].values())
    assert trainable == 8 * 3 * 32 and moments == 2 * trainable


@pytest.mark.parametrize("arch", ["gpt2"])  # GPT-2 has dropout: the RNG state must be restored too
def test_resume_gives_the_same_result_as_an_uninterrupted_run(setup, tmp_path, arch):
    whole = train(setup, arch, tmp_path / "whole", steps=6, eval_every=2, grad_accum=2)

    def stop(step):
        if step == 5:
            raise KeyboardInterrupt  # after the checkpoint of step 4: steps 5.. are redone

    with pytest.raises(KeyboardInterrupt):
        train(setup, arch, tmp_path / "parts", steps=6, eval_every=2, grad_accum=2, on_step=stop)
    assert (tmp_path / "parts" / "checkpoint.pt").exists()
    resumed = train(setup, arch, tmp_path / "parts", steps=6, eval_every=2, grad_accum=2)
    assert resumed.resumed_from == 4
    a = load_file(str(tmp_path / "whole" / "delta.safetensors"))
    b = load_file(str(tmp_path / "parts" / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.curve == resumed.curve


def test_random_subset_keeps_the_per_layer_counts(setup, tmp_path):
    drawn = NeuronMask.random([5, 3], 48, seed=1).per_layer()
    assert [t.numel() for t in drawn] == [5, 3] and drawn[0].unique().numel() == 5
    assert all(torch.equal(x, y) for x, y in zip(drawn, NeuronMask.random([5, 3], 48, seed=1).per_layer()))
    result = train(setup, "llama", tmp_path / "rand", subset="random", steps=2, seed=3)
    assert result.config.subset == "random" and result.config.neurons.per_layer == [5, 3]
    tensors = load_file(str(tmp_path / "rand" / "delta.safetensors"))
    expect = NeuronMask.random([5, 3], 48, seed=3).per_layer()
    assert tensors["model.layers.0.mlp.neurons"].tolist() == expect[0].tolist()


@pytest.mark.parametrize("subset", ["ffn", "full"])
def test_dense_baselines_are_recorded_and_load(setup, tmp_path, subset):
    result = train(setup, "llama", tmp_path / subset, subset=subset, steps=2, lr=1e-3)
    model = load_sparse_model(tmp_path / subset)
    total = result.config.base_model.num_parameters
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert result.config.subset == subset
    assert result.config.trainable_parameters == (mlp if subset == "ffn" else total)


# -- clear errors ---------------------------------------------------------------------------------------
def test_errors_are_one_line(setup, tmp_path):
    common = ("--data", setup / "texts", "--steps", 2, "--seq-len", 32, "--mask", setup / "reg", "-q")
    # A mask of another model's shape, under this model's name.
    wrong = run("finetune", setup / "gpt2", "el", "--out", tmp_path / "a", *common, ok=False)
    assert_one_line_error(wrong, "64 neurons", "Use the mask of this model")
    assert_one_line_error(run("finetune", setup / "llama", "ru", "--out", tmp_path / "b", *common, ok=False),
                          "no neurons")
    assert_one_line_error(run("finetune", setup / "llama", "el", "--out", tmp_path / "c", *common, ok=False),
                          "No el neurons", "available: en, ru")
    empty = run("finetune", setup / "llama", "en", "--out", tmp_path / "d", "--mask", setup / "reg", "--data",
                setup / "empty", "-q", ok=False)
    assert_one_line_error(empty, "holds no text")
    assert_one_line_error(run("finetune", setup / "phi3", "en", "--out", tmp_path / "e", *common[:-3], "--mask",
                              tmp_path / "nothing", "-q", ok=False), "no neurons for phi3",
                          "neuronreg fetch MODEL LANG -o mask.parquet")
    run("finetune", setup / "llama", "en", "--out", tmp_path / "f", *common)
    assert_one_line_error(run("finetune", setup / "llama", "en", "--out", tmp_path / "f", *common, ok=False),
                          "already holds a finished run", "--overwrite")


def test_mask_check_raises_for_another_model():
    mask = NeuronMask("x", "en", 3, 48, torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(MaskError, match="3 layers x 48"):
        mask.check(tiny_model("llama"))


def test_command_has_help_with_example():
    assert "Example:" in run("finetune", "--help").output


def test_gradient_checkpointing_gives_the_same_deltas_and_schedules_are_recorded(setup, tmp_path):
    plain = train(setup, "llama", tmp_path / "plain", steps=3, eval_every=3, schedule="cosine", warmup_steps=1)
    ckpt = train(setup, "llama", tmp_path / "ckpt", steps=3, eval_every=3, schedule="cosine", warmup_steps=1,
                 gradient_checkpointing=True)
    a = load_file(str(tmp_path / "plain" / "delta.safetensors"))
    b = load_file(str(tmp_path / "ckpt" / "delta.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert plain.config.training.gradient_checkpointing is False
    assert ckpt.config.training.schedule == "cosine"


def test_bfloat16_model_keeps_float32_deltas_and_a_mask_file_works(setup, tmp_path):
    mask_file = setup / "reg" / "llama" / "en.parquet"
    result = train(setup, "llama", tmp_path / "bf16", steps=2, dtype="bfloat16", mask=mask_file)
    assert result.config.training.dtype == "bfloat16"
    assert result.config.mask.source == MaskSource(kind="file", file="en.parquet")  # a name, never a local path
    tensors = load_file(str(tmp_path / "bf16" / "delta.safetensors"))
    assert tensors["model.layers.0.mlp.gate_delta"].dtype == torch.float32
    model = load_sparse_model(tmp_path / "bf16", merge=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(p["val_loss"])) for p in result.curve)


def test_evaluate_reports_perplexity_before_and_after(setup, tmp_path):
    out = tmp_path / "run"
    train(setup, "llama", out, steps=8, eval_every=4, lr=2e-2)
    heldout = write_corpus(tmp_path / "heldout", {"en": "en", "el": "el"}, docs=10, seed=5)
    data = json.loads(run("evaluate", out, "--data", heldout, "--languages", "en,Greek", "--seq-len", 32,
                          "--json").output)
    en, el = data["scores"]["en"], data["scores"]["el"]
    assert data["trained_language"] == "en" and en["tokens"] > 0 and el["tokens"] > 0
    assert en["tuned_perplexity"] < en["base_perplexity"]
    assert en["base_perplexity"] == pytest.approx(math.exp(en["base_loss"]))
    # Bits per character: the same nats over the characters of the text (comparable across tokenizers).
    assert en["base_bits_per_character"] == pytest.approx(en["base_loss"] * en["tokens"] / math.log(2)
                                                          / en["characters"])
    assert en["tuned_bits_per_character"] < en["base_bits_per_character"]
    table = run("evaluate", out, "--data", heldout, "--seq-len", 32).output
    assert "(trained)" in table and "el" not in table.split("\n", 1)[1]


def test_release_uploads_delta_and_card_and_loads_from_the_hub(setup, tmp_path, hub):  # noqa: F811
    out = tmp_path / "run"
    train(setup, "llama", out, steps=2)
    result = run("release", out, "--repo", f"{TEST_USER}/tiny-en-lape", "--merged", "-q")
    files = set(hub.files("model", f"{TEST_USER}/tiny-en-lape"))
    assert {"delta.safetensors", "neuronreg_delta.json", "README.md", "config.json", "model.safetensors"} <= files
    assert len(hub.commits("model", f"{TEST_USER}/tiny-en-lape")) == 2  # initial + ONE release commit
    card = hub.file_bytes("model", f"{TEST_USER}/tiny-en-lape", "README.md").decode()
    assert "8 neurons" in card and "load_sparse_model" in card
    assert result.output.strip()
    from transformers import AutoModelForCausalLM

    published = json.loads(hub.file_bytes("model", f"{TEST_USER}/tiny-en-lape", "neuronreg_delta.json"))
    assert "base_path" not in published and str(tmp_path) not in json.dumps(published)  # no local path
    with pytest.raises(Exception, match="local folder"):
        load_sparse_model(f"{TEST_USER}/tiny-en-lape")
    remote = load_sparse_model(f"{TEST_USER}/tiny-en-lape", merge=True, base=setup / "llama")
    merged = AutoModelForCausalLM.from_pretrained(f"{TEST_USER}/tiny-en-lape")
    local = load_sparse_model(out, merge=True)
    for name, w in local.state_dict().items():
        assert torch.equal(w, remote.state_dict()[name]) and torch.equal(w, merged.state_dict()[name]), name


def test_release_to_a_branch_with_a_tag_or_as_a_pull_request(setup, tmp_path, hub):  # noqa: F811
    from huggingface_hub import HfApi

    out = tmp_path / "run"
    train(setup, "llama", out, steps=2)
    repo = f"{TEST_USER}/tiny-en-versions"
    run("release", out, "--repo", repo, "--revision", "experiments", "--tag", "v1", "-q")
    api = HfApi()
    refs = api.list_repo_refs(repo)
    branch = {b.name: b.target_commit for b in refs.branches}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": branch["experiments"]}
    assert "delta.safetensors" in api.list_repo_files(repo, revision="v1")
    assert "delta.safetensors" not in hub.files("model", repo)  # main is untouched
    # The same release again sends nothing and makes no commit (the tag is on it already); another run with
    # the same tag is refused before anything is committed, and so is a tag git would refuse.
    before = hub.commits("model", repo, "experiments")
    again = run("release", out, "--repo", repo, "--revision", "experiments", "--tag", "v1")
    assert "no commit" in again.stderr and hub.commits("model", repo, "experiments") == before
    other = tmp_path / "other"
    train(setup, "llama", other, steps=3)
    for branch in ("experiments", "dev"):  # a new branch is not created for a release that is refused
        assert_one_line_error(run("release", other, "--repo", repo, "--revision", branch, "--tag", "v1",
                                  ok=False), "already has the tag 'v1'", "--tag")
    for bad in ("bad tag", "main", "v1~1", "a..b", ".hidden", "x.lock"):
        assert_one_line_error(run("release", other, "--repo", repo, "--tag", bad, ok=False), "--tag")
    assert_one_line_error(run("release", other, "--repo", repo, "--revision", "../x", ok=False), "--revision")
    assert hub.commits("model", repo, "experiments") == before and "dev" not in hub.branches("model", repo)
    # A pull request: printed, and main still untouched
    url = run("release", out, "--repo", repo, "--create-pr", "-q").stdout.strip()
    assert "/discussions/" in url and "delta.safetensors" not in hub.files("model", repo)
    # A release into a new repo that fails at any request leaves either no repo or the whole release
    for k in range(0, 20):
        new = f"{TEST_USER}/tiny-en-failing"
        hub.fail_after(k, 400)
        result = run("release", out, "--repo", new, "--tag", "v1", ok=False)
        hub._fail.clear()
        if result.exit_code == 0:
            assert "delta.safetensors" in hub.files("model", new)
            assert [t.name for t in api.list_repo_refs(new).tags] == ["v1"]
            assert k >= 5  # it failed, and was undone, at the repo's creation, the upload, the commit and the tag
            break
        assert_one_line_error(result)
        assert hub.files_or_none("model", new) is None, k
    else:
        raise AssertionError("release never succeeded")


# -- bfloat16 must not eat the training ---------------------------------------------------------------------
def test_dense_baseline_in_bfloat16_updates_float32_master_weights(setup, tmp_path):
    """lr 1e-4 on bfloat16 weights of magnitude ~0.5 (spacing 2e-3 to 4e-3): updated in place, every step
    would round away; float32 masters keep them, and merge_dtype float32 saves them."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ffn"
    result = train(setup, "llama", out, subset="ffn", steps=4, eval_every=2, lr=1e-4, dtype="bfloat16",
                   merge_dtype="float32")
    assert result.config.training.master_dtype == "float32"
    merge = result.config.merge
    assert (merge.operation, merge.dtype, merge.elements, merge.lost) == ("save", "float32", None, 0)
    start = AutoModelForCausalLM.from_pretrained(setup / "llama", dtype=torch.bfloat16).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert next(iter(saved.values())).dtype == torch.float32
    steps = result.config.best_step
    for name, w in saved.items():
        change = w - start[name].float()
        if ".mlp." in name:
            assert (change != 0).float().mean() > 0.9, name  # without masters: only the tiniest weights move
            assert change.abs().max() <= steps * 1e-4 * 1.01 + 1e-6, name  # an Adam step moves at most ~lr
        else:
            assert torch.equal(change, torch.zeros_like(change)), name


def test_saving_and_merging_in_bfloat16_report_what_rounds_away(setup, tmp_path):
    common = ("--data", setup / "texts", "--steps", 2, "--seq-len", 32, "--eval-every", 1, "--lr", 1e-4,
              "--dtype", "bfloat16")
    dense = run("finetune", setup / "llama", "en", "--subset", "ffn", "--out", tmp_path / "ffn", *common)
    assert "Saved the float32 trained weights in bfloat16:" in dense.stderr and "rounded away" in dense.stderr
    merge = json.loads((tmp_path / "ffn" / "neuronreg_delta.json").read_text())["merge"]
    assert merge["operation"] == "save" and merge["lost_share"] > 0.5

    lape = run("finetune", setup / "llama", "en", "--mask", setup / "reg", "--merged", "--out", tmp_path / "bf16",
               *common)
    merge = json.loads((tmp_path / "bf16" / "neuronreg_delta.json").read_text())["merge"]
    assert merge["dtype"] == "bfloat16" and merge["elements"] == 8 * 3 * 32 and merge["lost_share"] > 0.01
    assert "Merged into bfloat16:" in lape.stderr and "lose part of the training" in lape.stderr  # the warning

    exact = run("finetune", setup / "llama", "en", "--mask", setup / "reg", "--merged", "--merge-dtype", "float32",
                "--out", tmp_path / "f32", *common)
    merge = json.loads((tmp_path / "f32" / "neuronreg_delta.json").read_text())["merge"]
    assert merge["dtype"] == "float32" and merge["lost"] == 0 and merge["relative_error"] < 1e-3
    assert "Merged into float32: 0.00%" in exact.stderr and "lose part" not in exact.stderr
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(setup / "llama", dtype=torch.bfloat16).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "f32" / "merged").state_dict()
    deltas = load_file(str(tmp_path / "f32" / "delta.safetensors"))
    rows = merged["model.layers.0.mlp.gate_proj.weight"][EN[0]] - base["model.layers.0.mlp.gate_proj.weight"][EN[0]]
    assert merged["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float32
    torch.testing.assert_close(rows, deltas["model.layers.0.mlp.gate_delta"], rtol=0, atol=1e-7)


# -- what the backward pass recomputes, and a 4-bit base ------------------------------------------------------
@pytest.mark.parametrize("mode", ["mlp", "full", "1e-6"])  # a budget too small for anything: every layer recomputed
def test_checkpointing_modes_train_the_same_deltas_as_none(setup, tmp_path, mode):
    plain = train(setup, "llama", tmp_path / "plain", steps=2)
    checked = train(setup, "llama", tmp_path / mode, steps=2, checkpointing=mode)
    assert checked.config.training.checkpointing == mode and checked.config.training.gradient_checkpointing
    a = load_file(str(tmp_path / "plain" / "delta.safetensors"))
    b = load_file(str(tmp_path / mode / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plain.curve == checked.curve


def test_a_4bit_base_trains_deltas_that_apply_to_the_full_precision_base(setup, tmp_path):
    pytest.importorskip("bitsandbytes")
    result = train(setup, "llama", tmp_path / "nf4", steps=2, quantize="4bit")
    assert result.config.training.quantize == "4bit"
    deltas = load_file(str(tmp_path / "nf4" / "delta.safetensors"))
    assert any(bool(t.abs().sum()) for name, t in deltas.items() if name.endswith("_delta"))
    model = load_sparse_model(tmp_path / "nf4", merge=True)  # the full-precision base with the delta merged
    assert type(model.model.layers[0].mlp.gate_proj).__name__ == "Linear"
    assert_one_line_error(run("finetune", setup / "llama", "en", "--quantize", "4bit", "--merged", "--mask",
                              setup / "reg", "--data", setup / "texts", "--out", tmp_path / "x", ok=False),
                          "cannot be merged into", "--merged")
    assert_one_line_error(run("finetune", setup / "llama", "en", "--quantize", "4bit", "--subset", "ffn", "--data",
                              setup / "texts", "--out", tmp_path / "y", ok=False), "4-bit base", "--quantize")


def test_a_bos_tokenizer_trains_and_validates_on_rows_after_bos(setup, tmp_path):
    """Where the tokenizer puts BOS first, every training and validation row is fed after it and all of the
    row's tokens are predicted: the step-0 validation loss and the first step's training loss (taken before
    any update) equal transformers' own loss on [BOS] + row, over rows packed here by hand."""
    from transformers import AutoModelForCausalLM

    from support.tiny import make_tokenizer

    folder = save_model(tiny_model("llama"), tmp_path / "bosllama", bos=True)
    write_mask(tmp_path / "reg", "bosllama", "en", EN)
    tok = make_tokenizer()
    stream = []
    for line in (setup / "texts" / "en.txt").read_text(encoding="utf-8").splitlines():
        stream += [tok.convert_tokens_to_ids(ch) for ch in line] + [tok.eos_token_id]
    rows = [stream[i:i + 32] for i in range(0, 160, 32)]  # 5 rows: 4 to train on, the last validates

    run_settings, load = settings(setup, tmp_path / "run", steps=1, eval_every=1, batch_size=4, tokens=160)
    result = finetune(str(folder), "en", run_settings, load=load, manifest=load_manifest(),
                      registry=LocalRegistry(tmp_path / "reg"))
    assert (result.config.training.train_rows, result.config.training.eval_rows) == (4, 1)

    base = AutoModelForCausalLM.from_pretrained(folder).eval()

    def nll(row):  # summed over the row's 32 tokens, each predicted once
        ids = torch.tensor([[1] + row])
        with torch.no_grad():
            return float(base(input_ids=ids, labels=ids).loss) * len(row)

    assert result.curve[0]["val_loss"] == pytest.approx(nll(rows[4]) / 32, rel=1e-5)
    assert result.curve[1]["train_loss"] == pytest.approx(sum(nll(row) for row in rows[:4]) / (4 * 32), rel=1e-5)
