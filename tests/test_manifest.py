import json
import re

import pytest

from neuronreg.errors import ManifestError, UnknownLanguage
from neuronreg.manifest import SPLIT_NAME, default_manifest_path, load_manifest
from neuronreg.resolve import language, resolve_model

SEED_LANGUAGES = "mt af is cy mk lv lt sl sk et ka ne".split()
HIGH_RESOURCE = "en de fr es it pt ru zh ja ko ar hi tr pl nl vi id sw".split()


def test_models_and_languages_required_by_the_project():
    manifest = load_manifest()
    for alias in ("llama-3.1-8b", "mistral-nemo", "aya-expanse-8b", "smollm2-135m", "qwen2.5-0.5b"):
        assert alias in manifest.models
    assert manifest.models["mistral-nemo"].hub_id == "mistralai/Mistral-Nemo-Base-2407"
    assert manifest.models["llama-3.1-8b"].hub_id == "meta-llama/Llama-3.1-8B"
    codes = {lang.code for lang in manifest.languages}
    assert set(SEED_LANGUAGES + HIGH_RESOURCE) <= codes
    assert all(SPLIT_NAME.match(code) for code in codes)
    assert len(manifest.languages) >= 129


def test_every_ntrex_language_is_in_the_manifest(shared):
    manifest = load_manifest()
    ntrex = [line.split()[0] for line in (shared / "corpora/ntrex/LANGUAGES.tsv").read_text().splitlines() if line]
    assert len(ntrex) >= 128
    for stem in ntrex:
        lang = language(stem, manifest)
        assert lang.ntrex == stem


def test_every_language_has_a_family():
    """Heatmaps order languages by script and family: 'Top-level family' or 'Top-level family/Branch'."""
    manifest = load_manifest()
    for lang in manifest.languages:
        assert lang.family and re.match(r"^[A-Z][\w-]*(/[A-Z][\w-]*)?$", lang.family), (lang.code, lang.family)
    assert language("et", manifest).family == "Uralic/Finnic"
    assert language("ka", manifest).family == "Kartvelian"
    assert language("en_GB", manifest).family == language("en", manifest).family == "Indo-European/Germanic"


@pytest.mark.parametrize("name,code", [("sw", "sw"), ("swa", "sw"), ("swh", "sw"), ("Swahili", "sw"),
                                       ("swh_Latn", "sw"), ("SWAHILI", "sw"), ("eng", "en"), ("eng-GB", "en_GB"),
                                       ("zho_Hant", "zh_Hant"), ("Nepali", "ne"), ("npi", "ne"), ("kat", "ka")])
def test_a_language_by_any_of_its_codes_or_its_name(name, code):
    assert language(name, load_manifest()).code == code


def test_unknown_language_suggests():
    with pytest.raises(UnknownLanguage, match="Did you mean.*sw"):
        language("swahil", load_manifest())


def test_the_packaged_manifest_is_the_repository_manifest():
    from pathlib import Path

    top = Path(__file__).resolve().parents[1] / "manifest.json"
    assert json.loads(default_manifest_path().read_text()) == json.loads(top.read_text())


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d["models"]["mistral-nemo"].pop("hub_id"), "models[mistral-nemo].hub_id is missing"),
    (lambda d: d["models"]["mistral-nemo"].update(num_layers="forty"), "models[mistral-nemo].num_layers must be"),
    (lambda d: d["models"]["mistral-nemo"].update(num_layers=True), "models[mistral-nemo].num_layers must be"),
    (lambda d: d["models"]["mistral-nemo"].update(mlp_layuot="gated"),
     "models[mistral-nemo].mlp_layuot is an unknown key; did you mean 'mlp_layout'?"),
    (lambda d: d["models"]["mistral-nemo"].update(mlp_layout="moe"), "models[mistral-nemo].mlp_layout must be one"),
    (lambda d: d["models"]["mistral-nemo"].update(hub_id="no slash"), "models[mistral-nemo].hub_id must be"),
    (lambda d: d["models"].update(x=[1]), "models[x] must be a JSON object"),
    (lambda d: d["languages"][0].update(code="af-ZA"), "languages[af-ZA].code"),
    (lambda d: d["languages"].append(dict(d["languages"][0])), "languages[af].code is listed twice"),
    (lambda d: d["languages"][0].update(flores200="afr"), "languages[af].flores200"),
    (lambda d: d["languages"][0].update(ntrex=42), "languages[af].ntrex must be a non-empty string"),
    (lambda d: d["languages"][0].update(aliases="afr"), "languages[af].aliases must be a list"),
    (lambda d: d["languages"][0].update(corpus={"confg": "x"}), "languages[af].corpus.confg is an unknown key"),
    (lambda d: d["languages"][0]["corpus"].update(note=["x"]), "languages[af].corpus.note must be a non-empty string"),
    (lambda d: d["languages"][0].update(family=""), "languages[af].family must be a non-empty string"),
    (lambda d: d["languages"][0].update(familly="Isolate"), "languages[af].familly is an unknown key; did you mean "
                                                             "'family'?"),
    (lambda d: d["languages"][0].update(variant_of="xx"), "languages[af].variant_of names 'xx'"),
    (lambda d: d["languages"].append(7), "languages[1"),
    (lambda d: d["default_corpus"].update(dataset=3), "default_corpus.dataset must be"),
    (lambda d: d["default_corpus"].update(configs_source=1), "default_corpus.configs_source must be"),
    (lambda d: d.update(extra=1), "the manifest.extra is an unknown key"),
    (lambda d: d.update(manifest_version=2), "manifest_version is 2"),
])
def test_bad_entries_name_the_key(tmp_path, mutate, key):
    data = json.loads(default_manifest_path().read_text())
    mutate(data)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_a_bad_manifest_is_one_line_on_the_command_line(tmp_path):
    from support.cli import assert_one_line_error, run

    data = json.loads(default_manifest_path().read_text())
    data["languages"][3]["ntrex"] = 42
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    for command in (["languages"], ["models"], ["show", "x", "sw"]):
        assert_one_line_error(run("--manifest", path, *command, ok=False), f"languages[{data['languages'][3]['code']}]"
                              ".ntrex must be a non-empty string")
    path.write_text("{not json")
    assert_one_line_error(run("--manifest", path, "languages", ok=False), "is not valid JSON")
    assert_one_line_error(run("--manifest", tmp_path / "missing.json", "languages", ok=False), "does not exist",
                          "--manifest")


def test_models_resolve_by_alias_hub_id_and_folder(tmp_path):
    manifest = load_manifest()
    assert resolve_model("mistral-nemo", manifest).source == "mistralai/Mistral-Nemo-Base-2407"
    ref = resolve_model("mistralai/Mistral-Nemo-Base-2407", manifest)
    assert ref.name == "mistral-nemo" and not ref.local
    assert resolve_model("acme/New-Model", manifest).name == "acme--New-Model"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "m"), manifest).local
