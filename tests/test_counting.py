"""Counts equal an independent recomputation of the activations, on every supported MLP layout."""

import pytest
import torch
import torch.nn.functional as F

from neuronreg.lape.counting import Checkpoint, activation_hooks, batches, count_activations
from neuronreg.models import find_mlp_sites

from support.tiny import ARCHS, tiny_model

# The activation each family applies, written out here rather than taken from the model.
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "gelu_new": lambda z: 0.5 * z * (1.0 + torch.tanh((2.0 / torch.pi) ** 0.5 * (z + 0.044715 * z**3))),
    "relu": F.relu,
    "bloom": lambda z: z * 0.5 * (1.0 + torch.tanh(0.79788456 * z * (1 + 0.044715 * z * z))),
}

FIRST_PROJECTION = {"gated": "gate_proj", "fused-gated": "gate_up_proj", "gpt2": "c_fc", "fc": "fc1",
                    "bloom": "dense_h_to_4h"}


def activation_name(config) -> str:
    if config.model_type == "bloom":
        return "bloom"
    for attr in ("hidden_act", "hidden_activation", "activation_function"):
        if getattr(config, attr, None):
            return getattr(config, attr)
    raise AssertionError(config)


def independent_counts(model, rows, start=None):
    """Capture each first projection's INPUT, recompute projection and activation by hand, count > 0.
    With ``start``, every row is fed after that token and its position is left out by hand."""
    layout_sites = find_mlp_sites(model)  # only used to know which module is the first projection
    inter = layout_sites[0].intermediate_size
    act = ACTIVATIONS[activation_name(model.config)]
    counts = torch.zeros(len(layout_sites), inter, dtype=torch.int64)
    captured = {}
    handles = []
    for site in layout_sites:
        proj = getattr(site.mlp, FIRST_PROJECTION[site.layout])
        handles.append(proj.register_forward_pre_hook(
            lambda m, args, layer=site.layer: captured.__setitem__(layer, args[0])))
    try:
        with torch.no_grad():
            for row in rows:
                fed = row if start is None else torch.cat([torch.tensor([start]), row])
                model(fed.unsqueeze(0))  # the full model, LM head included, one row at a time
                for site in layout_sites:
                    proj = getattr(site.mlp, FIRST_PROJECTION[site.layout])
                    x = captured[site.layer].reshape(-1, captured[site.layer].shape[-1])
                    x = x if start is None else x[1:]
                    if site.layout == "gpt2":
                        z = torch.addmm(proj.bias, x, proj.weight)
                    else:
                        z = F.linear(x, proj.weight, proj.bias)
                    if site.layout == "fused-gated":
                        z = z[:, :inter]  # the gate half comes first
                    counts[site.layer] += (act(z) > 0).sum(0)
    finally:
        for h in handles:
            h.remove()
    return counts


