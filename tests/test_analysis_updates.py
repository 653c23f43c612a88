"""Weight updates (neuronreg.analysis.updates) against straightforward dense computations: the tuned
model's weights (merged by neuronreg or by PEFT) minus the base's, read by each architecture's own
attribute paths, and norms, spreads and shares by loops."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from neuronreg.analysis import updates
from neuronreg.errors import MaskError, SettingsError
from neuronreg.mask import NeuronMask

from support.tiny import INTER, LAYERS, tiny_model

# Each architecture's MLP weights, read by hand: role -> (attribute path under the layer, stored [in, out]?).
PATHS = {
    "llama": ("model.layers", {"gate": ("mlp.gate_proj", False), "up": ("mlp.up_proj", False),
                               "down": ("mlp.down_proj", False)}),
    "phi3": ("model.layers", {"gate_up": ("mlp.gate_up_proj", False), "down": ("mlp.down_proj", False)}),
    "gpt2": ("transformer.h", {"in": ("mlp.c_fc", True), "down": ("mlp.c_proj", True)}),
    "opt": ("model.decoder.layers", {"in": ("fc1", False), "down": ("fc2", False)}),
}


def _get(module, path):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def weights_by_hand(model, arch):
    """Per layer, role -> float64 [out, in] copy of the weight."""
    stack, roles = PATHS[arch]
    out = []
    for layer in _get(model, stack):
        weights = {}
        for role, (path, transposed) in roles.items():
            w = _get(layer, path).weight.detach().double()
            w = w.T if transposed else w
            if role == "gate_up":
                weights["gate"], weights["up"] = w[:INTER].clone(), w[INTER:].clone()
            else:
                weights[role] = w.clone()
        out.append(weights)
    return out


def squares_by_hand(diff):
    """Per layer, the list of x_j: the squared norm of neuron j's rows (first projections) and column (down)."""
    out = []
    for layer in diff:
        x = []
        for j in range(INTER):
            total = 0.0
            for role, d in layer.items():
                vector = d[:, j] if role == "down" else d[j, :]
                total += sum(float(v) ** 2 for v in vector)
            x.append(total)
        out.append(x)
    return out


def spread_by_hand(x, top=0.01):
    n, total = len(x), sum(x)
    k = max(1, math.ceil(top * n))
    p = [v / total for v in x if v > 0]
    h = -sum(q * math.log(q) for q in p)
    gini = sum(abs(a - b) for a in x for b in x) / (2 * n * total)
    return {"neurons": n, "touched": sum(v > 0 for v in x), "squared_norm": total, "top_neurons": k,
            "top_share": sum(sorted(x, reverse=True)[:k]) / total, "effective_neurons": math.exp(h),
            "entropy": h / math.log(n), "gini": gini}


def check_analysis(analysis, base_hand, tuned_hand):
    diff = [{role: tuned[role] - base[role] for role in base} for base, tuned in zip(base_hand, tuned_hand)]
    for record in analysis.projections:
        d, w = diff[record.layer][record.projection], base_hand[record.layer][record.projection]
        assert record.update_norm == pytest.approx(float(torch.linalg.matrix_norm(d)), rel=1e-5, abs=1e-12)
        assert record.base_norm == pytest.approx(float(torch.linalg.matrix_norm(w)), rel=1e-12)
        assert record.relative == pytest.approx(record.update_norm / record.base_norm, rel=1e-12)
    assert sorted((r.layer, r.projection) for r in analysis.projections) == sorted(
        (layer, role) for layer in range(len(diff)) for role in diff[layer])
    x = squares_by_hand(diff)
    for layer, spread in enumerate(analysis.layers):
        expected = spread_by_hand(x[layer])
        got = {k: v for k, v in spread.to_dict().items() if k in expected}
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-9)
    everything = spread_by_hand([v for layer in x for v in layer])
    assert {k: v for k, v in analysis.overall.to_dict().items() if k in everything} == pytest.approx(everything,
                                                                                                     rel=1e-4)
    total = sum(float(torch.linalg.matrix_norm(d)) ** 2 for layer in diff for d in layer.values())
    assert analysis.update_norm == pytest.approx(math.sqrt(total), rel=1e-5)
    return x


