"""neuronreg analyze wires the analyses to runs: the run's change as loading applies it, its update as its
method gives it, its own per-step log; checked against computations on the run folders' own files."""

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from neuronreg.analysis.alignment import alignment
from neuronreg.finetune.analyze import AnalyzeSettings, analyze
from neuronreg.finetune.loading import load_sparse_model
from neuronreg.finetune.training import read_steps

from support.cli import assert_one_line_error, run
from support.tiny import make_tokenizer, save_model, tiny_model, write_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    save_model(tiny_model("llama"), root / "llama")
    write_corpus(root / "texts", {"en": "en", "ru": "ru"}, docs=60)
    # Line-aligned "parallel" text: the same number of lines in each language.
    write_corpus(root / "parallel", {"en": "en", "ru": "ru"}, docs=12, seed=7)
    run("compute", root / "llama", "en", "ru", "--corpus", root / "texts", "--tokens", "2k", "--seq-len", 32,
        "--top-rate", 0.1, "--registry", root / "reg", "-q")
    for subset in ("lape", "random", "lora", "ffn"):
        run("finetune", root / "llama", "ru", "--subset", subset, "--mask", root / "reg", "--data", root / "texts",
            "--steps", 3, "--eval-every", 1, "--seq-len", 32, "--lr", 3e-2, "--out", root / "runs" / subset, "-q")
    return root


def test_analyze_applies_each_run_and_reads_its_update_and_log(setup, tmp_path):
    runs = [setup / "runs" / s for s in ("lape", "random", "lora", "ffn")]
    report = analyze(runs, settings=AnalyzeSettings(parallel=str(setup / "parallel"), sentences=10, draws=50),
                     registry=setup / "reg")
    # Alignment: the base and every run, each as loading applies the run
    assert list(report.alignment) == ["base", "lape", "random", "lora", "ffn"]
    parallel = {code: (setup / "parallel" / f"{code}.txt").read_text().split("\n")[:10] for code in ("en", "ru")}
    for name in ("lape", "lora", "ffn"):
        want = alignment(load_sparse_model(setup / "runs" / name), make_tokenizer(), parallel, "en")
        got = report.alignment[name]
        assert [(r.layer, r.language) for r in got] == [(r.layer, r.language) for r in want]
        for a, b in zip(got, want):
            assert a.matched == pytest.approx(b.matched, abs=1e-6)
            assert a.retrieval_from_pivot == b.retrieval_from_pivot and a.retrieval_to_pivot == b.retrieval_to_pivot
    assert report.alignment["lape"] != report.alignment["base"]
    # Updates: a delta run's norm is its delta blocks' norm; a dense run's is tuned - base
    by_label = {r.label: r for r in report.runs}
    deltas = load_file(str(setup / "runs" / "lape" / "delta.safetensors"))
    expected = math.sqrt(sum(float((t.double() ** 2).sum()) for k, t in deltas.items() if k.endswith("_delta")))
    assert by_label["lape"].update.update_norm == pytest.approx(expected, rel=1e-9)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(setup / "llama").state_dict()
    after = AutoModelForCausalLM.from_pretrained(setup / "runs" / "ffn" / "model").state_dict()
    mlp = [k for k in before if ".mlp." in k and k.endswith("weight")]
    dense = math.sqrt(sum(float(((after[k].double() - before[k].double()) ** 2).sum()) for k in mlp))
    assert by_label["ffn"].update.update_norm == pytest.approx(dense, rel=1e-6)
    # The share on the language's neurons: 1 for the lape run (by construction, said so), measured for the others
    assert by_label["lape"].mask_share.share == pytest.approx(1.0) and "by construction" in by_label["lape"].mask_note
    assert 0 <= by_label["ffn"].mask_share.share <= 1 and by_label["ffn"].mask_share.draws == 50
    # Dynamics: each run's own steps.csv, and the validation loss from step 0 (the base's, which only the
    # run config's validation curve holds)
    for name in ("lape", "ffn"):
        logged = read_steps(setup / "runs" / name / "steps.csv")
        steps, losses = by_label[name].curve.points("train_loss")
        assert steps == [row["step"] for row in logged] == [1, 2, 3]
        assert losses == [row["train_loss"] for row in logged]
        assert all("grad_norm" in row and "lr" in row for row in logged)
        curve = json.loads((setup / "runs" / name / "neuronreg_delta.json").read_text())["validation_curve"]
        val_steps, val_losses = by_label[name].curve.points("val_loss")
        assert val_steps[0] == 0 and val_steps == [p["step"] for p in curve]
        assert val_losses == pytest.approx([p["val_loss"] for p in curve])
        assert by_label[name].summary["val_loss"].start == pytest.approx(curve[0]["val_loss"])


