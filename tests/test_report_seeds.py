"""report groups runs that differ only in their seed, and compares two groups with a named test: checked
against scipy's Welch test and a brute-force permutation test on the changes the runs' folders hold."""

import itertools
import json
import statistics
from pathlib import Path

import pytest

from neuronreg.cli._tables import comparisons_markdown, seed_groups_markdown
from neuronreg.evaluation.report import collect

from support.cli import run
from support.tiny import save_model, tiny_model, write_corpus

METRIC = "heldout_en/bits_per_character"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seeds")
    save_model(tiny_model("llama"), root / "llama")
    write_corpus(root / "texts", {"en": "en"}, docs=80)
    write_corpus(root / "heldout", {"en": "en"}, docs=8, seed=3)
    run("compute", root / "llama", "en", "--corpus", root / "texts", "--tokens", "2k", "--seq-len", 32,
        "--top-rate", 0.1, "--registry", root / "reg", "-q")
    for subset in ("lape", "random"):
        for seed in (0, 1, 2):
            out = root / "runs" / f"{subset}-{seed}"
            run("finetune", root / "llama", "en", "--subset", subset, "--seed", seed, "--mask", root / "reg",
                "--data", root / "texts", "--steps", 3, "--seq-len", 32, "--eval-every", 3, "--lr", 3e-2,
                "--out", out, "-q")
            run("evaluate", out, "--data", root / "heldout", "--seq-len", 32, "--tokens", 400, "-q")
    run("finetune", root / "llama", "en", "--subset", "lora", "--data", root / "texts", "--steps", 3, "--seq-len", 32,
        "--out", root / "runs" / "lora-0", "-q")
    run("evaluate", root / "runs" / "lora-0", "--data", root / "heldout", "--seq-len", 32, "--tokens", 400, "-q")
    return root


def changes(root: Path, subset: str) -> list[float]:
    """Independently: each run's tuned minus base bits per character, read from its eval/heldout.json."""
    values = []
    for seed in (0, 1, 2):
        scores = json.loads((root / "runs" / f"{subset}-{seed}" / "eval" / "heldout.json").read_text())["scores"]
        values.append(scores["en"]["tuned_bits_per_character"] - scores["en"]["base_bits_per_character"])
    return values


def test_runs_differing_only_in_their_seed_are_grouped_and_compared(runs, tmp_path):
    scipy_stats = pytest.importorskip("scipy.stats")
    folders = sorted((runs / "runs").iterdir())
    report = collect(folders)
    groups = report.seed_groups()
    sizes = sorted((g.settings["subset"], g.n) for g in groups)
    assert sizes == [("lape", 3), ("lora", 1), ("random", 3)]
    lape, random = (next(g for g in groups if g.settings["subset"] == s) for s in ("lape", "random"))
    a, b = changes(runs, "lape"), changes(runs, "random")
    assert lape.summaries[METRIC].mean == pytest.approx(statistics.mean(a), abs=1e-12)
    assert lape.summaries[METRIC].sd == pytest.approx(statistics.stdev(a), abs=1e-12)
    found = [c for c in report.comparisons(groups) if c.metric == METRIC]
    assert len(found) == 1  # lora has one run: it is summarised, not tested
    comparison = found[0]
    assert comparison.difference == pytest.approx(statistics.mean(a) - statistics.mean(b), abs=1e-12)
    expected = scipy_stats.ttest_ind(a, b, equal_var=False)
    assert comparison.welch.t == pytest.approx(expected.statistic, rel=1e-9)
    assert comparison.welch.p == pytest.approx(expected.pvalue, rel=1e-9)
    observed = abs(statistics.mean(a) - statistics.mean(b))
    pooled = a + b
    extreme = total = 0
    for first in itertools.combinations(range(6), 3):
        x = [pooled[i] for i in first]
        y = [pooled[i] for i in range(6) if i not in first]
        extreme += abs(statistics.mean(x) - statistics.mean(y)) >= observed - 1e-12
        total += 1
    assert comparison.permutation.p == pytest.approx(extreme / total) and comparison.permutation.splits == total
    # Printed, and in report.json
    shown = run("report", *folders, "-o", tmp_path / "r").stdout
    assert "Runs that differ only in their seed" in shown and "p (permutation)" in shown
    assert "\n".join(seed_groups_markdown(report, groups)) in shown
    assert "\n".join(comparisons_markdown(report.comparisons(groups), groups)) in shown
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [g["n"] for g in data["seed_groups"]] == [g.n for g in groups]
    assert data["comparisons"][0]["welch"]["test"] == "welch"


def test_runs_sharing_a_folder_name_are_told_apart_by_the_fewest_path_parts(runs, tmp_path):
    """Two languages' runs both called lape-0 are labelled sw/lape-0 and yo/lape-0: no local path in a report."""
    import shutil

    for lang in ("sw", "yo"):
        shutil.copytree(runs / "runs" / "lape-0", tmp_path / "deep" / lang / "lape-0")
    folders = [tmp_path / "deep" / "sw" / "lape-0", tmp_path / "deep" / "yo" / "lape-0", runs / "runs" / "lape-1"]
    assert [row.label for row in collect(folders).runs] == ["sw/lape-0", "yo/lape-0", "lape-1"]
    shown = run("report", *folders, "-o", tmp_path / "r").stdout
    assert "sw/lape-0" in shown and str(tmp_path) not in shown


def test_a_group_is_named_by_what_sets_it_apart_from_groups_of_its_own_subset():
    from neuronreg.analysis.seeds import RunGroup
    from neuronreg.cli._tables import _group_labels

    lape = {"subset": "lape", "lr": 1e-4, "options": {}, "quantize": None}
    groups = [RunGroup(dict(lape), []), RunGroup(dict(lape, quantize="4bit"), []),
              RunGroup({"subset": "random", "lr": 1e-4, "options": {}, "quantize": None}, []),
              RunGroup({"subset": "lora", "lr": 1e-4, "options": {"r": 32}, "quantize": None}, []),
              RunGroup({"subset": "full", "lr": 1e-5, "options": {}, "quantize": None}, [])]
    assert _group_labels(groups) == ["lape, quantize=None", "lape, quantize=4bit", "random", "lora", "full"]
