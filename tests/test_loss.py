"""The chunked linear cross-entropy equals the plain loss, and its gradients, on every layout; the
full-vocabulary logits never exist; and the rule that picks it keeps small models on the plain loss."""

import logging

import pytest
import torch

import neuronreg.evaluation.heldout as heldout
from neuronreg.evaluation.heldout import IGNORE, chunked_token_nll, output_head, token_nll, use_chunked_loss
from neuronreg.finetune.deltas import attach_deltas

from support.tiny import ARCHS, tiny_model

TOL = dict(rtol=1e-4, atol=1e-5)  # float32 sums in another order


def batch(seed=0, rows=3, length=13):
    """Ids, an attention mask and labels with padding at the end of the last row (no loss there)."""
    ids = torch.randint(3, 80, (rows, length), generator=torch.Generator().manual_seed(seed))
    attention = torch.ones_like(ids)
    attention[-1, -4:] = 0
    ids[-1, -4:] = 0
    labels = ids.masked_fill(attention == 0, IGNORE)
    return ids, attention, labels


def with_head_transform(arch):
    model = tiny_model(arch)
    if arch == "gemma3":  # off by default in Gemma 3's config; on here, so that it is tested
        model.config.final_logit_softcapping = 5.0
    if arch == "gemma2":
        model.config.final_logit_softcapping = 5.0  # small, so that it changes the logits a lot
    return model


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_loss_and_every_weight_gradient_equal_the_plain_loss(arch):
    ids, attention, labels = batch()
    results = []
    for chunked in (False, True):
        model = with_head_transform(arch)  # eval(): no dropout, the two passes see the same function
        for p in model.parameters():
            p.requires_grad_(True)
        if chunked:
            loss, count = chunked_token_nll(model, ids, attention, labels, chunk_tokens=5)  # 5 does not divide 34
        else:
            loss, count = token_nll(model, ids, attention, labels, chunked=False)
        loss.backward()
        results.append((loss.detach(), count, grads(model)))
    (plain, n_plain, g_plain), (chunk, n_chunk, g_chunk) = results
    assert n_plain == n_chunk == 3 * 12 - 4
    torch.testing.assert_close(chunk, plain, **TOL)
    assert g_plain.keys() == g_chunk.keys() and len(g_plain) == len(list(tiny_model(arch).parameters()))
    for name in g_plain:
        torch.testing.assert_close(g_chunk[name], g_plain[name], **TOL, msg=lambda m: f"{arch} {name}: {m}")


@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "cohere"])
def test_the_head_transform_is_applied(arch):
    model = with_head_transform(arch)
    head = output_head(model)
    assert (head.softcap, head.scale) == ((5.0, None) if arch.startswith("gemma") else (None, 0.0625))
    ids, attention, labels = batch()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.base_model(input_ids=ids)[0]
        torch.testing.assert_close(head.logits(hidden), logits, **TOL)
        bare = model.lm_head(hidden)
    assert not torch.allclose(bare, logits)  # the transform matters on these weights


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_delta_gradients_equal_with_the_chunked_loss(arch):
    ids, attention, labels = batch(seed=1)
    per_layer = [torch.tensor([3, 7, 11, 20]), torch.tensor([5, 40])]
    results = []
    for chunked in (False, True):
        model = tiny_model(arch)
        layers = attach_deltas(model, per_layer)
        with torch.no_grad():  # non-zero deltas, so that the path through them is exercised too
            for layer in layers:
                for p in layer.parameters():
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
        loss, _ = token_nll(model, ids, attention, labels, chunked=chunked)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (plain, g_plain), (chunk, g_chunk) = results
    torch.testing.assert_close(chunk, plain, **TOL)
    assert g_plain and g_plain.keys() == g_chunk.keys()
    assert all(name.endswith("delta") for name in g_plain)
    for name in g_plain:
        torch.testing.assert_close(g_chunk[name], g_plain[name], **TOL)


