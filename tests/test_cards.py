"""A released run's model card: the Hub's metadata (base_model and its relation, license, language, library,
model-index) built with huggingface_hub's own card types, the PEFT adapter naming its base, and every code
snippet of the card running as written against the loopback Hub."""

import re
from pathlib import Path

import pytest
import torch

from neuronreg.mask import NeuronMask
from neuronreg.provenance import LanguageInfo, ModelInfo, NeuronsRecord, SelectionInfo

from support.cli import run
from support.hubserver import TEST_TOKEN, TEST_USER
from support.tiny import save_model, tiny_model, write_corpus

BASE = f"{TEST_USER}/tiny-base"


@pytest.fixture
def world(hub, tmp_path):
    from huggingface_hub import HfApi

    folder = save_model(tiny_model("llama"), tmp_path / "tiny-base")
    api = HfApi(token=TEST_TOKEN)
    api.create_repo(BASE)
    api.upload_folder(repo_id=BASE, folder_path=str(folder))
    mask = NeuronMask.from_per_layer([[1, 2, 3], [4]], model="acme--tiny-base", language="en", intermediate_size=48)
    mask.provenance = NeuronsRecord(
        model=ModelInfo(name="acme--tiny-base", id=BASE, revision=None, num_layers=2, intermediate_size=48,
                        hidden_size=32),
        language=LanguageInfo(code="en"), selection=SelectionInfo(method="lape", languages=["en"], top_rate=0.1),
        num_neurons=len(mask))
    mask.save(tmp_path / "en.parquet")
    write_corpus(tmp_path / "texts", {"en": "en"}, docs=40)
    return tmp_path


def train(world: Path, model, out: str, *extra) -> Path:
    run("finetune", model, "en", "--mask", world / "en.parquet", "--data", world / "texts", "--steps", 2,
        "--eval-every", 1, "--seq-len", 32, "--out", world / out, "-q", *extra)
    return world / out


def snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def run_snippets(card: str) -> int:
    """Execute every Python snippet of the card as written; each must leave a torch model in `model`."""
    found = snippets(card)
    for code in found:
        space: dict = {}
        exec(compile(code, "<card>", "exec"), space)  # noqa: S102 - the card's own snippet, as a reader runs it
        assert isinstance(space["model"], torch.nn.Module), code
    return len(found)


@pytest.mark.parametrize("kind,extra", [("lape", ()), ("lape-merged", ("--merged",)), ("lora", ("--subset", "lora"))])
def test_every_snippet_of_a_released_card_runs_as_written(world, hub, kind, extra):
    from huggingface_hub import ModelCard

    folder = train(world, BASE, kind, *(e for e in extra if e != "--merged"))
    repo = f"{TEST_USER}/run-{kind}"
    run("release", folder, "--repo", repo, "--license", "apache-2.0", *(("--merged",) if "--merged" in extra else ()),
        "-q")
    card = hub.file_bytes("model", repo, "README.md").decode()
    data = ModelCard(card).data
    assert data.base_model == BASE and data.license == "apache-2.0" and data.language == ["en"]
    relation = {"lape": None, "lape-merged": "merge", "lora": "adapter"}[kind]
    assert data.to_dict().get("base_model_relation") == relation
    assert run_snippets(card) >= 1
    if kind == "lora":
        import json

        adapter = json.loads(hub.file_bytes("model", repo, "adapter_config.json"))
        assert adapter["base_model_name_or_path"] == BASE and "AutoPeftModelForCausalLM" in card


def test_a_run_on_a_local_base_names_its_hub_id_when_told(world, hub):
    from huggingface_hub import ModelCard

    local = train(world, world / "tiny-base", "local", "--subset", "lora")
    bare = f"{TEST_USER}/run-local-bare"
    result = run("release", local, "--repo", bare)
    assert "no license" in result.stderr and "--license" in result.stderr
    card = hub.file_bytes("model", bare, "README.md").decode()
    assert ModelCard(card).data.base_model is None and "local folder" in card and not snippets(card)
    named = f"{TEST_USER}/run-local-named"
    run("release", local, "--repo", named, "--base-model", BASE, "--license", "apache-2.0", "-q")
    card = hub.file_bytes("model", named, "README.md").decode()
    assert ModelCard(card).data.base_model == BASE and f'base="{BASE}"' in card
    assert run_snippets(card) == 2  # neuronreg's and PEFT's
