"""The compute/select/ls/show commands end to end, on tiny real models and local text."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, neuron_file, packing_interrupted, run
from support.tiny import PLANTED, TOP_RATE, save_model, tiny_config, write_corpus


def compute(planted, registry, *extra, langs=("en", "ru", "el"), ok=True):
    return run("compute", planted / "model", *langs, "--corpus", planted / "texts", "--tokens", "3k", "--seq-len", 64,
               "--top-rate", TOP_RATE, "--registry", registry, "-q", *extra, ok=ok)


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}




def test_planted_neurons_are_found_exactly_and_load_with_datasets(planted, tmp_path):
    import datasets

    reg = tmp_path / "reg"
    result = compute(planted, reg)
    assert "counted" in result.output
    for lang in ("en", "ru", "el"):
        want = sorted((layer, j) for layer, langs in PLANTED.items() for j in langs[lang])
        table = pq.read_table(neuron_file(reg, "model", lang))
        assert list(zip(table["layer"].to_pylist(), table["neuron"].to_pylist())) == want
        assert table["entropy"].to_pylist() == [0.0] * len(want)
        rows = datasets.load_dataset(str(reg), "model", split=lang)
        assert list(zip(rows["layer"], rows["neuron"])) == want
        assert rows.column_names == ["layer", "neuron", "entropy", "activation_prob"]


def test_provenance_and_counts_file(planted, tmp_path):
    reg = tmp_path / "reg"
    compute(planted, reg)
    counts = pq.read_table(reg / "model" / "counts" / "ru.parquet")
    assert counts.num_rows == 2 * 48
    assert counts.column_names == ["count", "mean", "positive_mean"]  # one row per neuron, in (layer, neuron) order
    prov = json.loads(counts.schema.metadata[b"neuronreg"])
    assert prov["schema_version"] == "2.0" and prov["kind"] == "counts"
    assert prov["tokens"] == 3000 and prov["model"]["num_layers"] == 2 and prov["model"]["intermediate_size"] == 48
    assert prov["model"]["hidden_size"] == 32 and prov["seq_len"] == 64 and prov["dtype"] == "float32"
    assert prov["model"]["revision"].startswith("local-") and prov["corpus"]["file"] == "Russian.txt"
    # The planted Cyrillic neurons fire on every Cyrillic token: all but the document separators.
    by_key = {divmod(row, 48): c for row, c in enumerate(counts["count"].to_pylist())}
    assert 2900 < by_key[(0, 10)] < 3000 and by_key[(0, 3)] == 0
    neurons = json.loads(pq.read_schema(neuron_file(reg, "model", "ru")).metadata[b"neuronreg"])
    sel = neurons["selection"]
    assert sel["languages"] == ["el", "en", "ru"] and sel["top_rate"] == 9 / 96 and sel["selected_total"] == 9
    assert sel["filter_threshold"] == sel["activation_bar"] and "created" in neurons and "version" in neurons


def test_same_settings_is_a_no_op_other_settings_need_force(planted, tmp_path):
    reg = tmp_path / "reg"
    compute(planted, reg)
    counts_before = snapshot(reg / "model" / "counts")
    again = compute(planted, reg)
    assert again.output.count("unchanged") == 3
    assert snapshot(reg / "model" / "counts") == counts_before

    before = snapshot(reg)
    refused = compute(planted, reg, "--seq-len", 32, ok=False)
    assert_one_line_error(refused, "seq_len", "--force")
    assert snapshot(reg) == before

    forced = compute(planted, reg, "--seq-len", 32, "--force", langs=("ru",))
    assert "counted" in forced.output
    prov = json.loads(pq.read_schema(reg / "model" / "counts" / "ru.parquet").metadata[b"neuronreg"])
    assert prov["seq_len"] == 32


def test_select_show_ls(planted, tmp_path):
    reg = tmp_path / "reg"
    compute(planted, reg)
    out = run("select", "model", "--top-rate", 0.5, "--registry", reg, "-q").output
    assert "en" in out and "ru" in out
    bigger = pq.read_table(neuron_file(reg, "model", "ru", "top50")).num_rows
    assert bigger > 3 and pq.read_table(neuron_file(reg, "model", "ru")).num_rows == 3  # the default stays

    # Over two languages, 6 of 96 neurons are exactly their planted ones.
    run("select", "model", "--languages", "Russian,el", "--top-rate", 6 / 96, "--registry", reg, "-q")
    chosen = "top6.25-el-ru"
    assert "en" not in LocalRegistry(reg).selection("model", chosen).languages
    assert (reg / "model" / "counts" / "en.parquet").exists()
    shown = run("show", "model", "ru", "--selection", chosen, "--registry", reg).output
    assert "3 neurons" in shown and "288 weights" in shown and f"[selection {chosen}]" in shown
    data = json.loads(run("show", "model", "Russian", "--top-rate", 6 / 96, "--registry", reg, "--json").output)
    assert data["per_layer"] == [1, 2] and data["share_of_parameters"] == pytest.approx(288 / 21024)
    assert data["selection"] == chosen

    listing = json.loads(run("ls", "--registry", reg, "--json").output)
    [model] = listing["models"]
    assert model["model"] == "model" and model["counted"] == ["el", "en", "ru"] and model["default"] == "top9.375"
    assert [(s["name"], s["languages"]) for s in model["selections"]] == [
        ("top9.375", ["el", "en", "ru"]), ("top50", ["el", "en", "ru"]), (chosen, ["el", "ru"])]
    table = run("ls", "--registry", reg).output
    assert "top9.375 *" in table and chosen in table


def test_resume_after_interrupt_gives_the_same_counts(planted, tmp_path, monkeypatch):
    reg_a, reg_b = tmp_path / "a", tmp_path / "b"
    compute(planted, reg_a, "--checkpoint-tokens", 64, langs=("ru",))
    with packing_interrupted(monkeypatch):
        stopped = compute(planted, reg_b, "--checkpoint-tokens", 64, "--batch-size", 3, langs=("ru",), ok=False)
    assert stopped.exit_code == 130 and "resume" in stopped.output
    assert (reg_b / "model" / ".partial" / "ru.safetensors").exists()
    assert not (reg_b / "model" / "counts" / "ru.parquet").exists()

    resumed = compute(planted, reg_b, "--checkpoint-tokens", 64, "--batch-size", 3, langs=("ru",))
    assert "resumed" in resumed.output
    a = pq.read_table(reg_a / "model" / "counts" / "ru.parquet")
    b = pq.read_table(reg_b / "model" / "counts" / "ru.parquet")
    assert a["count"].to_pylist() == b["count"].to_pylist()
    assert not (reg_b / "model" / ".partial" / "ru.safetensors").exists()


def test_jsonl_and_parquet_corpora(planted, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    lines = (planted / "texts" / "Russian.txt").read_text(encoding="utf-8").splitlines()
    (texts / "rus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines), encoding="utf-8")
    pq.write_table(pa.table({"text": (planted / "texts" / "el.txt").read_text(encoding="utf-8").splitlines()}),
                   texts / "ell.parquet")
    reg = tmp_path / "reg"
    run("compute", planted / "model", "ru", "el", "--corpus", texts, "--tokens", "3k", "--seq-len", 64,
        "--registry", reg, "-q")
    jsonl = pq.read_table(reg / "model" / "counts" / "ru.parquet")["count"].to_pylist()
    compute(planted, tmp_path / "reg2", langs=("ru",))
    assert jsonl == pq.read_table(tmp_path / "reg2" / "model" / "counts" / "ru.parquet")["count"].to_pylist()


def test_too_little_text_warns_with_the_count(planted, tmp_path):
    result = run("compute", planted / "model", "ru", "--corpus", planted / "texts", "--tokens", "1M", "--seq-len", 64,
                 "--registry", tmp_path / "reg")
    import re

    available = int(re.search(r"ru\s+counted\s+([\d,]+)", result.stdout).group(1).replace(",", ""))
    assert 1000 < available < 1_000_000
    assert f"ru: only {available:,} tokens of text (asked for 1,000,000)" in result.stderr
    assert "tokens of text" not in result.stdout  # results on stdout, everything else on stderr


# -- bad input --------------------------------------------------------------------------------------
def test_unknown_model_and_language_suggest(planted, tmp_path):
    assert_one_line_error(run("compute", "mistral-nemoo", "sw", "--registry", tmp_path, ok=False), "mistral-nemo")
    assert_one_line_error(run("compute", planted / "model", "swahilli", "--corpus", planted / "texts",
                              "--registry", tmp_path, ok=False), "Did you mean", "sw")


def test_empty_and_missing_corpus(planted, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "ru.txt").write_text("\n\n  \n", encoding="utf-8")
    reg = tmp_path / "reg"
    compute(planted, reg, langs=("el",))
    before = snapshot(reg)
    empty = run("compute", planted / "model", "ru", "--corpus", texts, "--registry", reg, "-q", ok=False)
    assert_one_line_error(empty, "no text")
    missing = run("compute", planted / "model", "el", "en", "--corpus", texts, "--registry", reg, "-q", "--force",
                  ok=False)
    assert_one_line_error(missing, "No text for Greek", "el.txt")
    assert snapshot(reg) == before


def test_unsupported_architecture(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    model = BertLMHeadModel(BertConfig(vocab_size=80, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=48, is_decoder=True))
    save_model(model, tmp_path / "bert")
    write_corpus(tmp_path / "texts", {"en": "en"})
    result = run("compute", tmp_path / "bert", "en", "--corpus", tmp_path / "texts", "--registry", tmp_path / "r",
                 ok=False)
    assert_one_line_error(result, "Supported", "gate_proj")


def test_unwritable_registry(planted, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = compute(planted, blocker / "reg", ok=False)
    assert_one_line_error(result, "not writable", "--registry")


def test_corrupt_parquet_is_a_clear_error_and_nothing_changes(planted, tmp_path):
    reg = tmp_path / "reg"
    compute(planted, reg)
    (reg / "model" / "counts" / "el.parquet").write_bytes(b"PAR1 this is not parquet")
    before = snapshot(reg)
    assert_one_line_error(run("select", "model", "--registry", reg, ok=False), "el.parquet", "damaged")
    assert_one_line_error(compute(planted, reg, ok=False), "damaged")
    assert snapshot(reg) == before


def test_registry_rejects_names_that_escape(planted, tmp_path):
    result = compute(planted, tmp_path / "reg", "--name", "../outside", ok=False)
    assert_one_line_error(result, "cannot be a registry path")
    assert not (tmp_path / "outside").exists()


def test_bad_manifest_names_the_key(tmp_path, monkeypatch):
    from neuronreg.manifest import default_manifest_path

    data = json.loads(default_manifest_path().read_text())
    data["languages"][3]["script"] = "latin"
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(data))
    result = run("--manifest", bad, "languages", ok=False)
    assert_one_line_error(result, f"languages[{data['languages'][3]['code']}].script")
    monkeypatch.setenv("NEURONREG_MANIFEST", str(bad))
    assert_one_line_error(run("models", ok=False), "script")


def test_version():  # every command's help and example: test_architecture.py, over cli.commands
    assert run("--version").output.startswith("neuronreg, version")


def test_gpt2_family_end_to_end(tmp_path):
    """A plain-MLP model through the whole command, not only the counting pass."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    save_model(AutoModelForCausalLM.from_config(tiny_config("gpt2")), tmp_path / "gpt2")
    write_corpus(tmp_path / "texts", {"en": "en", "ru": "ru"})
    run("compute", tmp_path / "gpt2", "en", "ru", "--corpus", tmp_path / "texts", "--tokens", "2k", "--seq-len", 50,
        "--top-rate", 0.05, "--registry", tmp_path / "reg", "-q")
    prov = json.loads(pq.read_schema(neuron_file(tmp_path / "reg", "gpt2", "en")).metadata[b"neuronreg"])
    assert prov["model"]["mlp_layout"] == "gpt2" and prov["selection"]["selected_total"] == round(2 * 48 * 0.05)