def random_rows(vocab: int, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_equal_independent_computation(arch):
    model = tiny_model(arch)
    sites = find_mlp_sites(model)
    rows = random_rows(model.config.vocab_size, [40, 40, 40, 40, 40, 17])
    counts = count_activations(model, sites, rows, batch_size=3)
    expected = independent_counts(model, rows)
    assert counts.tokens == 40 * 5 + 17
    assert torch.equal(counts.over_zero, expected)
    # Not trivially all-or-nothing: the counts really discriminate between neurons.
    assert 0 < int(counts.over_zero.min()) or int(counts.over_zero.max()) < counts.tokens
    assert len(set(counts.over_zero.flatten().tolist())) > 5


@pytest.mark.parametrize("arch", ARCHS)
def test_counts_after_a_row_start_leave_its_position_out(arch):
    """Rows fed after a BOS (as Gemma's tokenizer encodes text): the text's tokens are counted exactly, the
    BOS position nowhere; and the BOS does change what the text's positions compute."""
    model = tiny_model(arch)
    sites = find_mlp_sites(model)
    rows = random_rows(model.config.vocab_size, [40, 40, 40, 40, 40, 17])
    counts = count_activations(model, sites, rows, batch_size=3, row_start=1)
    expected = independent_counts(model, rows, start=1)
    assert counts.tokens == 40 * 5 + 17
    assert torch.equal(counts.over_zero, expected)
    assert int(counts.over_zero.max()) <= counts.tokens
    # The BOS is context every later position attends to: the counts differ from those of rows fed bare.
    assert not torch.equal(counts.over_zero, independent_counts(model, rows))


def test_hooks_exist_only_during_the_run():
    model = tiny_model("llama")
    sites = find_mlp_sites(model)
    with activation_hooks(sites, "cpu"):
        assert all(len(site.activation._forward_hooks) == 1 for site in sites)
    assert all(len(site.activation._forward_hooks) == 0 for site in sites)

    def failing_rows():
        yield torch.arange(3, 20)
        raise RuntimeError("corpus broke")

    with pytest.raises(RuntimeError):
        count_activations(model, sites, failing_rows())
    assert all(len(site.activation._forward_hooks) == 0 for site in sites)


def test_batches_never_pad():
    rows = [torch.arange(8)] * 5 + [torch.arange(3)]
    shapes = [tuple(b.shape) for b in batches(rows, 2)]
    assert shapes == [(2, 8), (2, 8), (1, 8), (1, 3)]


def test_interrupt_then_resume_equals_uninterrupted(tmp_path):
    model = tiny_model("qwen2")
    sites = find_mlp_sites(model)
    rows = random_rows(model.config.vocab_size, [32] * 9 + [5], seed=3)
    whole = count_activations(model, sites, rows, batch_size=2)

    checkpoint = Checkpoint(tmp_path / "ckpt.safetensors", fingerprint="settings-1")

    def interrupted():
        for i, row in enumerate(rows):
            if i == 5:
                raise KeyboardInterrupt
            yield row

    with pytest.raises(KeyboardInterrupt):
        count_activations(model, sites, interrupted(), batch_size=2, checkpoint=checkpoint, checkpoint_tokens=10**9)
    saved = checkpoint.load()
    assert saved is not None and saved[2] == 4  # two whole batches were counted, the third never finished
    resumed = count_activations(model, sites, rows, batch_size=2, checkpoint=checkpoint)
    assert resumed.tokens == whole.tokens
    assert torch.equal(resumed.over_zero, whole.over_zero)
    # A checkpoint made with other settings is not used.
    assert Checkpoint(checkpoint.path, fingerprint="settings-2").load() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_positive_counts_is_exactly_greater_than_zero(dtype):
    from neuronreg.lape.counting import positive_counts

    x = torch.randn(300, 7).to(dtype)
    x[0, 0], x[1, 0], x[2, 0], x[3, 0] = float("nan"), float("inf"), float("-inf"), -0.0
    x[4, 1] = torch.finfo(dtype).tiny  # the smallest positive normal number still counts
    expected = (x > 0).sum(0)
    assert torch.equal(positive_counts(x), expected)


def test_compute_with_a_bos_tokenizer_counts_the_text_after_bos_and_records_it(tmp_path):
    """End to end: a model whose tokenizer puts BOS first is counted on its rows fed after that BOS; the
    counts file says so, and counts made before (no row start) are settings that changed."""
    from neuronreg.corpus import CorpusSource, iter_documents, pack_rows
    from neuronreg.errors import SettingsConflict
    from neuronreg.lape.compute import CountSettings, compute
    from neuronreg.manifest import load_manifest
    from neuronreg.provenance import CountKey
    from neuronreg.store.local import LocalRegistry

    from support.tiny import make_tokenizer, save_model, write_corpus

    model = tiny_model("llama")
    save_model(model, tmp_path / "model", bos=True)
    write_corpus(tmp_path / "texts", {"en": "en", "ru": "ru"})
    registry = LocalRegistry(tmp_path / "registry")
    settings = CountSettings(corpus=str(tmp_path / "texts"), tokens=700, seq_len=64, batch_size=3)
    compute(str(tmp_path / "model"), ["en", "ru"], manifest=load_manifest(), registry=registry, settings=settings)
    for lang in ("en", "ru"):
        over_zero, record = registry.read_counts("model", lang)
        assert record.settings.row_start == "bos" and record.tokens == 700
        rows = list(pack_rows(iter_documents(CorpusSource("local", str(tmp_path / "texts" / f"{lang}.txt"))),
                              make_tokenizer(), 64, 700))
        assert all(1 not in row.tolist() for row in rows)  # the BOS is never part of the text's rows
        assert torch.equal(over_zero, independent_counts(model, rows, start=1))

    # A counts file written before row starts were recorded has no key: it reads as None, and is other settings.
    stored = registry.read_counts_record("model", "en").settings.to_dict()
    old = {k: v for k, v in stored.items() if k != "row_start"}
    assert CountKey.from_dict(old).row_start is None
    assert CountKey.from_dict(stored).changed(CountKey.from_dict(old)) == ["row_start"]
    save_model(model, tmp_path / "plain")  # the same weights with a tokenizer that adds no BOS
    compute(str(tmp_path / "plain"), ["en"], manifest=load_manifest(), registry=registry, settings=settings,
            name="model", force=True)
    plain = registry.read_counts_record("model", "en").settings
    assert plain.row_start is None and "row_start" not in plain.to_dict()
    with pytest.raises(SettingsConflict, match="row_start"):
        compute(str(tmp_path / "model"), ["en"], manifest=load_manifest(), registry=registry, settings=settings)
