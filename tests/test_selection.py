"""Selection equals an independent, loop-by-loop reading of lape.md section 2."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuronreg.errors import SelectionError
from neuronreg.lape.selection import SelectionParams, select_neurons


def reference_selection(over_zero, tokens, top_rate=0.01, filter_rate=0.95, bar_ratio=0.95):
    """lape.md section 2, written as plainly as possible with Python floats and lists."""
    over_zero = np.asarray(over_zero)
    L, I, K = over_zero.shape
    p = [[[over_zero[l, j, k] / tokens[k] for k in range(K)] for j in range(I)] for l in range(L)]
    H = [[0.0] * I for _ in range(L)]
    for l in range(L):
        for j in range(I):
            total = math.fsum(p[l][j])
            if total > 0:
                qs = [x / total for x in p[l][j]]
                H[l][j] = -math.fsum(q * math.log(q) for q in qs if q > 0)
    flat = sorted(x for layer in p for neuron in layer for x in neuron)
    N = len(flat)

    def kth(rate):
        return flat[min(max(round(N * rate), 1), N) - 1]

    t = kth(filter_rate)
    for l in range(L):
        for j in range(I):
            if not any(x > t for x in p[l][j]):
                H[l][j] = math.inf
    order = sorted(((H[l][j], l * I + j) for l in range(L) for j in range(I)))
    chosen = [index for _, index in order[: round(L * I * top_rate)]]
    bar = kth(bar_ratio)
    out = {}
    for k in range(K):
        out[k] = sorted((i // I, i % I) for i in chosen if p[i // I][i % I][k] > bar)
    return out, H, t, bar


def assert_matches_reference(over_zero, tokens, **rates):
    langs = [f"l{k}" for k in range(over_zero.shape[-1])]
    params = SelectionParams(rates.get("top_rate", 0.01), rates.get("filter_rate", 0.95), rates.get("bar_ratio", 0.95))
    got = select_neurons(torch.as_tensor(over_zero), torch.as_tensor(tokens), langs, params)
    want, H, t, bar = reference_selection(over_zero, tokens, **rates)
    assert got.filter_threshold == t and got.activation_bar == bar
    assert got.languages == langs  # every language keeps its entry, empty or not
    for k, lang in enumerate(langs):
        neurons = got.neurons[lang]
        pairs = list(zip(neurons.layer.tolist(), neurons.neuron.tolist()))
        if pairs != want[k]:
            # Two float summation orders may differ in the last bit; only true near-ties may move.
            boundary = sorted(h for row in H for h in row)[max(round(len(H) * len(H[0]) * params.top_rate) - 1, 0)]
            for l, j in set(pairs) ^ set(want[k]):
                assert abs(H[l][j] - boundary) < 1e-12, (lang, l, j)
        for (l, j), e, prob in zip(pairs, neurons.entropy.tolist(), neurons.activation_prob.tolist()):
            assert e == pytest.approx(H[l][j], abs=1e-12) or (math.isinf(e) and math.isinf(H[l][j]))
            assert prob == over_zero[l, j, k] / tokens[k]
    # One neuron per block (and int32 counts, as select reads them): the same numbers bit for bit.
    assert_same(got, select_neurons(torch.as_tensor(over_zero).int(), torch.as_tensor(tokens), langs, params,
                                    chunk_values=1))
    return got


def assert_same(a, b):
    assert (a.filter_threshold, a.activation_bar, a.selected, a.languages) == \
        (b.filter_threshold, b.activation_bar, b.selected, b.languages)
    for lang in a.languages:
        x, y = a.neurons[lang], b.neurons[lang]
        for name in ("layer", "neuron", "entropy", "activation_prob"):
            assert np.array_equal(getattr(x, name), getattr(y, name)), (lang, name)


def test_random_counts():
    rng = np.random.default_rng(0)
    tokens = np.array([1000, 700, 1500, 900])
    over_zero = np.stack([rng.integers(0, n + 1, size=(3, 50)) for n in tokens], axis=-1)
    got = assert_matches_reference(over_zero, tokens, top_rate=0.1)
    assert got.selected == 15


def test_ties_take_the_lowest_layer_and_neuron():
    over_zero = np.zeros((2, 10, 2), dtype=np.int64)
    over_zero[:, :, 0] = 9  # every neuron fires identically: all scores tie
    over_zero[:, :, 1] = 1
    got = assert_matches_reference(over_zero, np.array([10, 10]), top_rate=0.25, filter_rate=0.5, bar_ratio=0.5)
    assert got.neurons["l0"].layer.tolist() == [0] * 5 and got.neurons["l0"].neuron.tolist() == [0, 1, 2, 3, 4]


def test_zero_counts_and_a_language_with_no_neuron():
    over_zero = np.zeros((2, 40, 3), dtype=np.int64)
    over_zero[0, :4, 0] = 50  # specific to language 0
    over_zero[1, :3, 1] = 40  # specific to language 1
    over_zero[:, 20:, :] = 20  # shared by all, language 2 fires nowhere alone
    got = assert_matches_reference(over_zero, np.array([50, 50, 50]), top_rate=0.1)
    assert len(got.neurons["l2"]) == 0 and "l2" in got.neurons
    assert got.neurons["l0"].neuron.tolist() == [0, 1, 2, 3]
    assert got.neurons["l1"].layer.tolist() == [1, 1, 1]


def test_the_last_languages_getting_no_neuron_do_not_shift_the_others():
    # The reference code's split(bincount(...)) would drop trailing empty languages.
    over_zero = np.zeros((1, 10, 4), dtype=np.int64)
    over_zero[0, 0, 0] = 10
    over_zero[0, 1, 1] = 10
    got = assert_matches_reference(over_zero, np.array([10, 10, 10, 10]), top_rate=0.2, filter_rate=0.9,
                                   bar_ratio=0.9)
    assert [len(got.neurons[f"l{k}"]) for k in range(4)] == [1, 1, 0, 0]


def test_one_language():
    rng = np.random.default_rng(1)
    over_zero = rng.integers(0, 30, size=(2, 25, 1))
    got = assert_matches_reference(over_zero, np.array([30]), top_rate=0.1)
    assert got.selected == 5


def test_all_zero_counts_select_nothing_into_languages():
    got = assert_matches_reference(np.zeros((2, 8, 3), dtype=np.int64), np.array([5, 5, 5]), top_rate=0.25)
    assert all(len(n) == 0 for n in got.neurons.values())


def test_a_sample_unlike_the_whole_still_gives_the_exact_quantile(monkeypatch):
    # The quantiles are bracketed by every 16th probability; here those are all 0 while the rest are
    # not, so the bracket misses and is opened until the exact k-th value is inside it.
    from neuronreg.lape import selection

    passes = []
    done = selection._Quantiles.done
    monkeypatch.setattr(selection._Quantiles, "done", lambda self: passes.append(done(self)) or passes[-1])
    rng = np.random.default_rng(3)
    tokens = np.array([400, 300, 500, 200])
    over_zero = (1 + rng.random((4, 10000, 4)) * 0.9 * tokens).astype(np.int64)
    over_zero.reshape(-1)[::16] = 0
    got = assert_matches_reference(over_zero, tokens, top_rate=0.1)
    assert got.filter_threshold > 0 and passes[:2] == [False, True]


def test_a_large_selection_is_the_same_in_blocks_and_whole():
    rng = np.random.default_rng(1)
    tokens = torch.tensor([13_000_000, 9_000_000, 11_000_000, 7_000_000, 12_000_000])
    base = rng.random((4, 3000, 1)) * 0.5
    over_zero = torch.from_numpy(((base + 0.05 * rng.random((4, 3000, 5))) * tokens.numpy()).astype(np.int64))
    langs = [f"l{k}" for k in range(5)]
    for params in (SelectionParams(0.01), SelectionParams(0.05, 0.9, 0.8)):
        whole = select_neurons(over_zero, tokens, langs, params, chunk_values=over_zero.numel())
        assert_same(whole, select_neurons(over_zero.int(), tokens, langs, params, chunk_values=1000))


def test_bad_input_is_a_selection_error():
    with pytest.raises(SelectionError, match="No tokens"):
        select_neurons(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([3, 0]), ["a", "b"])
    with pytest.raises(SelectionError, match="damaged"):
        select_neurons(torch.full((1, 2, 1), 9), torch.tensor([3]), ["a"])
    with pytest.raises(SelectionError, match="between 0 and 1"):
        SelectionParams(top_rate=1.5)


@st.composite
def count_tensors(draw):
    L, I, K = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 4))
    tokens = draw(st.lists(st.integers(1, 20), min_size=K, max_size=K))
    flat = draw(st.lists(st.integers(0, 20), min_size=L * I * K, max_size=L * I * K))
    over_zero = np.minimum(np.array(flat).reshape(L, I, K), np.array(tokens))
    return over_zero, np.array(tokens)


@settings(max_examples=150, deadline=None)
@given(count_tensors(), st.sampled_from([0.01, 0.1, 0.3, 1.0]), st.sampled_from([0.5, 0.8, 0.95]),
       st.sampled_from([0.5, 0.8, 0.95]))
def test_property_matches_reference(counts, top_rate, filter_rate, bar_ratio):
    over_zero, tokens = counts
    got = assert_matches_reference(over_zero, tokens, top_rate=top_rate, filter_rate=filter_rate, bar_ratio=bar_ratio)
    L, I, _ = over_zero.shape
    assert got.selected == min(round(L * I * top_rate), L * I)
    for k, lang in enumerate(got.languages):
        # Every neuron assigned to a language fires on it above the bar, and lists are sorted.
        n = got.neurons[lang]
        assert bool((n.activation_prob > got.activation_bar).all())
        keys = (n.layer * I + n.neuron).tolist()
        assert keys == sorted(set(keys))
