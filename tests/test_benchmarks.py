"""Benchmarks through lm-evaluation-harness (evaluate --tasks) and the report across runs, offline: local
task files and data written here, tiny real models, and every score checked against a computation of
our own from the model's log-likelihoods (or sacrebleu)."""

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from neuronreg.errors import NeuronregError
from neuronreg.evaluation import benchmarks as bm
from neuronreg.evaluation.report import collect, eval_results
from neuronreg.finetune.config import FinetuneSettings
from neuronreg.finetune.loading import load_sparse_model
from neuronreg.finetune.training import finetune
from neuronreg.manifest import load_manifest
from neuronreg.mask import NeuronMask
from neuronreg.provenance import LanguageInfo, ModelInfo, NeuronsRecord, SelectionInfo
from neuronreg.resolve import language
from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, run
from support.tiny import HIDDEN, make_tokenizer, save_model, tiny_model, write_corpus

pytest.importorskip("lm_eval")
sacrebleu = pytest.importorskip("sacrebleu")

LETTERS = "abcdefghijklmnopqrstuvwxyz"
EN = {0: [3, 7, 11, 20, 33], 1: [5, 6, 40]}  # 8 neurons of the 2 x 48 tiny Llama
MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
"""


def words(rng, count, low=2, high=6) -> str:
    return " ".join("".join(rng.choice(LETTERS) for _ in range(rng.randint(low, high))) for _ in range(count))


def write_mc_task(folder: Path, docs: int = 16, seed: int = 0) -> list[dict]:
    """A 4-choice task over a local jsonl file (lower-case letters only: one token each for the tiny tokenizer)."""
    rng = random.Random(seed)
    rows = [{"question": words(rng, 3), "choices": [words(rng, 1, 2, 7) for _ in range(4)], "answer": rng.randrange(4)}
            for _ in range(docs)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "tiny_mc.yaml").write_text(MC_TASK.format(data=folder / "mc.jsonl"), encoding="utf-8")
    return rows


def choice_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Our own: the summed log-probability of the continuation's tokens after the context."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(context + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(ctx) + i - 1, token]) for i, token in enumerate(cont))


def our_accuracy(model, tokenizer, rows, text=lambda r: r["question"], choices=lambda r: r["choices"],
                 gold=lambda r: r["answer"]) -> float:
    hits = 0
    for row in rows:
        scores = [choice_loglikelihood(model, tokenizer, text(row), " " + c) for c in choices(row)]
        hits += int(max(range(len(scores)), key=scores.__getitem__) == gold(row))
    return hits / len(rows)


def write_mask(registry: Path, model: str, lang: str, per_layer: dict[int, list[int]]):
    mask = NeuronMask.from_per_layer([sorted(per_layer.get(i, [])) for i in range(2)], model=model, language=lang,
                                     intermediate_size=48)
    mask.provenance = NeuronsRecord(
        model=ModelInfo(name=model, id=model, revision=None, num_layers=2, intermediate_size=48, hidden_size=HIDDEN),
        language=LanguageInfo(code=lang), selection=SelectionInfo(method="lape", languages=[lang], top_rate=0.1),
        num_neurons=len(mask))
    mask.save(registry / model / f"{lang}.parquet")


def train(root: Path, subset: str, out: Path, model: str = "llama"):
    settings = FinetuneSettings(data=str(root / "texts"), out=str(out), subset=subset, steps=3, batch_size=2,
                                seq_len=32, eval_every=3, lr=2e-2)
    return finetune(str(root / model), "en", settings, manifest=load_manifest(), registry=LocalRegistry(root / "reg"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A tiny Llama, its English mask, texts, and four runs of it (lape, random, ffn, full); a run of another model."""
    root = tmp_path_factory.mktemp("bench")
    save_model(tiny_model("llama"), root / "llama")
    save_model(tiny_model("llama", seed=1), root / "other")
    for name in ("llama", "other"):
        write_mask(root / "reg", name, "en", EN)
    write_corpus(root / "texts", {"en": "en", "el": "el"}, docs=60)
    for subset in ("lape", "random", "ffn", "full"):
        train(root, subset, root / "runs" / subset)
    train(root, "lape", root / "runs-other" / "lape", model="other")
    write_mc_task(root / "tasks")
    return root


