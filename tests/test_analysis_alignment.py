"""Cross-lingual alignment (neuronreg.analysis.representations, .alignment) against an independent
computation: each sentence alone through the full model, hooks on the decoder layers found by their
attribute path, means, cosines and retrieval in plain Python."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch

from neuronreg.analysis import alignment
from neuronreg.analysis.representations import EMBEDDINGS, sentence_representations
from neuronreg.errors import CorpusError, SettingsError

from support.tiny import CYRILLIC, GREEK, LATIN, make_tokenizer, tiny_model

LAYER_PATHS = {"llama": "model.layers", "gemma3": "model.layers", "phi3": "model.layers", "gpt2": "transformer.h",
               "opt": "model.decoder.layers", "bloom": "transformer.h"}
TO_RU = dict(zip(LATIN, CYRILLIC))
TO_EL = {ch: GREEK[i % len(GREEK)] for i, ch in enumerate(LATIN)}


def parallel_text(n: int = 9, seed: int = 0) -> dict[str, list[str]]:
    """English-like lines of random words, and their letter-for-letter ciphers in Cyrillic and Greek."""
    rng = random.Random(seed)
    en = [" ".join("".join(rng.choice(LATIN) for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(1, 6)))
          for _ in range(n)]
    return {"en": en, "ru": ["".join(TO_RU.get(c, c) for c in line) for line in en],
            "el": ["".join(TO_EL.get(c, c) for c in line) for line in en]}


def _module(model, path: str):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def reference_representations(model, tokenizer, sentences, prefix, layer_path, inner=None):
    """{layer: [vector per sentence]} (float64 lists), one sentence per forward pass, no padding; layer -1
    is transformers' hidden_states[0] of that pass."""
    layers = _module(inner or model, layer_path)
    out = {layer: [] for layer in range(-1, len(layers))}
    for sentence in sentences:
        ids = prefix + tokenizer(sentence, add_special_tokens=False)["input_ids"]
        captured = {}
        handles = [layer.register_forward_hook(lambda m, i, o, k=k: captured.__setitem__(k, o))
                   for k, layer in enumerate(layers)]
        try:
            with torch.no_grad():
                result = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        finally:
            for handle in handles:
                handle.remove()
        captured[-1] = result.hidden_states[0]
        for layer, states in captured.items():
            states = states[0] if isinstance(states, tuple) else states
            out[layer].append([float(v) for v in states[0, len(prefix):].double().mean(0)])
    return out


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


def _centred(vectors):
    mean = [sum(column) / len(vectors) for column in zip(*vectors)]
    return [[x - m for x, m in zip(v, mean)] for v in vectors]