def test_a_language_with_no_neuron_is_an_empty_split_that_loads(planted, tmp_path):
    import datasets

    reg = tmp_path / "reg"
    # 3 of 96 neurons: ties at entropy 0 go to the lowest (layer, neuron): en's 3 and 7, ru's 10.
    compute(planted, reg, "--top-rate", 3 / 96)
    assert pq.read_table(neuron_file(reg, "model", "el")).num_rows == 0
    # `datasets` cannot serve a zero-row split; the other splits of the config must still load.
    with pytest.raises(ValueError, match="el"):
        datasets.load_dataset(str(reg), "model", split="el")
    en = datasets.load_dataset(str(reg), "model", split="en")
    assert list(zip(en["layer"], en["neuron"])) == [(0, 3), (0, 7)]
    card = (reg / "README.md").read_text()
    assert "| Greek | el | 3,000 | 0 (0.000%) |" in card
    assert "In top3.125, no neuron passed the selection for el" in card


def test_datasets_sees_a_new_selection_of_the_same_folder(planted, tmp_path):
    import datasets

    reg = tmp_path / "reg"
    compute(planted, reg)
    assert datasets.load_dataset(str(reg), "model", split="ru").num_rows == 3
    run("select", "model", "--top-rate", 0.5, "--default", "--registry", reg, "-q")
    fresh = pq.read_table(neuron_file(reg, "model", "ru")).num_rows
    assert fresh > 3 and datasets.load_dataset(str(reg), "model", split="ru").num_rows == fresh
    assert datasets.load_dataset(str(reg), "model-top9.375", split="ru").num_rows == 3


