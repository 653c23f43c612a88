"""A 4-bit (NF4) frozen base under row-sparse deltas (neuronreg.finetune.quantize), on bitsandbytes' CPU
backend: the model computes with the dequantized weights (loss and delta gradients equal to a full-precision
model holding them, exactly), the deltas learn, and the saved delta applies to the full-precision base."""

import copy

import pytest
import torch
from torch import nn

from neuronreg.errors import FinetuneError, MissingExtra
from neuronreg.finetune.checkpointing import enable_checkpointing
from neuronreg.finetune.deltas import apply_delta_tensors, attach_deltas, delta_tensors, save_delta
from neuronreg.models import find_mlp_sites

from support.tiny import INTER, tiny_model

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'neuronreg[quantize]')")
from neuronreg.finetune.quantize import dequantized_weight, quantize_frozen_base  # noqa: E402

CUDA = torch.cuda.is_available()
NEURONS = [torch.arange(0, INTER, 5), torch.arange(1, INTER, 3)]


def with_deltas(arch: str, scale: float = 0.1):
    """A tiny model with random nonzero deltas (so the deltas' own path shows in every comparison)."""
    model = tiny_model(arch)
    sites = find_mlp_sites(model)
    layers = attach_deltas(model, NEURONS, sites)
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.normal_(0, scale, generator=torch.Generator().manual_seed(p.numel()))
    return model, sites, layers


def dequantized_copy(quantized: nn.Module, reference: nn.Module) -> nn.Module:
    """``reference`` (a full-precision copy made before quantizing) with every quantized projection's weight
    replaced by the weight the 4-bit module dequantizes to."""
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = dequantized_weight(module)
                target = modules[name]
                target.weight.copy_(weight.T if type(target).__name__ == "Conv1D" else weight)
    return reference


def loss_and_grads(model, ids):
    torch.manual_seed(3)  # GPT-2's dropout: the same masks in both models
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_the_nf4_base_computes_with_its_dequantized_weights(arch):
    model, sites, _ = with_deltas(arch)
    reference = copy.deepcopy(model)
    info = quantize_frozen_base(model, sites)
    assert info.quant_type == "nf4" and info.blocksize == 64 and info.double_quant
    assert info.bytes_after < info.bytes_before / 2.5  # float32 -> 4 bits and statistics (tiny: 64-wide)
    reference = dequantized_copy(model, reference)
    ids = torch.randint(3, 80, (2, 20), generator=torch.Generator().manual_seed(0))
    model.train()
    reference.train()
    loss, grads = loss_and_grads(model, ids)
    want_loss, want = loss_and_grads(reference, ids)
    # bitsandbytes' CPU product is the dequantized weight's product, so not even rounding differs.
    assert torch.equal(loss, want_loss)
    assert len(grads) == len(want) == 6 and all(torch.equal(a, b) for a, b in zip(grads, want))
    assert all(float(g.abs().sum()) > 0 for g in grads)
    model.eval()
    reference.eval()
    with torch.no_grad():  # evaluation computes the same way (no bfloat16-only CPU repacking)
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_which_modules_are_stored_in_4_bits():
    model, sites, layers = with_deltas("llama")
    embed, head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    info = quantize_frozen_base(model, sites)
    quantized = {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    projections = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj.base", "mlp.up_proj.base", "mlp.down_proj.base"}
    assert quantized == {f"model.layers.{i}.{p}" for i in range(2) for p in projections}
    assert info.modules == 14
    assert type(model.model.embed_tokens) is nn.Embedding and torch.equal(model.model.embed_tokens.weight, embed)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, head)
    # the deltas stay float32 Parameters, the only trainable weights
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for layer in layers for p in layer.parameters()}
    assert all(p.dtype == torch.float32 for p in trainable)