# -- lm-eval on a model in memory -------------------------------------------------------------------
@pytest.mark.slow
def test_multiple_choice_accuracy_equals_our_own_loglikelihoods(tmp_path):
    rows = write_mc_task(tmp_path / "tasks", docs=20, seed=3)
    model, tokenizer = tiny_model("llama").eval(), make_tokenizer()
    manager = bm.task_manager(include_path=[tmp_path / "tasks"])
    tasks = bm.resolve_tasks(["tiny_mc"], [], manager)
    results, output = bm.evaluate_model(model, tokenizer, tasks, manager=manager, batch_size=3, log_samples=True)
    result = results["tiny_mc"]
    assert result.metrics["acc"] == pytest.approx(our_accuracy(model, tokenizer, rows), abs=1e-12)
    assert result.samples == {"original": 20, "effective": 20} and result.versions == {"tiny_mc": 2.0}
    # Every choice's log-likelihood, not only the argmax, is the model's own.
    for sample in output["samples"]["tiny_mc"]:
        row = rows[sample["doc_id"]]
        ours = [choice_loglikelihood(model, tokenizer, row["question"], " " + c) for c in row["choices"]]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(ours, abs=1e-4)
    limited, _ = bm.evaluate_model(model, tokenizer, tasks, manager=manager, limit=5)
    assert limited["tiny_mc"].samples == {"original": 20, "effective": 5}
    assert limited["tiny_mc"].metrics["acc"] == pytest.approx(our_accuracy(model, tokenizer, rows[:5]), abs=1e-12)


def write_flores(folder: Path, codes=("eng_Latn", "swh_Latn"), sizes=(("dev", 3), ("devtest", 6))) -> Path:
    """The official FLORES-200 archive's layout: <folder>/<split>/<code>.<split>, one sentence per line."""
    rng = random.Random(7)
    for split, count in sizes:
        (folder / split).mkdir(parents=True, exist_ok=True)
        for code in codes:
            lines = [words(rng, 4) for _ in range(count)]
            (folder / split / f"{code}.{split}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.mark.slow
def test_flores_translation_scores_are_sacrebleus_bleu_and_chrf_plus_plus(tmp_path, capfd):
    flores = write_flores(tmp_path / "flores")
    model, tokenizer = tiny_model("llama").eval(), make_tokenizer()
    manager = bm.task_manager({"flores200_dir": flores})
    sw = language("sw", load_manifest())
    tasks = bm.resolve_tasks(["flores"], [sw], manager)
    assert [t.name for t in tasks] == ["flores200_eng_Latn-swh_Latn", "flores200_swh_Latn-eng_Latn"]
    capfd.readouterr()
    results, output = bm.evaluate_model(model, tokenizer, tasks, manager=manager, num_fewshot=1, log_samples=True)
    # lm-eval prints "bootstrapping for stddev" for corpus metrics: on stderr, never among the results
    assert capfd.readouterr().out == ""
    for task in tasks:
        samples = output["samples"][task.name]
        assert len(samples) == 6
        source, target = task.name.removeprefix("flores200_").split("-")
        refs = (flores / "devtest" / f"{target}.devtest").read_text().splitlines()
        sources = (flores / "devtest" / f"{source}.devtest").read_text().splitlines()
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        hyps = [s["filtered_resps"][0] for s in ordered]
        assert [s["target"] for s in ordered] == refs  # joined by sentence id, in order
        assert all(sources[s["doc_id"]] in s["arguments"][0][0] for s in ordered)
        prompt = ordered[0]["arguments"][0][0]
        assert prompt.endswith("Swahili:" if target == "swh_Latn" else "English:") and prompt.count("\n\n") == 1
        metrics = results[task.name].metrics
        assert metrics["chrf++"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs], word_order=2).score)
        assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
        assert results[task.name].config["test_split"] == "devtest"


