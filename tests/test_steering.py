"""Steering with the registry's neurons: recorded mean activations, the steering hooks, generate and
steer-eval, on the planted tiny Llama (its planted neurons fire on exactly one script)."""

import json
import math
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import neuronreg
import neuronreg.steering as steering
from neuronreg.errors import RegistryError, SettingsError
from neuronreg.hooks import NeuronEdit, steered_neurons
from neuronreg.lape.counting import Checkpoint, count_activations
from neuronreg.models import find_mlp_sites
from neuronreg.steering.evaluate import Condition, draw_shares
from neuronreg.steering.plan import layer_ranges, parse_layers, parse_strengths
from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, packing_interrupted, run
from support.tiny import ARCHS, PLANTED, SCRIPTS, TOP_RATE, make_tokenizer, planted_model, tiny_model, vocabulary

LANGS = ("en", "ru", "el")
CUDA = torch.cuda.is_available()


def compute(planted, registry, *extra, langs=LANGS, ok=True):
    return run("compute", planted / "model", *langs, "--corpus", planted / "texts", "--tokens", "3k", "--seq-len", 64,
               "--top-rate", TOP_RATE, "--registry", registry, "-q", *extra, ok=ok)


@pytest.fixture(scope="module")
def reg(planted) -> Path:
    registry = planted / "registry"
    if not registry.exists():
        compute(planted, registry)
    return registry