def test_the_command_prints_tables_and_writes_files(setup, tmp_path):
    runs = [setup / "runs" / s for s in ("lape", "lora")]
    out = tmp_path / "out"
    result = run("analyze", *runs, "--parallel", setup / "parallel", "--sentences", 8, "--draws", 10, "--registry",
                 setup / "reg", "-o", out)
    assert "alignment with en (8 sentences" in result.stdout and "||dW||/||W||" in result.stdout
    assert "val start" in result.stdout
    names = {p.name for p in out.iterdir()}
    assert {"analysis.json", "alignment.csv", "updates.csv", "dynamics.csv", "training.png", "updates.png",
            "alignment_ru.png"} <= names
    data = json.loads((out / "analysis.json").read_text())
    assert set(data["alignment"]) == {"base", "lape", "lora"} and data["runs"][0]["update"]["kind"] == "row-sparse"
    only = run("analyze", *runs, "--only", "dynamics", "--json")
    assert json.loads(only.stdout)["alignment"] == {}
    assert_one_line_error(run("analyze", *runs, "--only", "alignment", ok=False), "parallel text", "--parallel")


def test_one_selection_for_every_run_compares_kinds_on_the_same_neurons(setup, tmp_path):
    import shutil

    from neuronreg.store.masks import find_masks

    registry = tmp_path / "reg"
    shutil.copytree(setup / "reg", registry)
    run("select", "llama", "--top-rate", 0.2, "--filter-rate", 0.5, "--registry", registry, "-q")
    wider = find_masks("llama", ["ru"], top_rate=0.2, registry=registry).one()
    trained = find_masks("llama", ["ru"], registry=registry).one()
    assert wider != trained
    runs = [setup / "runs" / s for s in ("lape", "ffn")]
    chosen = analyze(runs, settings=AnalyzeSettings(parts=("updates",), draws=10, selection=0.2), registry=registry)
    default = analyze(runs, settings=AnalyzeSettings(parts=("updates",), draws=10), registry=registry)
    # By default the lape run is measured on the neurons it trained, the dense run on the default selection;
    # with a selection given, both on its neurons, and the lape run's share is no longer 1 by construction.
    assert [r.mask_share.neurons for r in default.runs] == [len(trained), len(trained)]
    assert [r.mask_share.neurons for r in chosen.runs] == [len(wider), len(wider)]
    assert "by construction" in default.runs[0].mask_note and chosen.runs[0].mask_note == ""
    inside = set(trained.keys().tolist()) & set(wider.keys().tolist())  # flat neuron keys
    assert (chosen.runs[0].mask_share.share < 1) == (len(inside) < len(trained))
    assert chosen.settings["selection"] == 0.2
    missing = analyze(runs[:1], settings=AnalyzeSettings(parts=("updates",), draws=0, selection="top9"),
                      registry=registry)
    assert missing.runs[0].mask_share is None and missing.runs[0].mask_note.startswith("no top9 ru mask of llama")
    shown = run("analyze", *runs, "--only", "updates", "--draws", 5, "--top-rate", 0.2, "--registry", registry,
                "--json")
    assert [r["mask_share"]["neurons"] for r in json.loads(shown.stdout)["runs"]] == [len(wider)] * 2