def reference_alignment(pivot, other, centred):
    if centred:
        pivot, other = _centred(pivot), _centred(other)
    n = len(pivot)
    s = [[_cos(pivot[i], other[j]) for j in range(n)] for i in range(n)]
    matched = sum(s[i][i] for i in range(n)) / n
    mismatched = sum(s[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    from_pivot = sum(all(s[i][i] > s[i][j] for j in range(n) if j != i) for i in range(n)) / n
    to_pivot = sum(all(s[i][i] > s[j][i] for j in range(n) if j != i) for i in range(n)) / n
    return matched, mismatched, from_pivot, to_pivot


@pytest.mark.parametrize("arch", sorted(LAYER_PATHS))
def test_representations_equal_one_sentence_at_a_time(arch):
    model, tokenizer = tiny_model(arch), make_tokenizer()
    sentences = parallel_text()["en"]
    reps = sentence_representations(model, tokenizer, sentences, batch_size=4, embeddings=True)
    reference = reference_representations(model, tokenizer, sentences, [tokenizer.bos_token_id], LAYER_PATHS[arch])
    assert reps.layers == [EMBEDDINGS, 0, 1] and reps.prefix_ids == [tokenizer.bos_token_id]
    assert reps.tokens == [len(s) for s in sentences]  # one token per character
    for layer in reps.layers:
        torch.testing.assert_close(reps.layer(layer).double(), torch.tensor(reference[layer], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)


def test_layers_are_hidden_states_but_the_last_is_before_the_final_norm():
    model, tokenizer = tiny_model("llama"), make_tokenizer()
    sentence = parallel_text()["en"][0]
    reps = sentence_representations(model, tokenizer, [sentence], prefix_ids=[])
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([tokenizer(sentence, add_special_tokens=False)["input_ids"]]),
                       output_hidden_states=True).hidden_states
    torch.testing.assert_close(reps.layer(0)[0], hidden[1][0].mean(0))
    assert not torch.allclose(reps.layer(1)[0], hidden[2][0].mean(0), atol=1e-3)  # transformers' last is normed


@pytest.mark.parametrize("prefix", [[], [2], [1, 2, 1]])
def test_the_prefix_is_fed_but_not_pooled(prefix):
    model, tokenizer = tiny_model("llama"), make_tokenizer()
    sentences = parallel_text(n=5)["ru"]
    reps = sentence_representations(model, tokenizer, sentences, prefix_ids=prefix, batch_size=2)
    reference = reference_representations(model, tokenizer, sentences, prefix, "model.layers")
    for layer in reps.layers:
        torch.testing.assert_close(reps.layer(layer).double(), torch.tensor(reference[layer], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-5)


def test_results_do_not_depend_on_the_batch_size():
    model, tokenizer = tiny_model("gemma3"), make_tokenizer()
    text = parallel_text(n=11, seed=3)
    first = None
    for batch_size in (1, 2, 5, 64):
        records = alignment.alignment(model, tokenizer, text, batch_size=batch_size)
        reps = sentence_representations(model, tokenizer, text["ru"], batch_size=batch_size)
        if first is None:
            first, first_reps = records, reps
            continue
        torch.testing.assert_close(reps.vectors, first_reps.vectors, rtol=1e-5, atol=1e-5)
        for ours, theirs in zip(records, first):
            assert (ours.language, ours.layer) == (theirs.language, theirs.layer)
            assert ours.retrieval_from_pivot == theirs.retrieval_from_pivot
            assert ours.retrieval_to_pivot == theirs.retrieval_to_pivot
            assert ours.matched == pytest.approx(theirs.matched, abs=1e-5)
            assert ours.mismatched == pytest.approx(theirs.mismatched, abs=1e-5)


@pytest.mark.parametrize("centred", [True, False])
def test_alignment_equals_loops_over_independent_representations(centred):
    model, tokenizer = tiny_model("llama", seed=4), make_tokenizer()
    text = parallel_text(n=12, seed=5)
    records = alignment.alignment(model, tokenizer, text, centred=centred, batch_size=5, embeddings=True)
    assert [(r.language, r.layer) for r in records] == [(lang, layer) for lang in ("ru", "el") for layer in (-1, 0, 1)]
    reference = {lang: reference_representations(model, tokenizer, lines, [1], "model.layers")
                 for lang, lines in text.items()}
    for record in records:
        matched, mismatched, from_pivot, to_pivot = reference_alignment(
            reference["en"][record.layer], reference[record.language][record.layer], centred)
        assert record.centred is centred and record.sentences == 12 and record.pivot == "en"
        assert record.matched == pytest.approx(matched, abs=1e-5)
        assert record.mismatched == pytest.approx(mismatched, abs=1e-5)
        assert record.gap == pytest.approx(matched - mismatched, abs=2e-5)
        assert (record.retrieval_from_pivot, record.retrieval_to_pivot) == (from_pivot, to_pivot)
    assert set(records[0].to_dict()) == {"language", "pivot", "layer", "sentences", "centred", "matched",
                                         "mismatched", "gap", "retrieval_from_pivot", "retrieval_to_pivot"}


def test_compare_sentences_on_known_vectors():
    """Exact values where they can be worked out: orthogonal translations, a tie, a perfect match."""
    pivot = torch.eye(3)
    same = alignment.compare_sentences(pivot, pivot.clone(), language="x", layer=0, centred=False)
    assert (same.matched, same.mismatched, same.retrieval_from_pivot, same.retrieval_to_pivot) == (1.0, 0.0, 1.0, 1.0)
    rolled = alignment.compare_sentences(pivot, pivot.roll(1, dims=0), language="x", layer=0, centred=False)
    assert (rolled.matched, rolled.mismatched, rolled.retrieval_from_pivot) == (0.0, 0.5, 0.0)
    tie = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # sentences 0 and 1 of the pivot are the same
    tied = alignment.compare_sentences(tie, torch.eye(3)[:, :2] + torch.tensor([[0.0, 0.1]]), language="x", layer=0,
                                       centred=False)
    # x_0 = (1, .1) is as close to p_0 as to p_1 (a tie: a miss), x_1 = (0, 1.1) is closest to p_2 (a miss)
    assert tied.retrieval_to_pivot == pytest.approx(1 / 3)


def test_deltas_and_adapters_are_read_through_their_wrappers():
    from peft import LoraConfig, get_peft_model

    from neuronreg.finetune.deltas import attach_deltas

    tokenizer, sentences = make_tokenizer(), parallel_text(n=6)["el"]
    base = sentence_representations(tiny_model("llama"), tokenizer, sentences, batch_size=4)

    with_deltas = tiny_model("llama")
    layers = attach_deltas(with_deltas, [torch.tensor([1, 5, 9]), torch.tensor([0, 47])])
    torch.manual_seed(1)
    for layer in layers:
        for p in layer.parameters():
            p.data.normal_(0, 0.3)
    ours = sentence_representations(with_deltas, tokenizer, sentences, batch_size=4)
    reference = reference_representations(with_deltas, tokenizer, sentences, [1], "model.layers")
    torch.testing.assert_close(ours.vectors[1].double(), torch.tensor(reference[1], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.vectors, base.vectors, atol=1e-3)

    with warnings.catch_warnings():  # PEFT asks transformers 5 for a renamed attribute: nothing to act on
        warnings.simplefilter("ignore", FutureWarning)
        adapted = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["gate_proj", "down_proj"]))
    for name, p in adapted.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    ours = sentence_representations(adapted, tokenizer, sentences, batch_size=4)
    reference = reference_representations(adapted, tokenizer, sentences, [1], "model.layers",
                                          inner=adapted.get_base_model())
    torch.testing.assert_close(ours.vectors[1].double(), torch.tensor(reference[1], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.vectors, base.vectors, atol=1e-3)


def test_model_mode_is_restored_and_bad_input_refused():
    model, tokenizer = tiny_model("llama"), make_tokenizer()
    model.train()
    sentence_representations(model, tokenizer, ["abc", "de"])
    assert model.training
    with pytest.raises(CorpusError, match="Sentence 1"):
        sentence_representations(model, tokenizer, ["abc", ""])
    with pytest.raises(SettingsError, match="Layer 2"):
        sentence_representations(model, tokenizer, ["abc"], layers=[2])
    with pytest.raises(CorpusError, match="as many lines"):
        alignment.alignment(model, tokenizer, {"en": ["a", "b"], "ru": ["а"]})
    with pytest.raises(SettingsError, match="at least 2"):
        alignment.compare_sentences(torch.ones(1, 4), torch.ones(1, 4), language="x", layer=0)


def test_read_parallel(tmp_path):
    (tmp_path / "eng.txt").write_text("one\u2028still one\ntwo\r\nthree\n", encoding="utf-8")
    (tmp_path / "rus.txt").write_text("один\nдва\nтри", encoding="utf-8")
    text = alignment.read_parallel({"en": tmp_path / "eng.txt", "ru": tmp_path / "rus.txt"})
    assert text == {"en": ["one\u2028still one", "two", "three"], "ru": ["один", "два", "три"]}
    assert alignment.read_parallel({"en": tmp_path / "eng.txt"}, limit=2) == {"en": ["one\u2028still one", "two"]}
    (tmp_path / "ell.txt").write_text("ένα\nδύο\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="as many lines"):
        alignment.read_parallel({"en": tmp_path / "eng.txt", "el": tmp_path / "ell.txt"})
    (tmp_path / "gap.txt").write_text("a\n\nc\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="Line 2"):
        alignment.read_parallel({"en": tmp_path / "gap.txt"})