@pytest.mark.parametrize("arch", sorted(PATHS))
def test_row_sparse_and_dense_equal_the_merged_difference(arch):
    from neuronreg.finetune.deltas import attach_deltas, delta_tensors, merge_deltas

    base, tuned = tiny_model(arch), tiny_model(arch)
    neurons = [torch.tensor([0, 3, 17, 40]), torch.tensor([5, 47])]
    layers = attach_deltas(tuned, neurons)
    torch.manual_seed(7)
    for layer in layers:
        for p in layer.parameters():
            p.data.normal_(0, 0.2)
    tensors = delta_tensors(layers)
    merge_deltas(layers, torch.float32)
    base_hand, tuned_hand = weights_by_hand(base, arch), weights_by_hand(tuned, arch)

    sparse = updates.analyse_update(updates.mlp_weights(base), updates.row_sparse_update(tensors, base))
    x = check_analysis(sparse, base_hand, tuned_hand)
    assert sparse.kind == "row-sparse" and [s.touched for s in sparse.layers] == [4, 2]
    assert json.loads(json.dumps(sparse.to_dict()))["overall"]["touched"] == 6
    assert all((v > 0) == (j in neurons[layer].tolist()) for layer in range(LAYERS) for j, v in enumerate(x[layer]))

    dense = updates.analyse_update(updates.mlp_weights(base), updates.DenseUpdate(updates.mlp_weights(base),
                                                                                  updates.mlp_weights(tuned)))
    check_analysis(dense, base_hand, tuned_hand)
    assert dense.kind == "dense"
    # The whole update is on the trained neurons: all of it falls on that mask.
    share = updates.mask_share(sparse.neuron_squares, neurons, draws=0)
    assert share.share == 1.0 and [s.share for s in share.layers] == [1.0, 1.0]


@pytest.mark.parametrize("arch,targets,options,skipped", [
    ("llama", ["gate_proj", "up_proj", "down_proj", "q_proj"], {}, ["model.layers.0.self_attn.q_proj",
                                                                     "model.layers.1.self_attn.q_proj"]),
    ("llama", ["up_proj"], {"use_rslora": True}, []),
    ("phi3", ["gate_up_proj", "down_proj"], {}, []),
    ("gpt2", ["mlp.c_fc", "mlp.c_proj", "attn.c_attn"], {"fan_in_fan_out": True}, ["transformer.h.0.attn.c_attn",
                                                                                    "transformer.h.1.attn.c_attn"]),
])
def test_low_rank_equals_peft_merge(tmp_path, arch, targets, options, skipped):
    import warnings

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    base = tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = get_peft_model(tiny_model(arch), LoraConfig(r=4, lora_alpha=6, target_modules=targets, **options))
    torch.manual_seed(3)
    for name, p in adapted.named_parameters():
        if "lora_" in name:
            p.data.normal_(0, 0.3)
    adapted.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tuned = adapted.merge_and_unload()

    update = updates.low_rank_update(tensors, config, base)
    analysis = updates.analyse_update(updates.mlp_weights(base), update)
    check_analysis(analysis, weights_by_hand(base, arch), weights_by_hand(tuned, arch))
    assert analysis.kind == "low-rank" and update.skipped == skipped
    if arch == "llama" and targets == ["up_proj"]:
        assert {(r.projection, r.update_norm == 0.0) for r in analysis.projections} == {
            ("gate", True), ("up", False), ("down", True)}


def test_low_rank_refuses_what_is_not_plain_lora():
    base = tiny_model("llama")
    for config in ({"r": 4, "lora_alpha": 8, "use_dora": True}, {"r": 4, "lora_alpha": 8, "rank_pattern": {"x": 2}},
                   {"peft_type": "IA3"}):
        with pytest.raises(SettingsError):
            updates.low_rank_update({}, config, base)


