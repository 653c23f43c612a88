"""neuronreg ablate: switching off a language's neurons hurts that language, on tiny real models."""

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import neuronreg.evaluation.ablation as ablation
import neuronreg.evaluation.heldout as heldout
from neuronreg.cli import cli
from neuronreg.errors import MaskError
from neuronreg.hooks import zeroed_neurons
from neuronreg.mask import NeuronMask
from neuronreg.models import find_mlp_sites
from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, neuron_file, run
from support.tiny import (
    PLANTED,
    SCRIPTS,
    TOP_RATE,
    make_tokenizer,
    planted_model,
    save_model,
    tiny_model,
    vocabulary,
    write_corpus,
)

BOOST = {"en": 29, "ru": 30, "el": 31}  # residual dimension each script's planted neurons write
LANGS = ("en", "ru", "el")


def predictive_planted_model():
    """The planted model of test_cli, whose planted neurons also predict their script.

    A firing planted neuron writes its script's own residual dimension (29..31), which nothing else
    writes or reads, and the LM head turns that dimension into high logits for the script's letters.
    So on Latin text the English neurons make the next Latin letter likely: switching them off raises
    English loss, while on Cyrillic or Greek text they are silent and switching them off changes
    (almost) nothing. Their gate rows are untouched, so compute still finds exactly the planted ones.
    """
    model = planted_model(PLANTED)
    scripts, vocab = list(SCRIPTS), vocabulary()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 29:] = 0.0
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[:, 29:] = 0.0
            layer.mlp.down_proj.weight[29:] = 0.0
        for index, langs in PLANTED.items():
            mlp = model.model.layers[index].mlp
            for lang, neurons in langs.items():
                for j in neurons:
                    mlp.up_proj.weight[j] = 0.0
                    mlp.up_proj.weight[j, scripts.index(lang)] = 1.0
                    mlp.down_proj.weight[:, j] = 0.0
                    mlp.down_proj.weight[BOOST[lang], j] = 1.0
        head = model.lm_head.weight
        head[:, 29:] = 0.0
        for lang, dim in BOOST.items():
            for ch in SCRIPTS[lang]:
                head[vocab.index(ch), dim] = 4.0
    return model.eval()






@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ablation")
    save_model(predictive_planted_model(), root / "model")
    write_corpus(root / "texts", {"en": "eng", "ru": "Russian", "el": "el"})
    write_corpus(root / "heldout", {"en": "en", "ru": "ru", "el": "ell"}, docs=40, seed=1)
    registry = root / "registry"
    result = CliRunner().invoke(cli, ["compute", str(root / "model"), *LANGS, "--corpus", str(root / "texts"),
                                      "--tokens", "3k", "--seq-len", "64", "--top-rate", TOP_RATE,
                                      "--registry", str(registry), "-q"])
    assert result.exit_code == 0, result.output
    return root


def ablate(planted, out, *extra, ok=True):
    return run("ablate", planted / "model", "--data", planted / "heldout", "--out", out, "--tokens", "1500",
               "--seq-len", 64, "--registry", planted / "registry", "-q", *extra, ok=ok)