def test_chrf_plus_plus_of_a_known_pair_is_sacrebleus():
    from lm_eval.api.metrics import chrfpp

    hyp, ref = "the cat sat on the mat", "the cat is sitting on the mat"
    ours = chrfpp([(ref, hyp)])
    assert ours == pytest.approx(sacrebleu.sentence_chrf(hyp, [ref], word_order=2).score)
    assert ours == pytest.approx(sacrebleu.CHRF(word_order=2).corpus_score([hyp], [[ref]]).score)
    assert 0 < ours < 100


def write_sib(folder: Path, code: str = "swh_Latn") -> dict[str, list[dict]]:
    """The SIB-200 repository's layout: <folder>/<code>/{train,dev,test}.tsv, as pandas writes them."""
    rng = random.Random(11)
    topics = ["science/technology", "travel", "politics", "sports", "health", "entertainment", "geography"]
    (folder / code).mkdir(parents=True, exist_ok=True)
    data = {}
    for split, count in (("train", 5), ("dev", 3), ("test", 9)):
        rows = [{"index_id": i, "category": rng.choice(topics), "text": words(rng, 5)} for i in range(count)]
        rows[0]["text"] = 'a "quoted" word'  # pandas quotes it; csv reads it back
        with (folder / code / f"{split}.tsv").open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, ["index_id", "category", "text"], delimiter="\t")
            writer.writeheader()
            writer.writerows(rows)
        data[split] = rows
    return data


@pytest.mark.slow
def test_sib200_accuracy_equals_our_own_loglikelihoods(tmp_path):
    data = write_sib(tmp_path / "sib")
    model, tokenizer = tiny_model("llama").eval(), make_tokenizer()
    manager = bm.task_manager({"sib200_dir": tmp_path / "sib"})
    tasks = bm.resolve_tasks(["sib200"], [language("Swahili", load_manifest())], manager)
    results, _ = bm.evaluate_model(model, tokenizer, tasks, manager=manager)
    topics = ["science/technology", "travel", "politics", "sports", "health", "entertainment", "geography"]
    ours = our_accuracy(model, tokenizer, data["test"], text=lambda r: f"Text: {r['text']}\nTopic:",
                        choices=lambda r: topics, gold=lambda r: topics.index(r["category"]))
    assert results["sib200_swh_Latn"].metrics["acc"] == pytest.approx(ours, abs=1e-12)


# -- task names -------------------------------------------------------------------------------------
def test_benchmarks_resolve_per_language_through_flores_codes(caplog):
    manager = bm.task_manager()
    m = load_manifest()
    sw, mt, en, tongan = (language(c, m) for c in ("sw", "mt", "en", "to"))
    names = [t.name for t in bm.resolve_tasks(["belebele", "sib200", "flores", "english"], [sw, mt], manager)]
    assert names == ["belebele_swh_Latn", "belebele_mlt_Latn", "sib200_swh_Latn", "sib200_mlt_Latn",
                     "flores200_eng_Latn-swh_Latn", "flores200_swh_Latn-eng_Latn", "flores200_eng_Latn-mlt_Latn",
                     "flores200_mlt_Latn-eng_Latn", *bm.ENGLISH_SUITE]
    # lm-eval's own task names pass through; a language without a FLORES code, or without the benchmark, is skipped
    with caplog.at_level("WARNING", logger="neuronreg"):
        tasks = bm.resolve_tasks(["belebele", "flores", "xnli_en"], [tongan, sw, en], manager)
    assert [t.name for t in tasks] == ["belebele_swh_Latn", "belebele_eng_Latn", "flores200_eng_Latn-swh_Latn",
                                       "flores200_swh_Latn-eng_Latn", "xnli_en"]
    assert {(t.benchmark, t.language) for t in tasks[:2]} == {("belebele", "sw"), ("belebele", "en")}
    text = caplog.text
    assert "Tongan (to) has no FLORES-200 code" in text and "into and out of English, not of English (en)" in text
    # Bemba is in FLORES-200 (and SIB-200) but not in Belebele
    bemba = language("bem", m)
    with caplog.at_level("WARNING", logger="neuronreg"):
        assert [t.name for t in bm.resolve_tasks(["belebele", "sib200"], [bemba], manager)] == ["sib200_bem_Latn"]
    assert "Belebele has no Bemba (bem) (no task belebele_bem_Latn)" in caplog.text
    with pytest.raises(NeuronregError, match="Nothing to evaluate: Tongan"):
        bm.resolve_tasks(["belebele"], [tongan], manager)
    with pytest.raises(NeuronregError, match="Unknown task 'belebel'.*Did you mean belebele"):
        bm.resolve_tasks(["belebel"], [sw], manager)