def hooks_on(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def planted_ids(tokens_per_script: int = 4) -> torch.Tensor:
    vocab = vocabulary()
    ids = [vocab.index(ch) for lang in LANGS for ch in SCRIPTS[lang][:tokens_per_script]]
    return torch.tensor([ids])


def capture(sites):
    """Hooks registered after any steering hook: they see what each layer's activation passes on."""
    seen, handles = {}, []
    for site in sites:
        handles.append(site.activation.register_forward_hook(
            lambda module, inputs, output, layer=site.layer: seen.setdefault(layer, []).append(output.clone())))
    return seen, handles


def planted_neurons(lang):
    return {layer: torch.tensor(langs[lang]) for layer, langs in PLANTED.items()}


# -- the statistics compute records ---------------------------------------------------------------
def independent_sums(model, rows, batch_size=8, start=None):
    """The activation module's output, captured by our own hook, summed in float64 over the same rows; with
    ``start``, each row is fed after that token and its position is dropped here."""
    sites = find_mlp_sites(model)
    shape = (len(sites), sites[0].intermediate_size)
    total, positive = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)

    def make(layer):
        def hook(module, inputs, output):
            flat = output.reshape(-1, output.shape[-1]).double().cpu()
            flat = flat if start is None else flat[1:]  # one row at a time: position 0 is the start token
            total[layer] += flat.sum(0)
            positive[layer] += flat.clamp(min=0).sum(0)
        return hook

    handles = [site.activation.register_forward_hook(make(site.layer)) for site in sites]
    try:
        with torch.no_grad():
            for row in rows:  # one row at a time: another summation order than neuronreg's batches
                fed = row if start is None else torch.cat([torch.tensor([start]), row])
                model(input_ids=fed[None].to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return total, positive


def test_recorded_means_equal_an_independent_computation(planted, reg):
    from transformers import AutoModelForCausalLM

    from neuronreg.corpus import CorpusSource, iter_documents, pack_rows

    model = AutoModelForCausalLM.from_pretrained(planted / "model").eval()
    tok = make_tokenizer()
    registry = LocalRegistry(reg)
    for lang, stem in (("ru", "Russian"), ("en", "eng")):
        rows = list(pack_rows(iter_documents(CorpusSource("local", str(planted / "texts" / f"{stem}.txt"))), tok,
                              64, 3000))
        total, positive = independent_sums(model, rows)
        stats = registry.read_activation_means("model", lang)
        assert stats.tokens == sum(r.numel() for r in rows) == 3000
        # The file keeps float32 means: each within half a float32 step (2**-24 of it) of the float64 mean.
        fired = stats.over_zero.clamp(min=1).double()
        for got, want in ((stats.mean, total / 3000), (stats.positive_mean, positive / fired)):
            assert torch.equal(got, got.float().double())
            torch.testing.assert_close(got, want, rtol=2**-24 + 1e-12, atol=1e-30)
        # A planted neuron of the language fires on its script's tokens (all but the separators); another
        # script's planted neuron never fires, so its positive mean is 0.
        for layer, neurons in planted_neurons(lang).items():
            assert bool((stats.over_zero[layer, neurons] > 2900).all())
            assert bool((stats.positive_mean[layer, neurons] > 0.1).all())
        other = "el"
        for layer, neurons in planted_neurons(other).items():
            assert bool((stats.over_zero[layer, neurons] == 0).all())
            assert bool((stats.positive_mean[layer, neurons] == 0).all())
    counts = pq.read_table(reg / "model" / "counts" / "ru.parquet")
    assert counts.column_names == ["count", "mean", "positive_mean"]
    assert counts.schema.field("mean").type == pa.float32() and counts.schema.field("count").type == pa.int32()


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_equal_an_independent_computation_on_every_layout(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in [40] * 5 + [17]]
    counts = count_activations(model, find_mlp_sites(model), rows, batch_size=3)
    total, positive = independent_sums(model, rows)
    torch.testing.assert_close(counts.activation_sum, total, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(counts.positive_sum, positive, rtol=1e-10, atol=1e-9)
    assert bool((counts.positive_sum[counts.over_zero == 0] == 0).all())
    assert count_activations(model, find_mlp_sites(model), rows, statistics=False).activation_sum is None


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "gpt2"])
def test_statistics_after_a_row_start_leave_its_position_out(arch):
    model = tiny_model(arch)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in [40] * 5 + [17]]
    # One row a batch, as the independent sums run: the same float32 activations, so float64 rounding is all
    # that may differ (batched, a matmul of another shape may round an activation differently).
    counts = count_activations(model, find_mlp_sites(model), rows, batch_size=1, row_start=1)
    total, positive = independent_sums(model, rows, start=1)
    assert counts.tokens == 217
    torch.testing.assert_close(counts.activation_sum, total, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(counts.positive_sum, positive, rtol=1e-10, atol=1e-9)
    bare, _ = independent_sums(model, rows)
    assert not torch.allclose(total, bare)  # the start token changed what the text's positions compute


def test_nan_and_inf_activations_keep_the_sums_finite():
    from neuronreg.lape.counting import add_activation_sums, positive_counts

    x = torch.tensor([[float("nan"), 1.0, -2.0], [float("inf"), 3.0, float("-inf")], [-0.0, 0.5, 4.0]])
    total, positive = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    add_activation_sums(x, total, positive)
    big = torch.finfo(torch.float32).max
    assert total.tolist() == [big, 4.5, 2.0 - big] and positive.tolist() == [big, 4.5, 4.0]
    assert positive_counts(x).tolist() == [1, 3, 1]  # the counts are untouched by the sums


def test_resume_after_interrupt_gives_the_same_statistics(planted, tmp_path, monkeypatch):
    reg_a, reg_b = tmp_path / "a", tmp_path / "b"
    compute(planted, reg_a, "--checkpoint-tokens", 64, "--batch-size", 3, langs=("ru",))
    with packing_interrupted(monkeypatch):
        stopped = compute(planted, reg_b, "--checkpoint-tokens", 64, "--batch-size", 3, langs=("ru",), ok=False)
    assert stopped.exit_code == 130
    checkpoint = reg_b / "model" / ".partial" / "ru.safetensors"
    from safetensors.torch import load_file

    assert set(load_file(str(checkpoint))) == {"over_zero", "activation_sum", "positive_sum"}
    resumed = compute(planted, reg_b, "--checkpoint-tokens", 64, "--batch-size", 3, langs=("ru",))
    assert "resumed" in resumed.output
    a = LocalRegistry(reg_a).read_activation_means("model", "ru")
    b = LocalRegistry(reg_b).read_activation_means("model", "ru")
    # The same batches added in the same order: the float64 sums, and so the means, are equal bit for bit.
    assert torch.equal(a.over_zero, b.over_zero)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.positive_mean, b.positive_mean)