@pytest.mark.slow
def test_own_ablation_raises_own_loss_and_not_the_others(planted, tmp_path):
    # The masks are exactly the planted neurons.
    import pyarrow.parquet as pq

    for lang in LANGS:
        table = pq.read_table(neuron_file(planted / "registry", "model", lang))
        want = sorted((layer, j) for layer, langs in PLANTED.items() for j in langs[lang])
        assert list(zip(table["layer"].to_pylist(), table["neuron"].to_pylist())) == want

    result = ablate(planted, tmp_path / "out", "--languages", "en,Russian,el")
    report = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert report["languages"] == list(LANGS)
    assert list(report["ablated"]) == [*LANGS, "random"]
    for row in LANGS:
        for column in LANGS:
            cell = report["ablated"][row][column]
            if row == column:
                assert cell["delta_loss"] > 0.5 and cell["delta_perplexity"] > 5, (row, column, cell)
            else:
                assert abs(cell["delta_loss"]) < 0.01, (row, column, cell)
        verdict = report["summary"][row]
        assert verdict["own_hurts_most"] and verdict["hurts_own_most"]
        assert verdict["ratio"] is None or verdict["ratio"] > 100
        assert verdict["own_relative"] == pytest.approx(report["ablated"][row][row]["relative_perplexity_change"])
        assert f"{row}: own neurons off: perplexity" in result.stdout
    assert result.stdout.count("of all masks its own hurts it most: yes") == 3
    assert result.stdout.count("more than any other language: yes") == 3
    assert "Of 3 languages, 3 are hurt most by their own mask" in result.stdout

    # The columns keep the order the user gave.
    again = ablate(planted, tmp_path / "out-order", "--languages", "el,en")
    assert again.stdout.splitlines()[0].split() == ["perplexity", "el", "en"]
    assert "Wrote" not in result.stdout  # status goes to stderr

    # Every held-out token is predicted once; with one character per token, characters = tokens.
    for lang in LANGS:
        base = report["baseline"][lang]
        assert base["tokens"] == 1500 == base["characters"] == report["heldout"][lang]["tokens"]
        assert base["bits_per_character"] == pytest.approx(base["loss"] / math.log(2))
        assert base["perplexity"] == pytest.approx(math.exp(base["loss"]))
    assert report["settings"]["row_start"] is None  # this tokenizer puts no BOS first: rows follow the stream
    assert report["heldout"]["ru"]["corpus"] == {"kind": "local", "file": "ru.txt",
                                                 "sha256": report["heldout"]["ru"]["corpus"]["sha256"]}

    wide = (tmp_path / "out" / "ablation.csv").read_text().splitlines()
    assert wide[0] == "ablated,neurons,en,ru,el" and [line.split(",")[0] for line in wide[1:]] == [*LANGS, "random"]
    assert float(wide[2].split(",")[3]) == pytest.approx(report["ablated"]["ru"]["ru"]["delta_perplexity"])
    long = (tmp_path / "out" / "measurements.csv").read_text().splitlines()
    assert len(long) == 1 + 3 * 5  # baseline, three languages and random, each on three languages


def test_random_control_keeps_per_layer_counts(planted, tmp_path):
    ablate(planted, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "ablation.json").read_text())
    # Per layer, the mean of the language masks, rounded: (2+1+1)/3 -> 1 and (1+2+2)/3 -> 2.
    assert report["masks"]["random"] == {"neurons": 3, "per_layer": [1, 2], "seed": 0}
    assert [report["masks"][lang]["per_layer"] for lang in LANGS] == [[2, 1], [1, 2], [1, 2]]

    counts = [5, 0, 17, 48]
    mask = NeuronMask.random(counts, 48, seed=3, model="m")
    assert mask.counts_per_layer() == counts
    for indices in mask.per_layer():
        assert indices.tolist() == sorted(set(indices.tolist())) and all(0 <= i < 48 for i in indices.tolist())
    assert NeuronMask.random(counts, 48, seed=3) == mask
    assert NeuronMask.random(counts, 48, seed=4) != mask
    assert mask.random_like(seed=5).counts_per_layer() == counts