def test_the_shipped_task_files_are_what_the_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", bm.TASKS_PATH / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    files = generate.task_files()
    shipped = {str(p.relative_to(bm.TASKS_PATH)): p.read_text(encoding="utf-8")
               for p in bm.TASKS_PATH.glob("*/*.yaml")}
    assert shipped == files
    assert len(generate.flores_languages()) == 204 and len(files) == 203 * 2 + 205


def test_without_lm_eval_the_error_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(NeuronregError, match=r"pip install 'neuronreg\[eval\]'"):
        bm.task_manager()


# -- evaluate --tasks, and the report -----------------------------------------------------------------
def test_evaluate_tasks_scores_the_base_and_the_run_as_our_own_computation(runs, tmp_path):
    run_folder = runs / "runs" / "lape"
    rows = [json.loads(line) for line in (runs / "tasks" / "mc.jsonl").read_text().splitlines()]
    out = run("evaluate", run_folder, "--tasks", "tiny_mc", "--include-path", runs / "tasks", "--batch-size", 2,
              "--json", "-q")
    data = json.loads(out.stdout)["benchmarks"]["tiny_mc"]
    tokenizer = make_tokenizer()
    base = tiny_model("llama").eval()
    tuned = load_sparse_model(run_folder).eval()
    assert data["base"]["acc"] == pytest.approx(our_accuracy(base, tokenizer, rows), abs=1e-12)
    assert data["tuned"]["acc"] == pytest.approx(our_accuracy(tuned, tokenizer, rows), abs=1e-12)
    saved = json.loads((run_folder / "eval" / "tiny_mc.json").read_text())
    saved_base = json.loads((run_folder / "eval" / "base" / "tiny_mc.json").read_text())
    from importlib.metadata import version

    assert saved["lm_eval_version"] == version("lm_eval") and saved["versions"] == {"tiny_mc": 2.0}
    assert saved["metrics"]["acc"] == data["tuned"]["acc"] and saved_base["metrics"]["acc"] == data["base"]["acc"]
    assert saved["model"] == "tuned" and saved_base["model"] == "base" and saved["run"] == "lape"
    # The held-out path still works next to it, and saves its scores too
    heldout = write_corpus(tmp_path / "heldout", {"en": "en"}, docs=8, seed=4)
    table = run("evaluate", run_folder, "--data", heldout, "--seq-len", 32, "-q").output
    assert "(trained)" in table
    saved_heldout = json.loads((run_folder / "eval" / "heldout.json").read_text())
    assert saved_heldout["scores"]["en"]["tuned_perplexity"] > 0 and saved_heldout["trained_language"] == "en"