def test_registry_files_are_readable_by_others(planted, tmp_path):
    reg = tmp_path / "reg"
    compute(planted, reg)
    for path in (neuron_file(reg, "model", "ru"), reg / "model" / "counts" / "ru.parquet", reg / "README.md"):
        assert path.stat().st_mode & 0o044 == 0o044, path  # group and others may read (umask 022)


def test_estimate_and_progress_bars_follow_the_text_there_is(planted, tmp_path, monkeypatch):
    """--tokens 2M on a few thousand tokens of text: the announcement and each bar's total are the text's
    tokens (counted here independently: one token per character, and a separator per line), and every bar
    ends full."""
    import neuronreg.lape.counting as counting
    import neuronreg.progress as progress

    monkeypatch.setattr(progress, "_disabled", False)  # bars on, whatever an earlier -q switched off
    bars = []

    def recorded(total, *args, **kwargs):
        bar = progress.progress(total, *args, **kwargs)
        bars.append((total, bar))
        return bar

    monkeypatch.setattr(counting, "progress", recorded)
    files = {"en": "eng.txt", "ru": "Russian.txt", "el": "el.txt"}
    text = {code: sum(len(line) + 1 for line in (planted / "texts" / name).read_text(encoding="utf-8").splitlines()
                      if line.strip()) for code, name in files.items()}
    result = run("compute", planted / "model", "en", "ru", "el", "--corpus", planted / "texts", "--tokens", "2M",
                 "--seq-len", 64, "--registry", tmp_path / "reg")
    total = sum(text.values())
    assert (f"Counting 3 language(s), {total:,} tokens in all (2,000,000 asked for each; the text holds less for "
            f"en {text['en']:,}, ru {text['ru']:,}, el {text['el']:,})") in result.stderr
    assert [start for start, _ in bars] == [text["en"], text["ru"], text["el"]]
    assert all(bar.n == bar.total == start for start, bar in bars)
    assert [row.split()[2] for row in result.stdout.splitlines()[1:]] == [f"{text[c]:,}" for c in ("en", "ru", "el")]


def test_a_bar_whose_text_runs_out_ends_full_and_an_interrupted_one_keeps_its_total(monkeypatch):
    """Where the text's size is not known before reading it (a streamed Hub corpus), the bar's total is the
    tokens asked for; when the text ends first, the total becomes what was counted."""
    import neuronreg.lape.counting as counting
    import neuronreg.progress as progress
    from neuronreg.models import find_mlp_sites

    from support.tiny import PLANTED, planted_model

    monkeypatch.setattr(progress, "_disabled", False)
    bars = []

    def recorded(*args, **kwargs):
        bars.append(progress.progress(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(counting, "progress", recorded)
    model = planted_model(PLANTED)
    rows = [torch.arange(10) % 5 for _ in range(7)]
    counts = counting.count_activations(model, find_mlp_sites(model), rows, batch_size=2, total_tokens=1000)
    assert counts.tokens == 70 and bars[-1].n == bars[-1].total == 70

    def interrupted():
        yield from rows[:3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        counting.count_activations(model, find_mlp_sites(model), interrupted(), batch_size=1, total_tokens=1000)
    assert bars[-1].n == 30 and bars[-1].total == 1000
