import json

import pytest

from neuronreg.errors import ManifestError, UnknownLanguage
from neuronreg.manifest import SPLIT_NAME, default_manifest_path, load_manifest
from neuronreg.models import resolve_model

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
        lang = manifest.language(stem)
        assert lang.ntrex == stem


@pytest.mark.parametrize("name,code", [("sw", "sw"), ("swa", "sw"), ("swh", "sw"), ("Swahili", "sw"),
                                       ("swh_Latn", "sw"), ("SWAHILI", "sw"), ("eng", "en"), ("eng-GB", "en_GB"),
                                       ("zho_Hant", "zh_Hant"), ("Nepali", "ne"), ("npi", "ne"), ("kat", "ka")])
def test_a_language_by_any_of_its_codes_or_its_name(name, code):
    assert load_manifest().language(name).code == code


def test_unknown_language_suggests():
    with pytest.raises(UnknownLanguage, match="Did you mean.*sw"):
        load_manifest().language("swahil")


def test_the_packaged_manifest_is_the_repository_manifest():
    from pathlib import Path

    top = Path(__file__).resolve().parents[1] / "manifest.json"
    assert json.loads(default_manifest_path().read_text()) == json.loads(top.read_text())


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d["models"]["mistral-nemo"].pop("hub_id"), "models.mistral-nemo.hub_id"),
    (lambda d: d["models"]["mistral-nemo"].update(num_layers="forty"), "models.mistral-nemo.num_layers"),
    (lambda d: d["languages"][0].update(code="af-ZA"), "languages[af-ZA].code"),
    (lambda d: d["languages"].append(dict(d["languages"][0])), "languages[af].code"),
    (lambda d: d["languages"][0].update(flores200="afr"), "languages[af].flores200"),
    (lambda d: d.update(extra=1), "'extra'"),
])
def test_bad_entries_name_the_key(tmp_path, mutate, key):
    data = json.loads(default_manifest_path().read_text())
    mutate(data)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_models_resolve_by_alias_hub_id_and_folder(tmp_path):
    manifest = load_manifest()
    assert resolve_model("mistral-nemo", manifest).source == "mistralai/Mistral-Nemo-Base-2407"
    ref = resolve_model("mistralai/Mistral-Nemo-Base-2407", manifest)
    assert ref.name == "mistral-nemo" and not ref.local
    assert resolve_model("acme/New-Model", manifest).name == "acme--New-Model"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "m"), manifest).local