@pytest.mark.slow
def test_runs_on_one_base_share_one_measurement_of_it(runs, tmp_path, monkeypatch):
    import shutil

    from neuronreg.finetune import evaluate as ev

    folders = [tmp_path / s for s in ("lape", "random", "ffn")]
    for folder in folders:
        shutil.copytree(runs / "runs" / folder.name, folder, ignore=shutil.ignore_patterns("eval"))
    heldout = write_corpus(tmp_path / "heldout", {"en": "en"}, docs=8, seed=4)
    lm_eval_calls, heldout_calls = [], []
    real_lm_eval, real_score = bm.evaluate_model, ev.score
    monkeypatch.setattr(bm, "evaluate_model", lambda *a, **k: lm_eval_calls.append(1) or real_lm_eval(*a, **k))
    monkeypatch.setattr(ev, "score", lambda *a, **k: heldout_calls.append(1) or real_score(*a, **k))
    out = run("evaluate", *folders, "--tasks", "tiny_mc", "--include-path", runs / "tasks", "--batch-size", 2,
              "--data", heldout, "--seq-len", 32, "--json", "-q")
    data = json.loads(out.stdout)
    assert [Path(d["run"]).name for d in data] == ["lape", "random", "ffn"]
    assert len(lm_eval_calls) == 1 + 3 and len(heldout_calls) == 1 + 3  # the base once, then each run
    rows = [json.loads(line) for line in (runs / "tasks" / "mc.jsonl").read_text().splitlines()]
    tokenizer = make_tokenizer()
    base_acc = our_accuracy(tiny_model("llama").eval(), tokenizer, rows)
    for folder, scores in zip(folders, data):
        assert scores["benchmarks"]["tiny_mc"]["base"]["acc"] == pytest.approx(base_acc, abs=1e-12)
        tuned = load_sparse_model(folder).eval()
        assert scores["benchmarks"]["tiny_mc"]["tuned"]["acc"] == pytest.approx(our_accuracy(tuned, tokenizer, rows),
                                                                             abs=1e-12)
        saved_base = json.loads((folder / "eval" / "base" / "tiny_mc.json").read_text())
        assert saved_base["run"] == folder.name and saved_base["model"] == "base"
        assert saved_base["metrics"]["acc"] == scores["benchmarks"]["tiny_mc"]["base"]["acc"]
    # Each run alone measures exactly what it got from the shared measurement
    for folder, scores in zip(folders, data):
        alone = json.loads(run("evaluate", folder, "--data", heldout, "--seq-len", 32, "--batch-size", 2, "--json",
                               "-q").stdout)
        assert alone["scores"] == scores["scores"]
    assert len(heldout_calls) == 4 + 3 * 2


@pytest.mark.slow
def test_an_interrupted_evaluation_resumes_where_it_stopped(runs, tmp_path, monkeypatch):
    import shutil

    folders = [tmp_path / s for s in ("lape", "ffn")]
    for folder in folders:
        shutil.copytree(runs / "runs" / folder.name, folder, ignore=shutil.ignore_patterns("eval"))
    task = ("--tasks", "tiny_mc", "--include-path", runs / "tasks", "--batch-size", 2, "--json", "-q")
    first = json.loads(run("evaluate", *folders, *task).stdout)
    (folders[1] / "eval" / "tiny_mc.json").unlink()  # as if stopped before the second run's own scores
    calls = []
    real = bm.evaluate_model
    monkeypatch.setattr(bm, "evaluate_model", lambda m, t, tasks, **k: calls.append([x.name for x in tasks])
                        or real(m, t, tasks, **k))
    again = json.loads(run("evaluate", *folders, *task, "--resume").stdout)
    assert calls == [["tiny_mc"]]  # only the second run's: the base and the first run's scores were kept
    assert [d["benchmarks"] for d in again] == [d["benchmarks"] for d in first]
    assert (folders[1] / "eval" / "tiny_mc.json").is_file()
    # Other settings are measured afresh, as is everything without --resume (the base once)
    calls.clear()
    run("evaluate", *folders, *task, "--resume", "--limit", 3)
    assert len(calls) == 1 + 2
    calls.clear()
    run("evaluate", *folders, *task)
    assert len(calls) == 1 + 2


