"""A registry of record: several selections per model, language sets, listing a repo without data."""

import json

import pyarrow.parquet as pq

from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, neuron_file, run
from support.hubserver import TEST_USER
from support.tiny import TOP_RATE, write_corpus

REPO = f"{TEST_USER}/lape-neurons"
SEED12 = ["mt", "af", "is", "cy", "mk", "lv", "lt", "sl", "sk", "et", "ka", "ne"]


def compute(planted, reg, *extra):
    return run("compute", planted / "model", "en", "ru", "el", "--corpus", planted / "texts", "--tokens", "3k",
               "--seq-len", 64, "--top-rate", TOP_RATE, "--registry", reg, "-q", *extra)


def rows(path) -> list:
    table = pq.read_table(path)
    return list(zip(table["layer"].to_pylist(), table["neuron"].to_pylist()))


def test_two_selections_side_by_side_locally_and_on_the_hub(planted, tmp_path, hub):
    import datasets

    reg = tmp_path / "reg"
    compute(planted, reg)
    run("select", "model", "--top-rate", 0.5, "--registry", reg, "-q")
    registry = LocalRegistry(reg)
    assert [e.name for e in registry.selections("model")] == ["top9.375", "top50"]
    configs = {"model": "top9.375", "model-top9.375": "top9.375", "model-top50": "top50"}
    for config, selection in configs.items():
        for lang in ("en", "ru", "el"):
            loaded = datasets.load_dataset(str(reg), config, split=lang)
            assert list(zip(loaded["layer"], loaded["neuron"])) == rows(neuron_file(reg, "model", lang, selection))

    # Re-selecting one leaves the other byte for byte as it was.
    top50 = {lang: neuron_file(reg, "model", lang, "top50").read_bytes() for lang in ("en", "ru", "el")}
    run("select", "model", "--top-rate", TOP_RATE, "--registry", reg, "-q")
    assert {lang: neuron_file(reg, "model", lang, "top50").read_bytes() for lang in top50} == top50
    assert len(list((reg / "model" / "top9.375").iterdir())) == 1  # the old version is gone

    # The same on the Hub: every selection is a config, equal to the files.
    run("publish", "--repo", REPO, "--registry", reg, "-q")
    for config, selection in configs.items():
        loaded = datasets.load_dataset(REPO, config, split="ru")
        assert list(zip(loaded["layer"], loaded["neuron"])) == rows(neuron_file(reg, "model", "ru", selection))
    published = hub.files("dataset", REPO)
    assert {"model/ru.parquet", "model/top50/ru.parquet", "model/top9.375/ru.parquet",
            "model/counts/ru.parquet", "model/overlap.png", "model/per_layer.png"} <= set(published)
    card = hub.file_bytes("dataset", REPO, "README.md").decode()
    assert "(model/overlap.png)" in card and "| top9.375: neurons (share of parameters) | top50:" in card
    assert hub.file_bytes("dataset", REPO, "model/overlap.png")[:4] == b"\x89PNG"
    fetched = json.loads(run("fetch", "model", "ru", "--top-rate", 0.5, "--repo", REPO, "-q").output)
    assert [[n for n in layer] for layer in fetched["layers"]] == \
        [[n for layer, n in rows(neuron_file(reg, "model", "ru", "top50")) if layer == i] for i in range(2)]
    assert_one_line_error(run("fetch", "model", "ru", "--top-rate", 0.3, "--repo", REPO, ok=False),
                          "no selection with top rate 0.3", "top9.375 (default), top50", "--top-rate")


def test_ls_of_a_repo_reads_only_its_card(planted, tmp_path, hub):
    reg = tmp_path / "reg"
    compute(planted, reg)
    run("select", "model", "--top-rate", 0.5, "--registry", reg, "-q")
    run("publish", "--repo", REPO, "--registry", reg, "-q")
    local = json.loads(run("ls", "--registry", reg, "--json").output)["models"]
    hub.clear_requests()
    remote = json.loads(run("ls", "--repo", REPO, "--json").output)["models"]
    downloads = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert downloads == [f"/datasets/{REPO}/resolve/main/README.md"]  # the card, no Parquet file
    for mine, theirs in zip(local, remote):
        assert [(s["name"], s["languages"], s["neurons"], s["top_rate"]) for s in mine["selections"]] == \
            [(s["name"], s["languages"], s["neurons"], s["top_rate"]) for s in theirs["selections"]]
    table = run("ls", "--repo", REPO).output
    assert "top9.375 *" in table and "top50" in table
    shown = run("show", "model", "el", "--repo", REPO, "--top-rate", 0.5).output
    assert "[selection top50]" in shown


def test_a_repo_of_neuronreg_0_1_is_listed_from_its_files(tmp_path, hub):
    from pathlib import Path

    from huggingface_hub import HfApi

    legacy = Path(__file__).parent / "data" / "legacy-0.1" / "registry"
    api = HfApi()
    api.create_repo(REPO, repo_type="dataset")
    api.upload_folder(repo_id=REPO, folder_path=str(legacy), repo_type="dataset")
    listing = json.loads(run("ls", "--repo", REPO, "--json").output)["models"]
    assert {m["model"]: m["selections"][0]["languages"] for m in listing} == {"acme--tiny": ["en", "sw"],
                                                                              "planted": ["el", "en", "ru"]}
    assert "3 neurons" in run("show", "planted", "ru", "--repo", REPO).output


def test_compute_a_language_set_skipping_languages_without_text(planted, tmp_path):
    texts = tmp_path / "texts"
    for code in SEED12[:-1]:  # no Nepali text
        write_corpus(texts, {"en": code}, docs=10, seed=len(code))
    reg = tmp_path / "reg"
    result = run("compute", planted / "model", "--languages", "@seed12", "--corpus", texts, "--tokens", 300,
                 "--seq-len", 64, "--top-rate", 0.05, "--registry", reg)
    assert "ne: skipped, no text" in result.stderr and "about" in result.stderr and "tokens/s" in result.stderr
    assert LocalRegistry(reg).counted_languages("model") == sorted(SEED12[:-1])
    assert "ne         skipped" in result.stdout
    assert_one_line_error(run("compute", planted / "model", "@seed12", "--corpus", texts, "--strict",
                              "--registry", tmp_path / "strict", ok=False), "No text for Nepali")
    assert_one_line_error(run("compute", planted / "model", "@seed13", "--corpus", texts, "--registry", reg,
                              ok=False), "Unknown language set '@seed13'", "@seed12")
    listed = run("languages", "@seed12").output.split()
    assert [listed[i] for i in range(0, len(listed), 1) if listed[i] in SEED12][:12] == SEED12
    assert "@ntrex" in run("languages", "--sets").output


def test_an_unknown_selection_lists_those_there_are(planted, tmp_path):
    reg = tmp_path / "reg"
    compute(planted, reg)
    for args in (["show", "model", "ru", "--selection", "top3"], ["export", "model", "-o", tmp_path / "x.pt",
                                                                  "--selection", "top3"]):
        assert_one_line_error(run(*args, "--registry", reg, ok=False), "has no selection 'top3'",
                              "available: top9.375 (default)")
