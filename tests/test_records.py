"""Typed records (provenance, run config) and NeuronMask: round trips, versions, legacy files."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronreg.errors import MaskError, RecordError
from neuronreg.mask import FORMATS, NeuronMask
from neuronreg.provenance import (
    COUNTS_SCHEMA_VERSION,
    SCHEMA_VERSION,
    CorpusInfo,
    CountKey,
    CountsRecord,
    CountSummary,
    ImportInfo,
    LanguageInfo,
    MaskSource,
    ModelInfo,
    NeuronsRecord,
    SelectionInfo,
)
from neuronreg.runs import MaskRef, NeuronCounts, RunConfig, TrainingInfo, read_run_config
from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, neuron_file, run

LEGACY = Path(__file__).parent / "data" / "legacy-0.1"


def model_info(**kw):
    return ModelInfo(**{"name": "m", "id": "acme/m", "revision": "abc", "num_layers": 2, "intermediate_size": 48,
                        "hidden_size": 32, "architecture": "LlamaForCausalLM", "num_parameters": 21024, **kw})


def corpus():
    return CorpusInfo(kind="local", file="sw.txt", sha256="0" * 64)


def counts_record():
    return CountsRecord(model=model_info(), language=LanguageInfo(code="sw", name="Swahili", iso639_3="swa",
                                                                  script="Latn", flores200="swh_Latn"),
                        corpus=corpus(), tokens=1000, seq_len=64, dtype="float32",
                        settings=CountKey(model_id="acme/m", revision=None, corpus=corpus(), tokens_requested=1000,
                                          seq_len=64, dtype="float32"))


def neurons_record(method="lape"):
    return NeuronsRecord(model=model_info(), language=LanguageInfo(code="sw"),
                         selection=SelectionInfo(method=method, languages=["sw", "en"], top_rate=0.05,
                                                 filter_rate=0.95, activation_bar_ratio=0.95, filter_threshold=0.1,
                                                 activation_bar=0.1, selected_total=5, tie_break="lowest"),
                         num_neurons=3, counts={"sw": CountSummary(tokens=1000, corpus=corpus(), seq_len=64)},
                         imported=ImportInfo(file="x.pt", sha256="1" * 64, index=0) if method == "imported" else None)


def run_config():
    return RunConfig(base_model=model_info(), base_path="/somewhere/m", language=LanguageInfo(code="sw"),
                     subset="lape", mask=MaskRef(model="m", language="sw",
                                                 source=MaskSource(kind="registry", selection="top1"),
                                                 selection=neurons_record().selection, model_revision="abc"),
                     neurons=NeuronCounts(total=3, per_layer=[1, 2]), trainable_parameters=288,
                     trainable_share=288 / 21024,
                     training=TrainingInfo(subset="lape", steps=2, batch_size=2, grad_accum=1, seq_len=32, tokens=100,
                                           lr=1e-4, weight_decay=0.01, clip=1.0, warmup_steps=0, schedule="constant",
                                           eval_every=1, eval_fraction=0.02, seed=0, gradient_checkpointing=False,
                                           dtype="float32", device="cpu", data=corpus(), train_rows=10, eval_rows=1),
                     best_step=2, best_val_loss=5.5, validation_curve=[{"step": 0, "val_loss": 6.0}])


RECORDS = {"counts": counts_record, "neurons": neurons_record, "imported": lambda: neurons_record("imported"),
           "run": run_config}


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_write_then_read_gives_an_equal_record(kind, tmp_path):
    record = RECORDS[kind]()
    data = json.loads(json.dumps(record.to_dict()))  # through JSON, as on disk
    again = type(record).from_dict(data, "test")
    assert again == record and again.to_dict() == record.to_dict()
    assert data["schema_version"] == type(record).SCHEMA == (COUNTS_SCHEMA_VERSION if kind == "counts"
                                                             else SCHEMA_VERSION)


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_a_newer_major_version_is_refused_naming_both(kind):
    data = RECORDS[kind]().to_dict()
    mine = type(RECORDS[kind]()).SCHEMA
    data["schema_version"] = f"{int(mine.split('.')[0]) + 1}.0"
    with pytest.raises(RecordError, match=rf"schema {data['schema_version']}, newer than this neuronreg reads "
                                          rf"\({mine}\)"):
        type(RECORDS[kind]()).from_dict(data, "file.parquet")


@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_keys_of_a_newer_minor_version_are_kept(kind):
    record = RECORDS[kind]()
    data = record.to_dict()
    data["schema_version"] = f"{type(record).SCHEMA.split('.')[0]}.7"
    data["future_field"] = {"a": [1, 2]}
    data["model" if kind != "run" else "base_model"]["future_nested"] = "x"
    again = type(record).from_dict(data, "file")
    assert again.extra == {"future_field": {"a": [1, 2]}}
    assert again.to_dict() == data  # written back as read, nothing dropped


@pytest.mark.parametrize("path,value,message", [
    (("tokens",), "many", "tokens must be an integer"),
    (("tokens",), True, "tokens must be an integer"),
    (("model", "num_layers"), None, "model: num_layers must be an integer"),
    (("model", "num_layers"), 10**9, "num_layers 1000000000 is out of range"),
    (("model",), "llama", "model: must be a JSON object"),
    (("language", "code"), 7, "language: code must be a string"),
    (("settings",), None, "settings: must be a JSON object"),
    (("kind",), "neurons", "kind is 'neurons', not 'counts'"),
])
def test_a_malformed_record_names_the_key(path, value, message):
    data = counts_record().to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(RecordError, match=message):
        CountsRecord.from_dict(data, "x.parquet")
    if path != ("kind",):  # every other key here is required
        del target[path[-1]]
        with pytest.raises(RecordError, match="is missing"):
            CountsRecord.from_dict(data, "x.parquet")


def test_a_registry_of_the_previous_version_is_read_and_migrated_without_loss(tmp_path):
    import pyarrow.parquet as pq

    reg_dir = tmp_path / "reg"
    shutil.copytree(LEGACY / "registry", reg_dir)
    reg = LocalRegistry(reg_dir)
    old = {p: json.loads(pq.read_schema(p).metadata[b"neuronreg"]) for p in reg_dir.rglob("*.parquet")}
    for path, legacy in old.items():
        assert "schema_version" not in legacy
        model, lang = path.parent.name if path.parent.name != "counts" else path.parent.parent.name, path.stem
        if path.parent.name == "counts":
            over_zero, record = reg.read_counts(model, lang)
            assert record.tokens == legacy["tokens"] and record.corpus.to_dict() == legacy["corpus"]
            assert record.settings.to_dict() == {k: v for k, v in legacy["settings"].items() if v is not None}
        else:
            record = reg.read_mask(model, lang).provenance
            if legacy["selection"].get("imported"):
                assert record.selection.method == "imported" and record.imported.to_dict() == legacy["imported"]
                assert legacy["tokens"] is None and not record.counts
            else:
                assert record.selection.method == "lape" and record.counts[lang].tokens == legacy["tokens"]
                assert record.counts[lang].corpus.to_dict() == legacy["corpus"]
                assert record.selection.top_rate == legacy["selection"]["top_rate"]
        assert record.model.num_layers == legacy["num_layers"]
        assert record.model.intermediate_size == legacy["intermediate_size"]
        assert record.model.hidden_size == legacy["hidden_size"]
        assert {k: v for k, v in record.model.to_dict().items() if k in legacy["model"] and v is not None} == \
            {k: v for k, v in legacy["model"].items() if v is not None}
    # The commands read it as it is; the next selection writes the current schema.
    assert "3 neurons" in run("show", "planted", "ru", "--registry", reg_dir).output
    listing = json.loads(run("ls", "--registry", reg_dir, "--json").output)
    assert {m["model"]: m["default"] for m in listing["models"]} == {"acme--tiny": "imported-top5",
                                                                    "planted": "top9.375"}
    # A new selection is added beside the old one, which is now in the card's index.
    run("select", "planted", "--top-rate", 0.1, "--registry", reg_dir, "-q")
    assert (reg_dir / "planted" / "ru.parquet").exists()
    assert LocalRegistry(reg_dir).selection("planted").path == "planted"
    # Selecting the old one again replaces 0.1's files with the current layout and schema.
    run("select", "planted", "--top-rate", 9 / 96, "--registry", reg_dir, "-q")
    assert not (reg_dir / "planted" / "ru.parquet").exists()
    again = json.loads(pq.read_schema(neuron_file(reg_dir, "planted", "ru")).metadata[b"neuronreg"])
    assert again["schema_version"] == SCHEMA_VERSION and again["model"]["num_layers"] == 2
    assert run("export", "acme/tiny", "-o", tmp_path / "x.pt", "--registry", reg_dir).exit_code == 0


COUNTS_1_0 = Path(__file__).parent / "data" / "counts-1.0" / "registry"  # written by the 1.0 code itself


def test_counts_of_format_1_0_load_and_migrate_without_loss(tmp_path):
    import pyarrow.parquet as pq

    reg_dir = tmp_path / "reg"
    shutil.copytree(COUNTS_1_0, reg_dir)
    reg = LocalRegistry(reg_dir)
    old_neurons = {p.stem: pq.read_table(p).to_pydict() for p in (reg_dir / "planted" / "top9.375" / "v1").iterdir()}

    def expected(lang):
        """What a read must give, computed here from the old file's own columns."""
        table = pq.read_table(reg_dir / "planted" / "counts" / f"{lang}.parquet").to_pydict()
        order = np.lexsort((np.array(table["neuron"]), np.array(table["layer"])))
        count = np.array(table["count"])[order].reshape(2, 48)
        total, positive = (np.array(table[key])[order].reshape(2, 48) for key in ("activation_sum", "positive_sum"))
        return count, np.float32(total / 3000), np.float32(positive / np.maximum(count, 1))

    before = {}
    for lang in ("el", "en", "ru"):
        assert reg.read_counts_record("planted", lang).schema_version == "1.0"
        count, mean, positive_mean = before[lang] = expected(lang)
        stats = reg.read_activation_means("planted", lang)
        assert np.array_equal(reg.read_counts("planted", lang)[0].numpy(), count)
        assert np.array_equal(stats.mean.numpy(), mean.astype(np.float64))
        assert np.array_equal(stats.positive_mean.numpy(), positive_mean.astype(np.float64))
    # select reads them as they are, selects exactly what the 1.0 code selected, then rewrites them in 2.0.
    run("select", "planted", "--top-rate", 0.09375, "--default", "--registry", reg_dir, "-q")
    entry = LocalRegistry(reg_dir).selection("planted")
    assert entry.path == "planted/top9.375/v1"  # the same selection, byte for byte: nothing to write
    for lang in ("el", "en", "ru"):
        assert pq.read_table(reg_dir / entry.path / f"{lang}.parquet").to_pydict() == old_neurons[lang]
        path = reg_dir / "planted" / "counts" / f"{lang}.parquet"
        assert pq.read_schema(path).names == ["count", "mean", "positive_mean"]
        record = LocalRegistry(reg_dir).read_counts_record("planted", lang)
        assert record.schema_version == COUNTS_SCHEMA_VERSION
        old_record = json.loads(pq.read_schema(COUNTS_1_0 / "planted" / "counts" / f"{lang}.parquet")
                                .metadata[b"neuronreg"])
        assert {**record.to_dict(), "schema_version": "1.0"} == old_record  # the provenance kept as it was
        stats = LocalRegistry(reg_dir).read_activation_means("planted", lang)
        count, mean, positive_mean = before[lang]
        assert np.array_equal(stats.over_zero.numpy(), count)
        assert np.array_equal(stats.mean.numpy(), mean.astype(np.float64))
        assert np.array_equal(stats.positive_mean.numpy(), positive_mean.astype(np.float64))
        assert path.stat().st_size < (COUNTS_1_0 / "planted" / "counts" / f"{lang}.parquet").stat().st_size
    # Selecting again from the 2.0 files: the same neurons, entropies and probabilities.
    run("select", "planted", "--top-rate", 0.09375, "--registry", reg_dir, "-q")
    for lang in ("el", "en", "ru"):
        assert pq.read_table(reg_dir / "planted" / "top9.375" / "v1" / f"{lang}.parquet").to_pydict() == \
            old_neurons[lang]