@pytest.mark.slow
def test_report_has_the_base_and_one_row_per_run_with_their_trainable_weights(runs, tmp_path):
    folders = [runs / "runs" / s for s in ("lape", "random", "ffn", "full")]
    heldout = write_corpus(tmp_path / "heldout", {"en": "en"}, docs=8, seed=4)
    for folder in folders:
        run("evaluate", folder, "--data", heldout, "--seq-len", 32, "--tasks", "tiny_mc", "--include-path",
            runs / "tasks", "-q")
    out = tmp_path / "report"
    result = run("report", *folders, "-o", out, "-q")
    lines = [line for line in result.output.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 5  # header, rule, base and four runs
    model = tiny_model("llama")
    everything = sum(p.numel() for p in model.parameters())
    mlp = sum(p.numel() for name, p in model.named_parameters() if ".mlp." in name)
    expected = {"lape": 8 * 3 * HIDDEN, "random": 8 * 3 * HIDDEN, "ffn": mlp, "full": everything}
    data = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row for row in data["rows"]}
    assert list(rows) == ["base", "lape", "random", "ffn", "full"]
    for subset, count in expected.items():
        assert rows[subset]["subset"] == subset and rows[subset]["trainable_parameters"] == count
        assert rows[subset]["trainable_share"] == pytest.approx(count / everything)
        assert rows[subset]["train_tokens"] == 3 * 2 * 32 and rows[subset]["steps"] == 3
    assert rows["base"]["trainable_parameters"] is None
    keys = {m["key"] for m in data["metrics"]}
    assert keys == {"heldout_en/perplexity", "heldout_en/bits_per_character", "tiny_mc/acc"}
    for subset in expected:
        saved = json.loads((runs / "runs" / subset / "eval" / "tiny_mc.json").read_text())["metrics"]["acc"]
        base = json.loads((runs / "runs" / subset / "eval" / "base" / "tiny_mc.json").read_text())["metrics"]["acc"]
        assert rows[subset]["metrics"]["tiny_mc/acc"] == saved
        assert rows[subset]["change"]["tiny_mc/acc"] == pytest.approx(saved - base)
    table = list(csv.DictReader((out / "report.csv").open()))
    assert [r["run"] for r in table] == ["base", "lape", "random", "ffn", "full"]
    assert table[3]["trainable_parameters"] == str(mlp)
    for key in keys:
        png = out / f"{key.replace('/', '_').replace('++', 'pp')}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "tradeoff.png").exists()  # the runs trained English: no trade-off against English
    # The run's scores as huggingface_hub EvalResults for a model card's model-index: one per task and metric
    results = {(r.dataset_name, r.metric_name): r for r in eval_results(runs / "runs" / "lape")}
    mc = results[("tiny_mc", "acc (tiny_mc)")]
    assert (mc.metric_type, mc.metric_value, mc.metric_args) == ("accuracy", rows["lape"]["metrics"]["tiny_mc/acc"],
                                                                 {"num_fewshot": 0})
    assert (mc.dataset_type, mc.dataset_split, mc.dataset_config) == ("json", "test", None)  # a task of no language
    heldout_bpc = [r for r in results.values() if r.metric_name == "bits_per_character (en)"][0]
    assert heldout_bpc.dataset_config == "en" and heldout_bpc.dataset_split == "heldout"
    assert collect([runs / "runs" / "lape"]).runs[0].metrics == rows["lape"]["metrics"]


@pytest.mark.slow
def test_bad_input_is_one_line(runs):
    lape = runs / "runs" / "lape"
    assert_one_line_error(run("evaluate", lape, "--tasks", "belebel", ok=False), "Unknown task 'belebel'",
                          "Did you mean belebele")
    assert_one_line_error(run("evaluate", lape, "--tasks", "belebele", "--languages", "to", ok=False),
                          "Nothing to evaluate: Tongan (to) has no FLORES-200 code")
    assert_one_line_error(run("report", lape, runs / "runs-other" / "lape", "-o", runs / "rep", ok=False),
                          "was trained on other", "a report compares runs of one base model")
    assert_one_line_error(run("report", runs / "texts", "-o", runs / "rep", ok=False),
                          "not a finished fine-tuning run")
    assert_one_line_error(run("evaluate", lape, "--tasks", "tiny_mc", "--limit", 0, ok=False),
                          "limit must be a positive number, got 0.0")
    usage = run("evaluate", lape, ok=False)
    assert usage.exit_code == 2 and "Give --data (held-out text), --tasks (benchmarks), or both" in usage.output
    # A task whose data is not here (nothing is downloaded: the tests run with HF_HUB_OFFLINE=1)
    assert_one_line_error(run("evaluate", lape, "--tasks", "belebele", ok=False),
                          "The data of task belebele_eng_Latn could not be loaded", "HF_HUB_OFFLINE")