def test_spread_on_known_vectors():
    uniform = updates.neuron_spread(torch.ones(200))
    assert (uniform.gini, uniform.entropy, uniform.top_neurons, uniform.touched) == (0.0, pytest.approx(1.0), 2, 200)
    assert uniform.effective_neurons == pytest.approx(200.0) and uniform.top_share == pytest.approx(0.01)
    one = updates.neuron_spread(torch.tensor([0.0, 0.0, 3.0, 0.0]))
    assert (one.gini, one.entropy, one.effective_neurons, one.top_share, one.touched) == (0.75, 0.0, 1.0, 1.0, 1)
    none = updates.neuron_spread(torch.zeros(5), layer=2)
    assert (none.layer, none.touched, none.top_share, none.entropy, none.gini) == (2, 0, None, None, None)


def _exact_distribution(squares, counts):
    """Every random mask of ``counts[l]`` neurons per layer, each equally likely: the share of each."""
    total = sum(sum(x) for x in squares)
    per_layer = [[sum(x[j] for j in chosen) for chosen in itertools.combinations(range(len(x)), k)]
                 for x, k in zip(squares, counts)]
    return [sum(parts) / total for parts in itertools.product(*per_layer)]


def test_mask_share_against_enumeration():
    squares = [torch.tensor([4.0, 1.0, 0.0, 2.5, 0.5]), torch.tensor([1.0, 3.0, 0.25, 0.0]),
               torch.tensor([2.0, 2.0, 7.0])]
    mask = [[0, 3], [2], []]
    result = updates.mask_share(squares, mask, draws=20_000, seed=11)
    total = sum(float(x.sum()) for x in squares)
    assert result.share == pytest.approx((4.0 + 2.5 + 0.25) / total, rel=1e-15)
    shares = _exact_distribution([x.tolist() for x in squares], [2, 1, 0])
    mean = sum(shares) / len(shares)
    sd = math.sqrt(sum((s - mean) ** 2 for s in shares) / len(shares))
    assert result.expected == pytest.approx(mean, rel=1e-13)
    assert result.random_sd == pytest.approx(sd, rel=1e-12)
    assert result.neurons == 3 and result.ratio == pytest.approx(result.share / mean)
    # The seeded draws follow that distribution (20,000 draws: the mean within 4 standard errors).
    assert abs(result.empirical_mean - mean) < 4 * sd / math.sqrt(20_000)
    assert result.empirical_sd == pytest.approx(sd, rel=0.03)
    assert min(shares) <= result.empirical_min and result.empirical_max <= max(shares)
    at_least = sum(s >= result.share for s in shares) / len(shares)
    assert abs(result.p_random - at_least) < 0.02
    assert [(s.layer, s.neurons, s.expected) for s in result.layers] == [(0, 2, 0.4), (1, 1, 0.25), (2, 0, 0.0)]
    assert result.layers[1].share == pytest.approx(0.25 / 4.25)
    again = updates.mask_share(squares, mask, draws=20_000, seed=11)
    assert again == result
    assert updates.mask_share(squares, mask, draws=20_000, seed=12).empirical_mean != result.empirical_mean
    assert set(result.to_dict()) >= {"share", "expected", "random_sd", "empirical_mean", "p_random", "ratio"}


def test_mask_share_takes_a_neuron_mask_and_refuses_bad_ones():
    squares = [torch.arange(INTER, dtype=torch.float64) for _ in range(LAYERS)]
    mask = NeuronMask.from_per_layer([[46, 47], [47]], intermediate_size=INTER)
    result = updates.mask_share(squares, mask.per_layer(), draws=500, seed=0)
    assert result.share == pytest.approx((46 + 47 + 47) / (2 * sum(range(INTER))))
    assert result.p_random == 1 / 501  # the largest neurons of each layer: no random draw does as well
    with pytest.raises(MaskError, match="layers"):
        updates.mask_share(squares, [[0]], draws=0)
    with pytest.raises(MaskError, match="outside"):
        updates.mask_share(squares, [[48], []], draws=0)
    with pytest.raises(MaskError, match="twice"):
        updates.mask_share(squares, [[1, 1], []], draws=0)
    with pytest.raises(SettingsError, match="zero everywhere"):
        updates.mask_share([torch.zeros(3)], [[0]], draws=0)