def test_exclusive_masks_drop_the_neurons_other_languages_share(planted, tmp_path):
    def mask(lang, pairs):
        layer, neuron = zip(*pairs) if pairs else ((), ())
        return NeuronMask("m", lang, 2, 48, torch.tensor(layer, dtype=torch.long),
                          torch.tensor(neuron, dtype=torch.long))

    def pairs(m):
        return list(zip(m.layer.tolist(), m.neuron.tolist()))

    masks = {"a": mask("a", [(0, 1), (0, 2), (1, 5)]), "b": mask("b", [(0, 2), (1, 6)]), "c": mask("c", [(1, 5)])}
    exclusive = ablation.exclusive_masks(masks)
    assert [pairs(exclusive[k]) for k in "abc"] == [[(0, 1)], [(1, 6)], []]
    assert ablation.shared_neurons(masks) == {"a": {"a": 3, "b": 1, "c": 1}, "b": {"a": 1, "b": 2, "c": 0},
                                             "c": {"a": 1, "b": 0, "c": 1}}

    ablate(planted, tmp_path / "out", "--exclusive")
    report = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert report["settings"]["exclusive"] is True
    # The planted masks share nothing, so they stay whole.
    assert [report["masks"][lang]["per_layer"] for lang in LANGS] == [[2, 1], [1, 2], [1, 2]]
    assert report["shared_neurons"]["en"] == {"en": 3, "ru": 0, "el": 0}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_gone_after_the_run_and_after_an_error(planted, tmp_path, monkeypatch):
    held = {}
    real_load = ablation.load_model

    def keep(*args, **kwargs):
        held["loaded"] = real_load(*args, **kwargs)
        return held["loaded"]

    monkeypatch.setattr(ablation, "load_model", keep)
    real_score = ablation.score
    seen = []

    def watching(model, *args, **kwargs):
        seen.append(_hooks(model))
        return real_score(model, *args, **kwargs)

    monkeypatch.setattr(ablation, "score", watching)
    ablate(planted, tmp_path / "out")
    model = held["loaded"].model
    assert _hooks(model) == 0
    # Baseline without hooks; each language's mask hooks both layers; the random one too.
    assert seen == [0] * 3 + [2] * 9 + [2] * 3

    def failing(model, *args, **kwargs):
        if _hooks(model):
            raise RuntimeError("out of memory in the middle of an ablation")
        return real_score(model, *args, **kwargs)

    monkeypatch.setattr(ablation, "score", failing)
    result = ablate(planted, tmp_path / "out2", ok=False)
    assert result.exit_code != 0 and "out of memory" in str(result.exception)
    assert held["loaded"].model is not model and _hooks(held["loaded"].model) == 0
    assert not (tmp_path / "out2" / "ablation.json").exists()