def test_the_tradeoff_takes_the_trained_languages_score_against_the_english_suite(tmp_path):
    from neuronreg.evaluation.report import Report, Row, save_report, tradeoff

    english = {f"{task}/acc": 0.5 for task in bm.ENGLISH_SUITE}
    chrf = "flores200_eng_Latn-swh_Latn/chrf++"
    base = Row("base", "base", metrics={**english, chrf: 20.0, "belebele_swh_Latn/acc": 0.3})
    lape = Row("sw-lape", "lape", language="sw", flores200="swh_Latn",
               metrics={**{k: v - 0.01 for k, v in english.items()}, chrf: 25.0, "belebele_swh_Latn/acc": 0.4})
    full = Row("sw-full", "full", language="sw", flores200="swh_Latn",
               metrics={**{k: v - 0.06 for k, v in english.items()}, chrf: 27.0})
    report = Report({"name": "m"}, base, [lape, full], [])
    points, xlabel, ylabel = tradeoff(report)
    assert points == [("sw-lape", pytest.approx(-0.01), 5.0), ("sw-full", pytest.approx(-0.06), 7.0)]
    assert "English suite mean accuracy (6 tasks)" in xlabel and "FLORES-200 eng->X chrF++" in ylabel
    assert save_report(report, tmp_path)["tradeoff"].read_bytes()[:4] == b"\x89PNG"
    # A score of one's choosing on the trained language's axis, named with {code}; one a run lacks is an error
    with pytest.raises(NeuronregError, match=r"No score 'belebele_\{code\}/acc' for run\(s\) sw-full"):
        tradeoff(report, "belebele_{code}/acc")
    lape.metrics["belebele_swh_Latn/acc"] = 0.45
    full.metrics["belebele_swh_Latn/acc"] = 0.2
    points, _, ylabel = tradeoff(report, "belebele_{code}/acc")
    assert points == [("sw-lape", pytest.approx(-0.01), pytest.approx(0.15)),
                      ("sw-full", pytest.approx(-0.06), pytest.approx(-0.1))]
    assert ylabel == "Trained language: Belebele accuracy, change"


@pytest.mark.slow
def test_an_adapter_run_is_scored_with_its_adapter_attached(runs, tmp_path):
    """LoRA runs (PEFT) go through the same in-memory path: the tuned score is the adapter model's."""
    run_folder = tmp_path / "lora"
    train(runs, "lora", run_folder)
    rows = [json.loads(line) for line in (runs / "tasks" / "mc.jsonl").read_text().splitlines()]
    out = run("evaluate", run_folder, "--tasks", "tiny_mc", "--include-path", runs / "tasks", "--batch-size", 2,
              "--json", "-q")
    data = json.loads(out.stdout)["benchmarks"]["tiny_mc"]
    tuned = load_sparse_model(run_folder).eval()
    assert type(tuned).__name__ == "PeftModelForCausalLM"
    assert data["tuned"]["acc"] == pytest.approx(our_accuracy(tuned, make_tokenizer(), rows), abs=1e-12)
    heldout = write_corpus(tmp_path / "heldout", {"en": "en"}, docs=8, seed=4)
    scores = json.loads(run("evaluate", run_folder, "--data", heldout, "--seq-len", 32, "--json", "-q").output)
    assert scores["scores"]["en"]["tuned_loss"] != scores["scores"]["en"]["base_loss"]


@pytest.mark.slow
def test_release_puts_the_scores_in_the_card_and_its_model_index(runs, tmp_path, hub):
    import shutil

    import yaml

    run_folder = tmp_path / "lape"
    shutil.copytree(runs / "runs" / "lape", run_folder)
    run("evaluate", run_folder, "--tasks", "tiny_mc", "--include-path", runs / "tasks", "--batch-size", 2, "-q")
    run("release", run_folder, "--repo", "acme/tiny-en-lape", "-q")
    card = hub.file_bytes("model", "acme/tiny-en-lape", "README.md").decode()
    meta = yaml.safe_load(card.split("---\n")[1])
    saved = json.loads((run_folder / "eval" / "tiny_mc.json").read_text())
    [result] = [r for r in meta["model-index"][0]["results"] if r["dataset"]["name"] == "tiny_mc"]
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == saved["metrics"]["acc"]
    assert meta["language"] == ["en"]
    from huggingface_hub import ModelCard

    assert ModelCard(card).data.eval_results[0].metric_value is not None  # the Hub client reads it back
    assert "## Evaluation" in card and "| this model |" in card