def test_a_run_config_of_the_previous_version_is_read():
    config = read_run_config(LEGACY / "run")
    legacy = json.loads((LEGACY / "run" / "neuronreg_delta.json").read_text())
    assert config.base_path == legacy["base_model"]["path"] and config.base_model.revision.startswith("local-")
    assert config.mask.model_revision == legacy["mask"]["mask_model_revision"]
    assert config.training.lr == legacy["training"]["lr"] and config.best_step == legacy["best_step"]
    assert "path" not in json.dumps(config.public())
    # The untyped mask source of older runs becomes what the mask IS; the folder it lay in is dropped.
    assert config.mask.source.kind == "registry" and legacy["mask"]["source"]["registry"] not in json.dumps(
        config.to_dict())


def test_a_damaged_provenance_is_one_line(tmp_path):
    import pyarrow.parquet as pq

    reg_dir = tmp_path / "reg"
    shutil.copytree(LEGACY / "registry", reg_dir)
    path = reg_dir / "planted" / "ru.parquet"
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"neuronreg"])
    meta["model"]["num_parameters"] = "lots"
    pq.write_table(table.replace_schema_metadata({b"neuronreg": json.dumps(meta).encode()}), path)
    assert_one_line_error(run("show", "planted", "ru", "--registry", reg_dir, ok=False),
                          "model: num_parameters must be an integer")


