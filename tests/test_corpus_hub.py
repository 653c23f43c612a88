"""The default Hub corpus (GlotCC-V1): the manifest's config names, and the error for a config a dataset
lacks, streamed with the real `datasets` client from the loopback Hub of tests/support/hubserver.py."""

import io
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neuronreg.corpus import CorpusSource, iter_documents
from neuronreg.errors import CorpusError
from neuronreg.manifest import load_manifest
from neuronreg.resolve import language

from support.cli import assert_one_line_error, run
from support.hubserver import TEST_USER, set_offline

DATASET = f"{TEST_USER}/glot"
# GlotCC's own names: ISO 639-3 individual-language code, a dash, the ISO 15924 script.
CONFIGS = ("ekk-Latn", "eng-Latn", "shi-Latn", "zgh-Tfng")
GLOTCC_CONFIG = re.compile(r"^[a-z]{3}-[A-Z][a-z]{3}$")


@pytest.fixture
def glot(hub):
    """A dataset repo whose card declares CONFIGS, each one parquet file of two documents."""
    from huggingface_hub import CommitOperationAdd, HfApi

    card = ["---", "configs:"]
    files = []
    for config in CONFIGS:
        card += [f"- config_name: {config}", "  data_files:", "  - split: train", f"    path: v1.0/{config}/*.parquet"]
        buffer = io.BytesIO()
        pq.write_table(pa.table({"content": [f"{config} one", f"{config} two"]}), buffer)
        files.append(CommitOperationAdd(f"v1.0/{config}/{config}_0.parquet", buffer.getvalue()))
    card.append("---")
    api = HfApi()
    api.create_repo(DATASET, repo_type="dataset")
    api.create_commit(DATASET, [CommitOperationAdd("README.md", "\n".join(card).encode()), *files],
                      commit_message="configs", repo_type="dataset")
    return DATASET


def source(config: str) -> CorpusSource:
    return CorpusSource("hub", DATASET, config, "train", "content")


def test_a_config_the_dataset_has_streams(glot):
    assert list(iter_documents(source("ekk-Latn"))) == ["ekk-Latn one", "ekk-Latn two"]


def test_a_config_the_dataset_lacks_names_the_closest_it_has(glot):
    with pytest.raises(CorpusError) as err:
        list(iter_documents(source("shi-Arab")))
    # The same language in another script comes first, then the names most alike.
    assert err.value.message.startswith(f"{DATASET} has no config 'shi-Arab'. Closest: shi-Latn, ")
    assert "\n" not in str(err.value) and err.value.fix == "corpus" and err.value.__cause__ is not None
    with pytest.raises(CorpusError, match="Closest: eng-Latn"):
        list(iter_documents(source("eng_latn")))


def test_a_missing_config_is_one_line_on_the_command_line(glot, planted, tmp_path):
    result = run("compute", planted / "model", "et", "--corpus", f"hf:{glot}:est-Latn", "--tokens", "1k",
                 "--seq-len", 64, "--registry", tmp_path / "reg", "-q", ok=False)
    assert_one_line_error(result, f"{glot} has no config 'est-Latn'. Closest: ", "ekk-Latn", "--corpus")


def test_offline_the_streaming_error_stands(glot, monkeypatch):
    """Config names cannot be listed without the Hub: the error is the streaming one, not a guess."""
    set_offline(monkeypatch)
    with pytest.raises(CorpusError, match=r"^Cannot stream .*\(shi-Arab\) from the Hub"):
        list(iter_documents(source("shi-Arab")))


def test_the_manifest_names_glotcc_configs():
    manifest = load_manifest()
    assert manifest.default_corpus["dataset"] == "cis-lmu/GlotCC-V1"
    assert "GlotCC" in manifest.default_corpus["configs_source"]
    for lang in manifest.languages:
        assert GLOTCC_CONFIG.match(lang.corpus_config), (lang.code, lang.corpus_config)
    # GlotCC labels with GlotLID's individual-language codes, not FLORES-200's.
    assert language("et", manifest).corpus_config == "ekk-Latn"
    assert language("zh", manifest).corpus_config == language("zh_Hant", manifest).corpus_config == "cmn-Hani"
    assert "No GlotCC-V1 data" in language("mey", manifest).corpus_note
