"""scripts/build_registry.sh end to end on a tiny model, against the loopback Hub, run twice."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support.hubserver import TEST_TOKEN, TEST_USER

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_registry.sh"


@pytest.mark.slow
def test_build_registry_counts_selects_imports_and_publishes_resumably(planted, hub, tmp_path):
    import datasets

    masks = tmp_path / "authors.pt"
    torch.save([[torch.tensor([1, 5]), torch.tensor([2])], [torch.tensor([0]), torch.tensor([2, 3])]], masks)
    (tmp_path / "imports.txt").write_text(f"# the authors' release\n{masks} acme/authors en,ru 0.05 --layers 2 "
                                          "--intermediate-size 48\n")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "NEURONREG": str(bin_dir / "neuronreg"),
           "LANGUAGES": "en,ru,el", "CORPUS": str(planted / "texts"), "TOKENS": "600", "TOP_RATES": "0.1 0.3",
           "REPO": f"{TEST_USER}/registry", "REGISTRY": str(tmp_path / "reg"), "GPUS": "1",
           "IMPORTS": str(tmp_path / "imports.txt"), "HF_ENDPOINT": hub.url, "HF_TOKEN": TEST_TOKEN,
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    first = subprocess.run(["bash", str(SCRIPT), str(planted / "model")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    files = set(hub.files("dataset", f"{TEST_USER}/registry"))
    assert {"model/top10/ru.parquet", "model/top30/ru.parquet", "model/ru.parquet", "model/counts/el.parquet",
            "acme--authors/imported-top5/en.parquet", "README.md"} <= files
    for config in ("model", "model-top10", "model-top30", "acme--authors"):
        assert datasets.load_dataset(f"{TEST_USER}/registry", config, split="ru").num_rows > 0
    commits = hub.commits("dataset", f"{TEST_USER}/registry")

    again = subprocess.run(["bash", str(SCRIPT), str(planted / "model")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "unchanged" in again.stdout and "no commit made" in again.stderr  # nothing counted or sent twice
    assert hub.commits("dataset", f"{TEST_USER}/registry") == commits
    listing = json.loads(subprocess.run([env["NEURONREG"], "ls", "--repo", f"{TEST_USER}/registry", "--json"],
                                        env=env, capture_output=True, text=True, check=True).stdout)
    assert {m["model"]: [s["name"] for s in m["selections"]] for m in listing["models"]} == {
        "acme--authors": ["imported-top5"], "model": ["top10", "top30"]}


def test_the_estimate_comes_before_the_work():
    from neuronreg.lape.estimate import estimate

    eight_b = estimate("llama-3.1-8b", 8_030_261_248, 130, 13_000_000)
    assert eight_b.tokens_per_s == pytest.approx(29_522)
    assert eight_b.gpu_hours == pytest.approx(130 * 13_000_000 / 29_522 / 3600)
    assert estimate("x", None, 1, 1).gpu_hours is None
    text = SCRIPT.read_text()
    assert text.index("models --estimate") < text.index('compute "$model"')
