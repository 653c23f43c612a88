"""Selective activation checkpointing (neuronreg.finetune.checkpointing): the same loss and the same gradients
as without checkpointing, bit for bit on CPU, for row-sparse deltas, LoRA and dense training; the undo;
the estimate of the kept activations against what autograd really saves; the budget's plan against a
brute-force search."""

import itertools
import logging

import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neuronreg.errors import FinetuneError, SettingsError
from neuronreg.finetune import checkpointing as ck
from neuronreg.finetune.adapters import resolve_targets
from neuronreg.finetune.checkpointing import LayerShape, enable_checkpointing, parse_checkpointing
from neuronreg.finetune.deltas import attach_deltas
from neuronreg.models import find_mlp_sites

from support.tiny import INTER, tiny_model


def trainable_model(arch: str, kind: str, dropout: float = 0.1):
    """A tiny model with its trainable weights: deltas on some neurons, LoRA on the MLP, or every weight."""
    model = tiny_model(arch)
    sites = find_mlp_sites(model)
    if kind == "deltas":
        attach_deltas(model, [torch.arange(0, INTER, 5), torch.arange(1, INTER, 3)], sites)
    elif kind == "lora":
        targets, _, fan_in_fan_out = resolve_targets(model, sites, None)
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                 fan_in_fan_out=fan_in_fan_out, bias="none")
        model = peft.get_peft_model(model, config)
        with torch.no_grad():  # LoRA's B starts at zero; random B makes every adapter weight's gradient nonzero
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.train(), sites