def test_deltas_attached_to_an_already_quantized_model_are_the_same_deltas():
    """What a model loaded in 4 bits (transformers' BitsAndBytesConfig) then given deltas looks like."""
    model, sites, _ = with_deltas("llama")
    first = tiny_model("llama")
    first_sites = find_mlp_sites(first)
    for p in first.parameters():
        p.requires_grad_(False)
    quantize_frozen_base(first, first_sites)
    layers = attach_deltas(first, NEURONS, first_sites)
    assert [tuple(p.shape) for layer in layers for p in layer.parameters()] == [(10, 32), (10, 32), (32, 10),
                                                                               (16, 32), (16, 32), (32, 16)]
    other = tiny_model("llama")  # a saved delta loads onto a 4-bit model too (to resume or evaluate there)
    for p in other.parameters():
        p.requires_grad_(False)
    quantize_frozen_base(other, find_mlp_sites(other))
    apply_delta_tensors(other, delta_tensors(layers))
    quantize_frozen_base(model, sites)
    mine = dict(model.named_parameters())
    theirs = {n: p for n, p in first.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in theirs.items():
            p.copy_(mine[name])
    ids = torch.randint(3, 80, (2, 20), generator=torch.Generator().manual_seed(0))
    (loss, grads), (other_loss, other) = loss_and_grads(model.train(), ids), loss_and_grads(first.train(), ids)
    assert torch.equal(loss, other_loss) and all(torch.equal(a, b) for a, b in zip(grads, other))


def test_selective_checkpointing_on_the_nf4_base_gives_the_same_gradients():
    model, sites, _ = with_deltas("llama")
    quantize_frozen_base(model, sites)
    ids = torch.randint(3, 80, (2, 20), generator=torch.Generator().manual_seed(0))
    loss, grads = loss_and_grads(model.train(), ids)
    for mode in ("mlp", "full"):
        done = enable_checkpointing(model, sites, mode)
        got_loss, got = loss_and_grads(model, ids)
        done.undo()
        assert torch.equal(got_loss, loss) and all(torch.equal(a, b) for a, b in zip(got, grads)), mode


def test_a_delta_trained_on_the_nf4_base_applies_to_the_full_precision_base(tmp_path):
    model, sites, layers = with_deltas("llama", scale=0.0)
    quantize_frozen_base(model, sites)
    params = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(3, 80, (4, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1  # the deltas learn on the 4-bit base
    path = save_delta(layers, tmp_path / "delta.safetensors")

    from safetensors.torch import load_file

    saved = load_file(str(path))
    trained = delta_tensors(layers)
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    # the same file a full-precision run writes: the same names, shapes and dtypes
    plain = delta_tensors(attach_deltas(tiny_model("llama"), NEURONS))
    assert {k: (v.shape, v.dtype) for k, v in saved.items()} == {k: (v.shape, v.dtype) for k, v in plain.items()}

    base = tiny_model("llama")  # the full-precision base
    merged = copy.deepcopy(base)  # independent: the deltas added into the float32 weights by hand
    with torch.no_grad():
        for site, layer in zip(find_mlp_sites(merged), ("model.layers.0.mlp", "model.layers.1.mlp")):
            index = saved[f"{layer}.neurons"]
            site.mlp.gate_proj.weight[index] += saved[f"{layer}.gate_delta"]
            site.mlp.up_proj.weight[index] += saved[f"{layer}.up_delta"]
            site.mlp.down_proj.weight[:, index] += saved[f"{layer}.down_delta"]
    apply_delta_tensors(base, saved)
    probe = torch.randint(3, 80, (2, 30), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got, want = base(input_ids=probe).logits, merged(input_ids=probe).logits
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)  # float32: (W + D) x against W x + D x


def test_refusals():
    model, sites, _ = with_deltas("llama")
    with pytest.raises(FinetuneError, match="quant_type must be"):
        quantize_frozen_base(model, sites, quant_type="int4")
    for p in model.parameters():
        p.requires_grad_(True)  # dense training: nothing frozen to quantize
    with pytest.raises(FinetuneError, match="no frozen linear projection"):
        quantize_frozen_base(model, sites)


def test_without_bitsandbytes_the_error_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what importing an absent package does
    model, sites, _ = with_deltas("llama")
    with pytest.raises(MissingExtra, match=r"pip install 'neuronreg\[quantize\]'"):
        quantize_frozen_base(model, sites)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_the_nf4_base_on_cuda_in_bfloat16():
    model, sites, _ = with_deltas("llama")
    model.to("cuda", torch.bfloat16)
    for layer in model.model.layers:  # deltas stay float32 master weights, as training keeps them
        for module in layer.mlp.modules():
            for name in ("delta", "bias_delta"):
                p = getattr(module, name, None)
                if isinstance(p, nn.Parameter):
                    p.data = p.data.float()
    reference = copy.deepcopy(model)
    info = quantize_frozen_base(model, sites)
    assert all(m.weight.device.type == "cuda" for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert info.bytes_after < info.bytes_before / 2.5
    reference = dequantized_copy(model, reference)
    ids = torch.randint(3, 80, (2, 64), device="cuda")
    (loss, grads), (want_loss, want) = loss_and_grads(model.train(), ids), loss_and_grads(reference.train(), ids)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-2)
    for a, b in zip(grads, want):  # bf16 products in other kernels: compare as vectors
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2