# -- NeuronMask -------------------------------------------------------------------------------------
def a_mask(**kw) -> NeuronMask:
    mask = NeuronMask.from_per_layer([[1, 5, 9], [], [0, 47]], model="m", language="sw", intermediate_size=48, **kw)
    return mask


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_mask_saves_and_loads_in_every_format(fmt, tmp_path):
    mask = a_mask(entropy=[0.1, 0.2, 0.3, 0.4, 0.5], activation_prob=[0.9] * 5)
    mask.provenance = NeuronsRecord(model=model_info(num_layers=3), language=LanguageInfo(code="sw"),
                                    selection=SelectionInfo(method="lape", languages=["sw", "en"], top_rate=0.1),
                                    num_neurons=5)
    path = mask.save(tmp_path / f"mask.{fmt}")
    back = NeuronMask.load(path, intermediate_size=48 if fmt == "pt" else None, model="m", language="sw")
    assert back == mask and back.shape == (3, 48) and back.counts_per_layer() == [3, 0, 2]
    assert [t.tolist() for t in back.per_layer()] == [[1, 5, 9], [], [0, 47]]
    assert all(t.dtype == torch.int64 for t in back.per_layer())
    if fmt != "pt":  # the authors' format holds the lists and nothing else
        assert back.provenance == mask.provenance
    if fmt == "parquet":
        assert np.array_equal(back.entropy, mask.entropy) and np.array_equal(back.activation_prob,
                                                                             mask.activation_prob)
    if fmt == "pt":
        assert isinstance(torch.load(path, weights_only=True), list)


def test_mask_set_algebra_random_and_views():
    a = NeuronMask.from_keys("m", "a", 2, 8, [0, 1, 9, 15])
    b = NeuronMask.from_keys("m", "b", 2, 8, [1, 9, 10])
    assert (a | b).keys().tolist() == [0, 1, 9, 10, 15]
    assert (a & b).keys().tolist() == [1, 9]
    assert (a - b).keys().tolist() == [0, 15]
    assert a.jaccard(b) == pytest.approx(2 / 5)
    assert a.boolean().nonzero().tolist() == [[0, 0], [0, 1], [1, 1], [1, 7]]
    rand = a.random_like(seed=4)
    assert rand.counts_per_layer() == a.counts_per_layer() == [2, 2] and rand == a.random_like(seed=4)
    with pytest.raises(MaskError, match="different models"):
        a | NeuronMask.from_keys("m", "c", 3, 8, [1])
    for bad in ([[3, 1]], [[1, 1]], [[8]], [[-1]]):
        with pytest.raises(MaskError):
            NeuronMask.from_per_layer(bad, intermediate_size=8)