def step(model, ids, autocast: bool = False):
    """Loss and every trainable weight's gradient of one backward pass (the same dropout masks each call)."""
    torch.manual_seed(5)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def transformers_checkpointing(model, on: bool) -> None:
    """transformers' gradient checkpointing, non-reentrant, under its transformers 5 name where it has it."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


@pytest.mark.parametrize("kind", ["deltas", "lora", "dense"])
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_every_mode_gives_the_loss_and_gradients_of_no_checkpointing_bit_for_bit(arch, kind):
    """Recomputation replays the same CPU kernels on the same inputs, with the forward's random state
    (GPT-2's dropout, LoRA's dropout), so nothing may differ, not even by rounding."""
    model, sites = trainable_model(arch, kind)
    ids = torch.randint(3, 80, (2, 24), generator=torch.Generator().manual_seed(0))
    loss, grads = step(model, ids)
    assert grads and all(float(g.abs().sum()) > 0 for g in grads.values())  # every trainable weight learns
    shape = ck.layer_shape(model, sites)
    assert shape.trainable == kind
    one_layer_mixed = (ck.estimate(shape, ["full", "none"], 48) + 1) / ck.GIB  # a budget for full + none
    for mode in ("mlp", "full", one_layer_mixed):
        done = enable_checkpointing(model, sites, mode, batch_size=2, seq_len=24)
        if not isinstance(mode, str):
            assert done.modes == ["full", "none"]
        got_loss, got = step(model, ids)
        done.undo()
        assert torch.equal(got_loss, loss), mode
        assert got.keys() == grads.keys()
        for name in grads:
            assert torch.equal(got[name], grads[name]), (mode, name)
    # transformers' own gradient checkpointing (today's --gradient-checkpointing) gives the same too
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    transformers_checkpointing(base, True)
    got_loss, got = step(model, ids)
    transformers_checkpointing(base, False)
    assert torch.equal(got_loss, loss) and all(torch.equal(got[n], grads[n]) for n in grads)


def test_mlp_mode_in_bfloat16_autocast_equals_no_checkpointing():
    model, sites = trainable_model("llama", "deltas")
    ids = torch.randint(3, 80, (2, 24), generator=torch.Generator().manual_seed(1))
    loss, grads = step(model, ids, autocast=True)
    done = enable_checkpointing(model, sites, "mlp", dtype=torch.bfloat16)
    got_loss, got = step(model, ids, autocast=True)
    done.undo()
    assert torch.equal(got_loss, loss) and all(torch.equal(got[n], grads[n]) for n in grads)


def test_mlp_recomputes_the_mlp_and_full_the_layer_only_while_training_with_gradients():
    model, sites = trainable_model("llama", "deltas")
    ids = torch.randint(3, 80, (1, 16))
    calls = {"mlp": 0, "attention": 0}

    def counter(key):  # pre-hooks: a recomputation stops once it has what the backward needs, maybe mid-module
        return lambda *args: calls.__setitem__(key, calls[key] + 1)

    handles = [site.mlp.gate_proj.register_forward_pre_hook(counter("mlp")) for site in sites]
    handles += [layer.self_attn.register_forward_pre_hook(counter("attention")) for layer in model.model.layers]
    expected = {"none": (2, 2), "mlp": (4, 2), "full": (4, 4)}  # (MLP runs, attention runs) over 2 layers
    for mode, (mlp_runs, attention_runs) in expected.items():
        done = enable_checkpointing(model, sites, mode)
        calls.update(mlp=0, attention=0)
        step(model, ids)
        assert (calls["mlp"], calls["attention"]) == (mlp_runs, attention_runs), mode
        calls.update(mlp=0, attention=0)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
        model.eval()
        model(input_ids=ids, use_cache=False).logits.sum().backward()
        model.train()
        assert (calls["mlp"], calls["attention"]) == (4, 4), mode  # no recomputation: 2 plain forwards
        done.undo()
    for handle in handles:
        handle.remove()


def test_undo_restores_the_modules_and_keeps_an_instance_forward_already_there():
    model, sites = trainable_model("llama", "deltas")
    ids = torch.randint(3, 80, (1, 16))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layer = model.model.layers[0]
    plain = layer.forward

    def hooked(*args, **kwargs):  # what accelerate's device-map hooks put on a module
        return plain(*args, **kwargs)

    layer.forward = hooked
    done = enable_checkpointing(model, sites, "full")
    assert all("forward" in m.__dict__ for m in model.model.layers)
    step(model, ids)
    done.undo()
    done.undo()  # twice is harmless
    assert layer.__dict__["forward"] is hooked
    del layer.forward
    done = enable_checkpointing(model, sites, "mlp")
    assert all("forward" in site.mlp.__dict__ for site in sites)
    done.undo()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert model.state_dict().keys() == before_state.keys()
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_opt_has_no_mlp_module_of_its_own_so_mlp_mode_checkpoints_its_layer():
    model, sites = trainable_model("opt", "deltas")
    done = enable_checkpointing(model, sites, "mlp")
    assert done.modes == ["full", "full"]
    done.undo()


def test_transformers_checkpointing_on_at_the_same_time_is_refused():
    model, sites = trainable_model("llama", "deltas")
    transformers_checkpointing(model, True)
    with pytest.raises(FinetuneError, match="gradient_checkpointing_disable"):
        enable_checkpointing(model, sites, "mlp")


@pytest.mark.parametrize("value, want", [("none", "none"), ("MLP", "mlp"), (" full ", "full"), ("20", 20.0),
                                         ("3.5GiB", 3.5), (12, 12.0), (0.5, 0.5)])
def test_parse_checkpointing(value, want):
    assert parse_checkpointing(value) == want


@pytest.mark.parametrize("value", ["some", "", "0", "-1", "nan", "inf", None, True, float("nan")])
def test_parse_checkpointing_refuses_what_is_neither_a_mode_nor_a_budget(value):
    with pytest.raises(SettingsError, match="checkpointing must be"):
        parse_checkpointing(value)


def test_a_budget_needs_the_batch_shape_and_trainable_a_known_kind():
    model, sites = trainable_model("llama", "deltas")
    with pytest.raises(SettingsError, match="batch_size and seq_len"):
        enable_checkpointing(model, sites, 1.0)
    with pytest.raises(SettingsError, match="trainable must be one of deltas, lora, dense"):
        enable_checkpointing(model, sites, "mlp", trainable="adapters")


# -- the estimate against what autograd keeps ----------------------------------------------------------
H, INTER_1, HEADS, KV, BATCH, SEQ = 64, 176, 4, 2, 2, 24  # 48 tokens: no size is another's


def one_layer_llama(kind: str, dtype: torch.dtype, dropout: float = 0.0):
    config = LlamaConfig(vocab_size=100, hidden_size=H, intermediate_size=INTER_1, num_hidden_layers=1,
                         num_attention_heads=HEADS, num_key_value_heads=KV)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    sites = find_mlp_sites(model)
    if kind == "deltas":
        attach_deltas(model, [torch.arange(0, INTER_1, 9)], sites)  # 20 neurons
    elif kind == "lora":
        config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                 target_modules=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    return model.train(), sites


def saved_bytes(model, autocast: bool) -> int:
    """Bytes of the distinct storages autograd keeps from one decoder layer's forward, without the weights and
    the position embeddings (shared by all layers). A non-reentrant checkpoint keeps its inputs through
    autograd too (torch's _NoopSaveInputs), and what runs inside it goes through its own hooks, not these."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = base.model.layers[0]
    ids = torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = base.model.embed_tokens(ids)
    x.requires_grad_(True)
    positions = torch.arange(SEQ)[None].expand(BATCH, -1)
    cos_sin = base.model.rotary_emb(x, positions)
    excluded = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *cos_sin]}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(x, position_embeddings=cos_sin, attention_mask=None, position_ids=positions)
    return sum(seen.values())