def test_checkpoints_without_or_with_bad_sums_are_discarded(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    counts = torch.tensor([[1, 2], [0, 3]])
    old = Checkpoint(path, "f")
    old.save(counts, 5, 1)  # as an older neuronreg wrote it: counts only
    assert old.load((2, 2))[3] is None  # fine where no statistics are wanted
    assert old.load((2, 2), statistics=True) is None and not path.exists()  # else counting starts again
    sums = {"activation_sum": torch.tensor([[1.0, -1.0], [-2.0, 2.0]], dtype=torch.float64),
            "positive_sum": torch.tensor([[1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)}
    old.save(counts, 5, 1, sums)
    loaded = old.load((2, 2), statistics=True)
    assert torch.equal(loaded[3]["positive_sum"], sums["positive_sum"])
    for bad in ({**sums, "activation_sum": torch.full((2, 2), float("nan"), dtype=torch.float64)},
                {**sums, "positive_sum": -sums["positive_sum"] - 1},
                {**sums, "positive_sum": sums["positive_sum"].float()}):
        old.save(counts, 5, 1, bad)
        assert old.load((2, 2), statistics=True) is None and not path.exists()


# -- counts files: optional columns, validated -------------------------------------------------------
def rewrite(path: Path, change) -> None:
    table = pq.read_table(path)
    metadata = table.schema.metadata
    table = change(table)
    pq.write_table(table.replace_schema_metadata(metadata), path)


def test_counts_without_statistics_still_load_and_steering_says_to_recount(planted, reg, tmp_path):
    import shutil

    shutil.copytree(reg, tmp_path / "reg")
    path = tmp_path / "reg" / "model" / "counts" / "ru.parquet"
    rewrite(path, lambda t: t.drop_columns(["mean", "positive_mean"]))
    registry = LocalRegistry(tmp_path / "reg")
    over_zero, record = registry.read_counts("model", "ru")
    assert over_zero.shape == (2, 48) and record.tokens == 3000
    with pytest.raises(RegistryError, match="force=True") as caught:
        registry.read_activation_means("model", "ru")
    assert caught.value.fix == "recount"
    refused = run("generate", planted / "model", "abc", "--deactivate", "en", "--activate", "ru", "--registry",
                  tmp_path / "reg", ok=False)
    assert_one_line_error(refused, "ru", "no mean activations", "--force")
    # Switching a language off needs no means: that still works with old counts.
    run("generate", planted / "model", "abc", "--deactivate", "ru", "--max-new-tokens", 3, "--registry",
        tmp_path / "reg", "-q")
    # Counting again with --force writes them.
    compute(planted, tmp_path / "reg", "--force", langs=("ru",))
    assert registry.read_activation_means("model", "ru").tokens == 3000


def float32(value, n):
    return pa.array([value] * n, pa.float32())


@pytest.mark.parametrize("damage, what", [
    (lambda t: t.set_column(1, "mean", float32(float("nan"), t.num_rows)), "not finite"),
    (lambda t: t.set_column(2, "positive_mean", float32(-1.0, t.num_rows)), "negative"),
    (lambda t: t.set_column(2, "positive_mean", float32(1.0, t.num_rows)), "never positive"),
    (lambda t: t.drop_columns(["positive_mean"]), "without positive_mean"),
    (lambda t: t.set_column(1, "mean", pa.array(["x"] * t.num_rows)), "not float32"),
    (lambda t: t.set_column(0, "count", t.column("count").cast(pa.float64())), "not integers"),
    (lambda t: t.slice(1), "rows for 2 x 48 neurons"),
])
def test_damaged_statistics_are_one_clear_error(planted, reg, tmp_path, damage, what):
    import shutil

    shutil.copytree(reg, tmp_path / "reg")
    rewrite(tmp_path / "reg" / "model" / "counts" / "el.parquet", damage)
    registry = LocalRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match=what):
        registry.read_activation_means("model", "el")
    if what in ("not finite", "negative", "never positive", "not float32"):  # a mean's value, or its type
        assert registry.read_counts("model", "el")[0].shape == (2, 48)  # selection reads the counts alone
    else:
        with pytest.raises(RegistryError, match=what):
            registry.read_counts("model", "el")


def test_write_counts_refuses_sums_it_could_not_read_back(tmp_path):
    registry = LocalRegistry(tmp_path / "reg")
    counts = torch.zeros(1, 2, dtype=torch.int64)
    with pytest.raises(RegistryError, match="never positive"):
        registry.write_counts("m", "en", counts, None, activation_sum=torch.zeros(1, 2, dtype=torch.float64),
                              positive_sum=torch.ones(1, 2, dtype=torch.float64))
    assert not (tmp_path / "reg" / "m" / "counts" / "en.parquet").exists()


# -- the steering hooks ---------------------------------------------------------------------------------
def test_deactivate_zeroes_exactly_and_activate_sets_the_recorded_means(reg):
    model = planted_model(PLANTED)
    sites = find_mlp_sites(model)
    means = LocalRegistry(reg).read_activation_means("model", "ru").mean
    ids = planted_ids()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain, handles = capture(sites)
        before = model(input_ids=ids).logits
        for handle in handles:
            handle.remove()
        for strength in (1.0, 2.5):
            with neuronreg.steer(model, deactivate="English", activate="ru", strength=strength, registry=reg,
                                 model_name="model") as plan:
                seen, handles = capture(sites)
                steered = model(input_ids=ids).logits
                for handle in handles:
                    handle.remove()
            assert plan.deactivated == 3 and plan.activated == 3 and plan.selection == "top9.375"
            for layer in (0, 1):
                out = seen[layer][0]
                en, ru = planted_neurons("en")[layer], planted_neurons("ru")[layer]
                assert plain[layer][0][..., en].abs().sum() > 0 and bool((out[..., en] == 0).all())
                want = (means[layer, ru] * strength).float().expand(*out.shape[:-1], len(ru))
                assert torch.equal(out[..., ru], want)
            keep = torch.ones(48, dtype=torch.bool)
            keep[torch.cat([planted_neurons("en")[0], planted_neurons("ru")[0]])] = False
            assert torch.equal(seen[0][0][..., keep], plain[0][0][..., keep])  # layer 0: nothing else moves
            assert not torch.equal(steered, before)
        after = model(input_ids=ids).logits
    assert torch.equal(after, before) and hooks_on(model) == 0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_additive_mode_adds_the_difference_of_means_on_the_union(reg):
    model = planted_model(PLANTED)
    sites = find_mlp_sites(model)
    registry = LocalRegistry(reg)
    el = registry.read_activation_means("model", "el").positive_mean
    en = registry.read_activation_means("model", "en").positive_mean
    ids = planted_ids()
    with torch.no_grad():
        plain, handles = capture(sites)
        model(input_ids=ids)
        for handle in handles:
            handle.remove()
        with neuronreg.steer(model, deactivate="en", activate="el", strength=0.5, mode="additive",
                             statistic="positive", registry=reg, model_name="model", layers="0") as plan:
            seen, handles = capture(sites)
            model(input_ids=ids)
            for handle in handles:
                handle.remove()
    union = torch.tensor([3, 7, 20])  # layer 0's en and el neurons
    assert plan.layers == [0] and plan.per_layer() == [3, 0] and plan.mode == "additive"
    delta = (0.5 * (el[0, union] - en[0, union])).float()
    assert torch.equal(seen[0][0][..., union], plain[0][0][..., union] + delta)
    assert bool((delta[:2] < 0).all()) and bool((delta[2] > 0).all())  # en neurons pushed down, el up
    assert hooks_on(model) == 0


def test_layers_limit_the_steering(reg):
    model = planted_model(PLANTED)
    sites = find_mlp_sites(model)
    for layers in ("1", range(1, 2), [1]):
        with torch.no_grad(), neuronreg.steer(model, deactivate="en", registry=reg, model_name="model",
                                              layers=layers) as plan:
            seen, handles = capture(sites)
            model(input_ids=planted_ids())
            for handle in handles:
                handle.remove()
        assert plan.layers == [1] and plan.per_layer() == [0, 1]
        assert seen[0][0][..., planted_neurons("en")[0]].abs().sum() > 0
        assert bool((seen[1][0][..., planted_neurons("en")[1]] == 0).all())
    with pytest.raises(SettingsError, match="layers 0-1; 2 is not"):
        with neuronreg.steer(model, deactivate="en", registry=reg, model_name="model", layers="0-5"):
            pass
    for bad in ("3-1", "a-b", "", [0.5], 7):
        with pytest.raises(SettingsError):
            parse_layers(bad, 2)
    assert parse_layers("0-3,20-22, 7", 30) == [0, 1, 2, 3, 7, 20, 21, 22]
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert hooks_on(model) == 0


def test_hooks_are_gone_after_the_block_and_after_an_error(reg):
    model = planted_model(PLANTED)
    with neuronreg.steer(model, deactivate="en", activate="ru", registry=reg, model_name="model"):
        assert hooks_on(model) == 2
    assert hooks_on(model) == 0
    with pytest.raises(RuntimeError, match="broke"):
        with neuronreg.steer(model, deactivate="en", activate="ru", registry=reg, model_name="model"):
            raise RuntimeError("generation broke")
    assert hooks_on(model) == 0
    # An error before any hook is placed (a language without neurons) leaves none either.
    with pytest.raises(RegistryError, match="No de neurons"):
        with neuronreg.steer(model, deactivate="en", activate="de", registry=reg, model_name="model"):
            pass
    assert hooks_on(model) == 0


@pytest.mark.parametrize("bos", [False, True])
def test_prompts_are_encoded_as_the_tokenizer_encodes_text(bos):
    """Generation feeds each prompt as the tokenizer encodes it: after its BOS where it puts one first
    (Gemma, Llama 3), bare where it does not; a shorter prompt is padded on the left, before that BOS."""
    from neuronreg.steering.generation import GenerationSettings, generate_texts

    model, tok = planted_model(PLANTED), make_tokenizer(bos=bos)
    fed = []
    handle = model.model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(args[0].tolist()))
    try:
        generate_texts(model, tok, ["abc", "абвгд"], GenerationSettings(max_new_tokens=2, batch_size=2))
    finally:
        handle.remove()
    abc, cyrillic = [vocabulary().index(ch) for ch in "abc"], [vocabulary().index(ch) for ch in "абвгд"]
    start = [1] if bos else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else 2  # no pad token: the EOS pads
    assert fed[0] == [[pad, pad] + start + abc, start + cyrillic]


def test_steering_works_inside_generate(reg):
    model = planted_model(PLANTED)
    sites = find_mlp_sites(model)
    calls = []
    en = planted_neurons("en")
    with torch.no_grad(), neuronreg.steer(model, deactivate="en", registry=reg, model_name="model"):
        handles = [site.activation.register_forward_hook(
            lambda m, i, out, layer=site.layer: calls.append(bool((out[..., en[layer]] == 0).all())))
            for site in sites]
        out = model.generate(input_ids=planted_ids(), max_new_tokens=5, do_sample=False, pad_token_id=0)
        for handle in handles:
            handle.remove()
    assert out.shape[1] == planted_ids().shape[1] + 5
    assert len(calls) == 2 * 5 and all(calls)  # both layers, the prompt and four more steps
    assert hooks_on(model) == 0


def test_the_model_name_comes_from_the_folder(planted, reg):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(planted / "model")
    with neuronreg.steer(model, deactivate="en", registry=str(reg)) as plan:
        assert plan.model == "model"
    with pytest.raises(RegistryError, match="model_name"):
        with neuronreg.steer(planted_model(PLANTED), deactivate="en", registry=reg):
            pass


@pytest.mark.parametrize("arch", ARCHS)
def test_steered_neurons_on_every_layout_with_forward_and_generate(arch):
    model = tiny_model(arch)
    sites = find_mlp_sites(model)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    edits = {0: NeuronEdit(torch.tensor([1, 5]), torch.tensor([0.5, -2.0], dtype=torch.float64)),
             1: NeuronEdit(torch.tensor([7]), torch.tensor([1.0], dtype=torch.float64), additive=True)}
    with torch.no_grad():
        before = model(input_ids=ids).logits
        early, early_handles = capture(sites)  # registered first: sees each activation before it is steered
        with steered_neurons(sites, edits):
            seen, handles = capture(sites)
            steered = model(input_ids=ids).logits
            for handle in handles + early_handles:
                handle.remove()
            model.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        after = model(input_ids=ids).logits
    # (OPT runs its MLP on the flattened [batch x positions, I] rows.)
    assert torch.equal(seen[0][0][..., [1, 5]].reshape(-1, 2), torch.tensor([0.5, -2.0]).expand(18, 2))
    assert torch.equal(seen[1][0][..., 7], early[1][0][..., 7] + 1.0)
    keep = [j for j in range(sites[0].intermediate_size) if j not in (1, 5, 7)]
    assert torch.equal(seen[0][0][..., keep], early[0][0][..., keep])
    assert torch.equal(seen[1][0][..., keep], early[1][0][..., keep])
    assert not torch.equal(steered, before) and torch.equal(after, before) and hooks_on(model) == 0
    width = sites[0].intermediate_size
    for index in ([width], [3, 3], [-1]):
        with pytest.raises(neuronreg.errors.MaskError, match=f"distinct and below {width}"):
            with steered_neurons(sites, {0: NeuronEdit(torch.tensor(index), torch.zeros(len(index)))}):
                pass
    assert hooks_on(model) == 0


def test_settings_are_checked_before_anything_runs(reg):
    model = planted_model(PLANTED)
    for kwargs, what in [({}, "Name a language"), ({"activate": "ru", "mode": "additive"}, "both"),
                         ({"activate": "ru", "strength": float("nan")}, "finite number"),
                         ({"activate": "ru", "strength": "2"}, "finite number"),
                         ({"activate": "ru", "mode": "swap"}, "mode"),
                         ({"activate": "ru", "deactivate": "Russian"}, "both the language")]:
        with pytest.raises(SettingsError, match=what):
            with neuronreg.steer(model, registry=reg, model_name="model", **kwargs):
                pass
    assert hooks_on(model) == 0
    assert parse_strengths("0, 0.5,1,1,4") == [0.0, 0.5, 1.0, 4.0]
    for bad in ("a", "1,nan", "", "inf"):
        with pytest.raises(SettingsError):
            parse_strengths(bad)


# -- the commands -----------------------------------------------------------------------------------------
def test_generate_prints_base_and_steered_side_by_side(planted, reg, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("привет\n\nαβγ\n", encoding="utf-8")
    result = run("generate", planted / "model", "abc", "--prompts", prompts, "--deactivate", "en", "--activate",
                 "ru", "--strength", 2, "--max-new-tokens", 6, "--registry", reg)
    assert result.stdout.count("prompt: ") == 3 and "prompt: αβγ" in result.stdout
    assert result.stdout.count(" | steered") == 3
    assert "en off (3 neurons), ru set to 2 x its mean activation (3 neurons)" in result.stderr
    data = json.loads(run("generate", planted / "model", "abc", "--activate", "el", "--sample", "--seed", 3,
                          "--temperature", 0.7, "--max-new-tokens", 4, "--registry", reg, "--json", "-q").stdout)
    assert data["steering"]["activate"] == "el" and data["generation"]["sample"] is True
    assert [o["prompt"] for o in data["outputs"]] == ["abc"]
    again = json.loads(run("generate", planted / "model", "abc", "--activate", "el", "--sample", "--seed", 3,
                           "--temperature", 0.7, "--max-new-tokens", 4, "--registry", reg, "--json", "-q").stdout)
    assert again["outputs"] == data["outputs"]  # seeded


def test_steer_eval_end_to_end_with_the_real_identifier(planted, reg, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the house\nдом\nτο σπίτι\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run("steer-eval", planted / "model", "--from", "en", "--to", "Russian", "--prompts", prompts, "--out",
                 out, "--strengths", "0,1,4", "--max-new-tokens", 8, "--registry", reg)
    lines = result.stdout.strip().splitlines()
    assert "ru (target)" in lines[0] and "en (source)" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["base", "x0", "x1", "x4"]
    assert "Wrote" in result.stderr and "py3langid" in result.stderr
    data = json.loads((out / "steering.json").read_text(encoding="utf-8"))
    assert data["source"] == "en" and data["target"] == "ru" and data["labels"] == {"source": "en", "target": "ru"}
    assert data["identifier"]["name"] == "py3langid" and data["steering"]["neurons"] == 6
    assert [row["strength"] for row in data["shares"]] == [None, 0.0, 1.0, 4.0]
    for row in data["shares"]:
        assert row["outputs"] == 3 and sum(row["languages"].values()) == 3
        assert math.isclose(row["target_share"] + row["source_share"] + row["other_share"], 1.0)
        assert 0 <= row["mean_confidence"] <= 1 and 0 <= row["distinct_2"] <= 1
    assert len(data["outputs"]) == 4 * 3 and {o["prompt"] for o in data["outputs"]} == {0, 1, 2}
    assert (out / "steering.csv").read_text().splitlines()[0] == \
        "condition,strength,outputs,target_share,source_share,other_share,mean_confidence,distinct_2"
    loop = Condition("x", 1.0, ["a b a b a b a b", "one two three four", "hi"], ["en"] * 3, [0.5] * 3)
    assert loop.distinct_2() == pytest.approx((2 / 7 + 1 + 1) / 3) and loop.mean_confidence() == 0.5
    assert len((out / "outputs.csv").read_text(encoding="utf-8").strip().splitlines()) >= 1 + 12
    png = (out / "steering.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (700, 420)
    again = draw_shares(data, tmp_path / "again.png")
    assert again.read_bytes() == png  # drawn from the JSON alone, byte for byte


def test_the_identifier_knows_the_seed_languages_and_says_und_without_letters():
    identifier = steering.LanguageIdentifier()
    manifest = neuronreg.load_manifest()
    for code in ("en", "fr", "de", "sw", "mt", "ne", "ka", "cy", "en_GB", "fil", "nb"):
        assert identifier.label_of(code, manifest) is not None, code
    assert identifier.label_of("fj", manifest) is None
    assert identifier.identify("Habari ya asubuhi, rafiki yangu, karibu nyumbani")[0] == "sw"
    assert identifier.identify("Le chat est assis sur le tapis de la cuisine")[0] == "fr"
    assert identifier.identify("  12, 13 ... !") == ("und", 0.0) and identifier.identify("") == ("und", 0.0)


def test_bad_input_is_one_line_and_writes_nothing(planted, reg, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def steer_eval(*extra, ok=False):
        return run("steer-eval", planted / "model", "--out", out, "--registry", reg, "--max-new-tokens", 2, *extra,
                   ok=ok)

    assert_one_line_error(steer_eval("--from", "en", "--to", "de"), "No de neurons", "available: el, en, ru")
    assert_one_line_error(steer_eval("--from", "en", "--to", "klingon"), "Unknown language")
    assert_one_line_error(steer_eval("--from", "en", "--to", "ru", "--layers", "9"), "layers 0-1", "--layers")
    assert_one_line_error(steer_eval("--from", "en", "--to", "en"), "both the language")
    for strengths in ("0,x", "1,inf"):
        bad = steer_eval("--from", "en", "--to", "ru", "--strengths", strengths)
        assert bad.exit_code == 2 and "Traceback" not in bad.output
        assert len(bad.output.strip().splitlines()) == 1 and "--strengths" in bad.output
    for strength in ("abc", "nan"):
        bad = run("generate", planted / "model", "abc", "--activate", "ru", "--strength", strength, "--registry", reg,
                  ok=False)
        assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1 and "--strength" in bad.output
    assert_one_line_error(run("generate", planted / "model", "abc", "--registry", reg, ok=False),
                          "Name a language", "--deactivate")
    assert_one_line_error(run("generate", planted / "model", "--activate", "ru", "--registry", reg, ok=False),
                          "No prompt", "--prompts FILE")
    assert_one_line_error(run("generate", planted / "model", "abc", "--activate", "ru", "--registry",
                              tmp_path / "empty", ok=False), "neuronreg compute")
    assert not out.exists() or not any(out.iterdir())

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(steering.evaluate, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert_one_line_error(run("steer-eval", planted / "model", "--from", "en", "--to", "ru", "--out", blocker / "o",
                              "--registry", reg, ok=False), "Cannot write to", "--out")


def test_commands_have_help_with_an_example():
    for command in ("generate", "steer-eval"):
        result = run(command, "--help")
        assert "Example:" in result.output and "--layers" in result.output and "--mode" in result.output


# -- CUDA ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", ["1", "0"])
def test_statistics_and_steering_on_cuda(fused, monkeypatch):
    from neuronreg.lape import kernels

    monkeypatch.setenv(kernels.ENV, fused)
    model = tiny_model("llama").to("cuda")
    sites = find_mlp_sites(model)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 80, (50,), generator=g) for _ in range(6)] + [torch.randint(3, 80, (17,), generator=g)]
    counts = count_activations(model, sites, rows, batch_size=4, device="cuda")
    total, positive = independent_sums(model, rows)
    torch.testing.assert_close(counts.activation_sum, total, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(counts.positive_sum, positive, rtol=1e-10, atol=1e-9)

    bf16 = tiny_model("llama").to("cuda", torch.bfloat16)
    sites = find_mlp_sites(bf16)
    edits = {0: NeuronEdit(torch.tensor([2, 9]), torch.tensor([0.3, 1.7], dtype=torch.float64))}
    ids = torch.randint(3, 60, (2, 9), generator=g).cuda()
    with torch.no_grad(), steered_neurons(sites, edits):
        seen, handles = capture(sites)
        bf16(input_ids=ids)
        bf16.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        for handle in handles:
            handle.remove()
    want = torch.tensor([0.3, 1.7], dtype=torch.float64).to("cuda", torch.bfloat16).expand(2, 9, 2)
    assert torch.equal(seen[0][0][..., [2, 9]], want)
    assert hooks_on(bf16) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_compute_on_cuda_records_the_statistics_of_the_bf16_model(planted, tmp_path):
    from transformers import AutoModelForCausalLM

    from neuronreg.corpus import CorpusSource, iter_documents, pack_rows

    compute(planted, tmp_path / "reg", "--device", "cuda", langs=("ru", "el"))
    stats = LocalRegistry(tmp_path / "reg").read_activation_means("model", "ru")
    assert stats.record.dtype == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(planted / "model", dtype=torch.bfloat16).to("cuda").eval()
    rows = list(pack_rows(iter_documents(CorpusSource("local", str(planted / "texts" / "Russian.txt"))),
                          make_tokenizer(), 64, 3000))
    total, positive = independent_sums(model, rows)
    torch.testing.assert_close(stats.mean, total / 3000, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats.positive_mean, positive / stats.over_zero.clamp(min=1).double(), rtol=1e-6,
                               atol=1e-9)