def test_zeroed_neurons_zero_exactly_those_and_leave_the_weights():
    model = predictive_planted_model()
    sites = find_mlp_sites(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    mask = NeuronMask.random([4, 7], 48, seed=0, model="m")
    ids = torch.tensor([[5, 6, 7, 40, 41, 70, 71, 2, 8]])
    seen = {}

    def capture(module, inputs, output):
        seen[len(seen)] = output.clone()

    with torch.no_grad():
        handle = sites[0].activation.register_forward_hook(capture)
        before = model(input_ids=ids).logits
        with zeroed_neurons(sites, mask):
            # Registered after the ablation's hook, so it sees what the layer passes on.
            late = sites[0].activation.register_forward_hook(capture)
            ablated = model(input_ids=ids).logits
            late.remove()
        after = model(input_ids=ids).logits
        handle.remove()
    plain, first, zeroed, last = seen[0], seen[1], seen[2], seen[3]
    switched_off = mask.per_layer()[0]
    keep = torch.ones(48, dtype=torch.bool)
    keep[switched_off] = False
    assert plain[..., switched_off].abs().sum() > 0 and torch.equal(first, plain)
    assert zeroed[..., switched_off].abs().sum() == 0 and torch.equal(zeroed[..., keep], plain[..., keep])
    assert not torch.equal(ablated, before) and torch.equal(after, before) and torch.equal(last, plain)
    assert _hooks(model) == 0
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_loss_equals_transformers_own_loss():
    model = predictive_planted_model()
    tok = make_tokenizer()
    ids = torch.tensor([2] + tok("привет", add_special_tokens=False)["input_ids"] + [2, 5, 6, 7])
    nll, predicted = heldout.negative_log_likelihood(model, [ids], batch_size=1, device="cpu")
    assert predicted == ids.numel() - 1
    with torch.no_grad():
        reference = model(input_ids=ids[None], labels=ids[None]).loss
    assert nll / predicted == pytest.approx(float(reference), rel=1e-6)


def test_characters_of_a_stream_cut_inside_a_document(tmp_path):
    from neuronreg.corpus import CorpusSource

    text = tmp_path / "en.txt"
    text.write_text("abc\n\nde fg\nhij\n", encoding="utf-8")
    source = CorpusSource("local", str(text))
    tok = make_tokenizer()
    # Stream: a b c </s> d e ' ' f g </s> h i j </s>; each separator counts one character.
    assert [heldout.stream_characters(source, tok, n, 2) for n in (1, 3, 4, 6, 10, 12, 14, 99)] == \
        [1, 3, 4, 6, 10, 12, 14, 14]
    held = heldout.heldout_text(source, "en", tok, seq_len=5, max_tokens=12)
    assert held.tokens == 12 and held.characters == 12
    assert [row.tolist()[0] for row in held.inputs] == [2, int(held.inputs[0][-1]), int(held.inputs[1][-1])]
    assert sum(row.numel() - 1 for row in held.inputs) == 12


def test_heldout_after_a_row_start_predicts_every_token_once_and_equals_transformers_loss(tmp_path):
    """A tokenizer that puts BOS first: every row is fed after BOS, all its tokens are predicted, the
    characters are those of the same text, and the loss is transformers' own on [BOS] + row."""
    from neuronreg.corpus import CorpusSource

    text = tmp_path / "en.txt"
    text.write_text("abc\n\nde fg\nhij\n", encoding="utf-8")
    source = CorpusSource("local", str(text))
    plain, tok = make_tokenizer(), make_tokenizer(bos=True)
    held = heldout.heldout_text(source, "en", tok, seq_len=5, max_tokens=12)
    assert held.row_start == "bos" and heldout.heldout_text(source, "en", plain, 5, 12).row_start is None
    # Stream: a b c </s> d | e ' ' f g </s> | h i; each row after <s> (id 1).
    stream = [tok.convert_tokens_to_ids(c) for c in "abc"] + [2] + [tok.convert_tokens_to_ids(c) for c in "de fg"] \
        + [2] + [tok.convert_tokens_to_ids(c) for c in "hi"]
    assert [row.tolist() for row in held.inputs] == [[1] + stream[:5], [1] + stream[5:10], [1] + stream[10:]]
    assert held.tokens == 12 and held.characters == 12  # as without a row start: the same text

    model = predictive_planted_model()
    result = heldout.score(model, held, batch_size=2, device="cpu")
    with torch.no_grad():
        reference = sum(float(model(input_ids=row[None], labels=row[None]).loss) * (row.numel() - 1)
                        for row in held.inputs)
    assert result.tokens == 12 and result.characters == 12
    assert result.nll == pytest.approx(reference, rel=1e-6)


def test_heatmap_is_a_png_of_the_expected_size(planted, tmp_path):
    from neuronreg.plots import ablation_heatmap, heatmap_pixels

    ablate(planted, tmp_path / "out")
    for path, shape in [(tmp_path / "out" / "ablation.png", (4, 3)), (None, (7, 6))]:
        if path is None:
            path = ablation_heatmap([[0.1 * i - j for j in range(6)] for i in range(7)], [f"r{i}" for i in range(7)],
                                    [f"c{j}\n1.0" for j in range(6)], tmp_path / "big.png", title="t", xlabel="x",
                                    ylabel="y", colorbar_label="z")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
        assert struct.unpack(">II", data[16:24]) == heatmap_pixels(*shape)
        assert len(data) < 200_000
    # The figure can be drawn again from the JSON alone, byte for byte.
    again = ablation.draw_heatmap(json.loads((tmp_path / "out" / "ablation.json").read_text()), tmp_path / "again.png")
    assert again.read_bytes() == (tmp_path / "out" / "ablation.png").read_bytes()
    flat = ablation_heatmap([[0.0, 0.0]], ["a"], ["b", "c"], tmp_path / "zero.png", title="t", xlabel="x", ylabel="y",
                            colorbar_label="z")
    assert flat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- bad input --------------------------------------------------------------------------------------
def test_language_without_neurons_in_the_registry(planted, tmp_path):
    result = ablate(planted, tmp_path / "out", "--languages", "en,de", ok=False)
    assert_one_line_error(result, "No de neurons", "available: el, en, ru")
    assert_one_line_error(ablate(planted, tmp_path / "out", "--languages", "englsh", ok=False), "Unknown language")
    empty = run("ablate", planted / "model", "--data", planted / "heldout", "--out", tmp_path / "o", "--registry",
                tmp_path / "nothing", ok=False)
    assert_one_line_error(empty, "no neurons", "neuronreg compute")
    assert not (tmp_path / "out" / "ablation.json").exists()


def test_unwritable_out_fails_before_any_work(planted, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(ablation, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    assert_one_line_error(ablate(planted, blocker / "out", ok=False), "Cannot write to", "--out")


def test_empty_or_missing_heldout_text(planted, tmp_path):
    data = tmp_path / "heldout"
    write_corpus(data, {"en": "en", "ru": "ru"}, seed=2)
    (data / "el.txt").write_text("\n \n", encoding="utf-8")
    assert_one_line_error(run("ablate", planted / "model", "--data", data, "--out", tmp_path / "out", "--registry",
                              planted / "registry", ok=False), "held-out text for el", "no text")
    (data / "el.txt").unlink()
    assert_one_line_error(run("ablate", planted / "model", "--data", data, "--out", tmp_path / "out", "--registry",
                              planted / "registry", ok=False), "No text for Greek")


def test_same_text_as_the_mask_is_refused_unless_allowed(planted, tmp_path):
    data = tmp_path / "heldout"
    data.mkdir()
    for lang, stem in zip(LANGS, ("en", "ru", "ell")):
        (data / f"{lang}.txt").write_bytes((planted / "heldout" / f"{stem}.txt").read_bytes())
    # Only Russian is the very file its counts were read from (renamed: the content decides).
    (data / "ru.txt").write_bytes((planted / "texts" / "Russian.txt").read_bytes())
    refused = run("ablate", planted / "model", "--data", data, "--out", tmp_path / "out", "--registry",
                  planted / "registry", ok=False)
    assert_one_line_error(refused, "held-out text for ru", "ru.txt", "--allow-same-text")
    allowed = run("ablate", planted / "model", "--data", data, "--out", tmp_path / "out", "--registry",
                  planted / "registry", "--tokens", "500", "--seq-len", 64, "--allow-same-text")
    assert "WARNING" in allowed.stderr and "ru" in allowed.stderr and "WARNING" not in allowed.stdout
    report = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert report["same_text"] == ["ru"] and report["heldout"]["ru"]["same_text_as_mask"]


def test_mask_of_another_model_is_refused(planted, tmp_path):
    save_model(tiny_model("qwen2"), tmp_path / "other")
    shutil.copytree(planted / "registry", tmp_path / "registry")
    registry = LocalRegistry(tmp_path / "registry")
    registry.write_selection("other", registry.read_masks("model", ["en", "ru", "el"]))
    # Same shape (2 x 48): allowed, with a warning that the revision differs.
    ok = run("ablate", tmp_path / "other", "--data", planted / "heldout", "--out", tmp_path / "out", "--tokens", 300,
             "--seq-len", 64, "--registry", tmp_path / "registry")
    assert "revision" in ok.stderr
    mask = NeuronMask.random([1, 1, 1], 48, seed=0, model="m")
    with pytest.raises(MaskError, match="3 layers x 48"):
        mask.check_sites(find_mlp_sites(predictive_planted_model()))


def test_ablate_has_help_with_an_example():
    result = run("ablate", "--help")
    assert "Example:" in result.output and "--allow-same-text" in result.output