@pytest.mark.parametrize("kind, dtype, autocast, dropout", [
    ("deltas", torch.bfloat16, True, 0.0), ("deltas", torch.bfloat16, False, 0.0),
    ("deltas", torch.float32, False, 0.0), ("lora", torch.bfloat16, True, 0.0),
    ("lora", torch.bfloat16, True, 0.1), ("dense", torch.bfloat16, True, 0.0)])
def test_the_estimate_is_what_autograd_keeps_in_a_llama_layer(kind, dtype, autocast, dropout):
    model, sites = one_layer_llama(kind, dtype, dropout)
    shape = ck.layer_shape(model, sites, dtype=torch.bfloat16 if autocast else dtype)
    assert (shape.trainable, shape.neurons, shape.lora_dropout) == (kind, 20 if kind == "deltas" else 0, dropout > 0)
    tokens = BATCH * SEQ
    p = shape.dtype_bytes
    # Hand count of the 64-wide layer, per token (p bytes per element): 2 norms x (64 x 4 + 4), q and output
    # 64 x p each, k and v 32 x p each, log-sum-exp 4 x 4, the MLP's input 64 x p (not for LoRA), its gate,
    # up and act(gate) 176 x p each; then what the trained weights need. Deltas (20 neurons): gate's and up's 20
    # added outputs and down's 20 selected inputs, and per layer their bf16 casts (3 x 20 x 64). LoRA (rank
    # 4): a copy of the input of gate, up (64) and down (176), with dropout a float32 mask of each, and A's
    # output (4); per layer the bf16 casts of A and B. Dense: the norms' normalised inputs and q/k/v's
    # input (3 x 64), down's input (176).
    per_token = 2 * (64 * 4 + 4) + (64 + 64 + 32 + 32) * p + 16 + 64 * p * (kind != "lora") + 3 * 176 * p
    per_token += {"deltas": 3 * 20 * p, "lora": (2 * 64 + 176) * (p + 4 * (dropout > 0)) + 3 * 4 * p,
                  "dense": 3 * 64 * p + 176 * p}[kind]
    casts = {"deltas": 3 * 20 * 64 * p, "lora": 4 * p * (3 * (64 + 176)), "dense": 0}[kind] if p == 2 else 0
    assert shape.kept_bytes("none", tokens) == tokens * per_token + casts
    assert saved_bytes(model, autocast) == shape.kept_bytes("none", tokens)
    for mode in ("mlp", "full"):
        done = enable_checkpointing(model, sites, mode)
        assert saved_bytes(model, autocast) == shape.kept_bytes(mode, tokens), mode
        done.undo()