def test_with_gradient_checkpointing_of_the_body_the_gradients_are_the_same():
    ids, attention, labels = batch(seed=2)
    results = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        layers = attach_deltas(model, [torch.tensor([1, 2, 30]), torch.tensor([0, 47])])
        model.train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:  # transformers 5; older versions have only the old name
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss, _ = token_nll(model, ids, attention, labels, chunked=True)
        loss.backward()
        results.append([p.grad.clone() for layer in layers for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


def test_the_full_vocabulary_logits_never_exist_and_backward_recomputes_per_chunk():
    model = tiny_model("llama")
    for p in model.parameters():
        p.requires_grad_(True)
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        ids, attention, labels = batch(rows=2, length=40)
        loss, count = chunked_token_nll(model, ids, attention, labels, chunk_tokens=16)
        forward_calls = len(seen)
        loss.backward()
    finally:
        handle.remove()
    assert count == 2 * 39 - 4
    assert forward_calls == 5 and all(rows <= 16 for rows, _ in seen)  # 74 positions in chunks of 16
    assert len(seen) == 2 * forward_calls  # backward ran each chunk's head again instead of keeping its logits


def test_nothing_to_predict_gives_zero_that_backward_accepts():
    model = tiny_model("llama")
    ids = torch.randint(3, 80, (2, 6))
    labels = torch.full_like(ids, IGNORE)
    for chunked in (False, True):
        loss, count = token_nll(model, ids, labels=labels, chunked=chunked)
        loss.backward()
        assert count == 0 and float(loss.detach()) == 0.0


def test_the_rule_keeps_small_batches_on_the_plain_loss_and_chunks_large_ones(monkeypatch):
    model = tiny_model("llama")  # vocabulary 86
    ids = torch.zeros(2, 33, dtype=torch.long)  # 2 x 32 predicted positions x 86 = 5504 logits
    assert not use_chunked_loss(model, ids)
    assert use_chunked_loss(model, ids, True) and not use_chunked_loss(model, ids, False)
    monkeypatch.setattr(heldout, "CHUNKED_LOSS_ABOVE", 5503)
    assert use_chunked_loss(model, ids)
    assert not use_chunked_loss(model, ids, False)
    # Llama-3.1-8B's vocabulary: one row of 2048 tokens is chunked by default, a row of 512 is not.
    monkeypatch.undo()
    big = type("Big", (), {"vocabulary": 128256})
    monkeypatch.setattr(heldout, "output_head", lambda model: big)
    assert use_chunked_loss(model, torch.zeros(1, 2049, dtype=torch.long))
    assert not use_chunked_loss(model, torch.zeros(1, 513, dtype=torch.long))


def test_an_unknown_head_falls_back_to_the_plain_loss_with_a_warning(caplog, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(model.config, "model_type", "mystery", raising=False)
    monkeypatch.setattr(heldout, "_WARNED", set())
    assert output_head(model) is None
    ids, attention, labels = batch()
    with caplog.at_level(logging.WARNING, logger="neuronreg"):
        loss, _ = token_nll(model, ids, attention, labels, chunked=True)
    assert "using the plain loss" in caplog.text
    plain, _ = token_nll(model, ids, attention, labels, chunked=False)
    assert torch.equal(loss, plain)
    with pytest.raises(ValueError, match="chunked=False"):
        chunked_token_nll(model, ids)


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_peft_wrapped_model_gives_the_same_chunked_and_plain_loss(kind):
    """evaluate holds a LoRA or IA3 run as a ``peft.PeftModel``, whose ``base_model`` is PEFT's tuner
    around the whole causal LM: the chunked loss must look through it to the body, or it feeds the
    logits to the head again (found on Gemma 3, whose 262k vocabulary makes evaluate chunk)."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    config = (peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                              init_lora_weights=False) if kind == "lora"
              else peft.IA3Config(target_modules=["gate_proj", "up_proj", "down_proj"],
                                  feedforward_modules=["down_proj"], init_ia3_weights=False))
    wrapped = peft.get_peft_model(model, config).eval()
    assert output_head(wrapped) is not None
    ids, attention, labels = batch(seed=3)
    with torch.no_grad():
        plain, n_plain = token_nll(wrapped, ids, attention, labels, chunked=False)
        chunk, n_chunk = token_nll(wrapped, ids, attention, labels, chunked=True)
        bare, _ = token_nll(tiny_model("llama"), ids, attention, labels, chunked=False)
    assert n_plain == n_chunk
    torch.testing.assert_close(chunk, plain, **TOL)
    assert not torch.allclose(plain, bare)  # the adapter is in the loss: it was not initialised to identity