def test_the_estimate_at_llama_3_1_8b_size():
    """The worked example of the docs: seq 2048, bf16, a 1% mask (143 neurons in a layer)."""
    shape = LayerShape(hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128, neurons=143)
    assert shape.kept("full") == 8192
    assert shape.kept("mlp") == 2 * (4 * 4096 + 4) + 2 * (2 * 4096 + 2 * 1024) + 4 * 32 + 2 * 4096 == 61576
    assert shape.kept("none") == 61576 + 3 * 2 * 14336 + 3 * 2 * 143 == 148450
    casts = 3 * 2 * 143 * 4096
    tokens = 2048
    # every layer full: the 32 inputs, and the last layer's recomputation while its backward runs
    assert ck.estimate(shape, ["full"] * 32, tokens) == tokens * (32 * 8192 + 148450) + casts  # 0.79 GiB
    assert ck.estimate(shape, ["mlp"] * 32, tokens) == tokens * (32 * 61576 + 86874) + casts  # 3.93 GiB
    assert ck.estimate(shape, ["none"] * 32, tokens) == 32 * (tokens * 148450 + casts)  # 9.17 GiB
    mlp_share = shape.flops("mlp", 2048) / shape.flops("full", 2048)
    assert mlp_share == pytest.approx(6 * 4096 * 14336 / (6 * 4096 * 14336 + 2 * 4096 * 6144 + 2 * 4096 * 4096
                                                          + 2 * 2048 * 4096))


def brute_force(shape, layers, tokens, seq, budget):
    """The cheapest assignment over all 3**layers, by recomputed FLOPs then bytes (independent of the search
    over counts in plan())."""
    best = None
    for modes in itertools.product(ck.MODES, repeat=layers):
        size = ck.estimate(shape, list(modes), tokens)
        if size <= budget:
            cost = sum(shape.flops(m, seq) for m in modes)
            if best is None or (cost, size) < best:
                best = (cost, size)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_the_budget_plan_is_the_cheapest_that_fits(seed):
    g = torch.Generator().manual_seed(seed)
    shape = LayerShape(hidden=int(torch.randint(16, 512, (1,), generator=g)),
                       intermediate=int(torch.randint(32, 2048, (1,), generator=g)), heads=4, kv_heads=2,
                       head_dim=8, neurons=3)
    layers, tokens, seq = 5, 64, 64
    low, high = ck.estimate(shape, ["full"] * layers, tokens), ck.estimate(shape, ["none"] * layers, tokens)
    for budget in torch.linspace(low, high, 9).tolist():
        modes = ck.plan(shape, layers, tokens, seq, budget)
        size = ck.estimate(shape, modes, tokens)
        assert size <= budget
        assert (sum(shape.flops(m, seq) for m in modes), size) == brute_force(shape, layers, tokens, seq, budget)
        order = [ck.MODES.index(m) for m in modes]  # full, then mlp, then none
        assert order == sorted(order, reverse=True)


def test_a_budget_below_full_checkpointing_checkpoints_every_layer_and_warns(caplog):
    shape = LayerShape(hidden=64, intermediate=176, heads=4, kv_heads=2, head_dim=16)
    with caplog.at_level(logging.WARNING, logger="neuronreg"):
        assert ck.plan(shape, 3, 64, 64, 10.0) == ["full"] * 3
    assert "more than the budget" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checkpointing_on_cuda_in_bfloat16_autocast():
    """On CUDA the forward replays the same kernels (the loss is equal), but SDPA's backward may accumulate in
    another order from run to run, so the gradients are compared as vectors."""
    model, sites = trainable_model("llama", "deltas")
    model.to("cuda")
    ids = torch.randint(3, 80, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()
    loss, grads = step(model, ids, autocast=True)
    for mode in ("mlp", "full"):
        done = enable_checkpointing(model, sites, mode, dtype=torch.bfloat16)
        got_loss, got = step(model, ids, autocast=True)
        done.undo()
        assert torch.equal(got_loss, loss), mode
        for name in grads:
            assert float((got[name] - grads[name]).norm() / grads[name].norm()) < 1e-2, (mode, name)
