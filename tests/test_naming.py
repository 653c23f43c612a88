"""One resolver: every command accepts every spelling of a model and a language, and means the same.

The models here are real: a tiny Llama uploaded to the loopback Hub (so a manifest alias and a Hub id
load over HTTP with the real clients), and the same weights in a local folder.
"""

import json
import shutil

import pytest

from neuronreg.manifest import default_manifest_path

from support.cli import assert_one_line_error, run
from support.hubserver import TEST_TOKEN, TEST_USER
from support.tiny import PLANTED, TOP_RATE, planted_model, save_model, write_corpus


@pytest.fixture
def world(hub, tmp_path, monkeypatch):
    """A manifest alias 'planted' for the Hub model acme/planted-llama, the Hub model acme/other-llama (not
    in the manifest), a local folder my-llama, texts, held-out texts, and a mask file to import."""
    from huggingface_hub import HfApi

    folder = save_model(planted_model(PLANTED), tmp_path / "my-llama")
    api = HfApi(token=TEST_TOKEN)
    for repo in ("planted-llama", "other-llama"):
        api.create_repo(f"{TEST_USER}/{repo}")
        api.upload_folder(repo_id=f"{TEST_USER}/{repo}", folder_path=str(folder))
    manifest = json.loads(default_manifest_path().read_text())
    manifest["models"]["planted"] = {"hub_id": f"{TEST_USER}/planted-llama", "num_layers": 2, "hidden_size": 32,
                                     "intermediate_size": 48, "num_parameters": 21024}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("NEURONREG_MANIFEST", str(tmp_path / "manifest.json"))
    write_corpus(tmp_path / "texts", {"en": "en", "ru": "ru", "el": "el"})
    write_corpus(tmp_path / "heldout", {"en": "en", "ru": "ru", "el": "el"}, docs=10, seed=3)
    return tmp_path


# registry name -> the spellings that must all mean it (the first computes it)
GROUPS = {
    "planted": ["planted", f"{TEST_USER}/planted-llama"],  # a manifest alias, its Hub id (and its registry name)
    "acme--other-llama": [f"{TEST_USER}/other-llama", "acme--other-llama"],  # a Hub id and its registry name
    "my-llama": ["{folder}", "my-llama"],  # a local folder and its registry name
}


def spell(spelling: str, world) -> str:
    return spelling.format(folder=world / "my-llama")


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_every_command_accepts_every_spelling_of_a_model(world, name, tmp_path):
    reg = world / "reg"
    common = ("--registry", reg, "-q")
    first = spell(GROUPS[name][0], world)
    run("compute", first, "en", "ru", "el", "--corpus", world / "texts", "--tokens", 600, "--seq-len", 64,
        "--top-rate", TOP_RATE, *common)
    assert json.loads(run("ls", "--registry", reg, "--json").output)["models"][0]["model"] == name
    for index, spelling in enumerate(GROUPS[name]):
        model = spell(spelling, world)
        where = f"{name} as {spelling!r}"
        again = run("compute", model, "en", "--corpus", world / "texts", "--tokens", 600, "--seq-len", 64,
                    "--top-rate", TOP_RATE, "--registry", reg)
        assert "unchanged" in again.output, where  # the same model: its counts are reused
        assert run("select", model, "--top-rate", TOP_RATE, *common).output.split() == \
            ["language", "neurons", "el", "3", "en", "3", "ru", "3"], where
        assert run("show", model, "ru", "--registry", reg).output.startswith(f"{name} ru (Russian): 3 neurons"), where
        assert run("export", model, "-o", tmp_path / f"x{index}.pt", *common).exit_code == 0, where
        ablation = run("ablate", model, "--languages", "en,ru", "--data", world / "heldout", "--out",
                       tmp_path / f"ab{index}", "--tokens", 200, "--seq-len", 64, *common)
        assert json.loads((tmp_path / f"ab{index}" / "ablation.json").read_text())["model"]["name"] == name, where
        assert "en (3)" in ablation.output
        out = tmp_path / f"run{index}"
        run("finetune", model, "en", "--mask", reg, "--data", world / "texts", "--steps", 1, "--seq-len", 32,
            "--eval-every", 1, "--out", out, *common)
        config = json.loads((out / "neuronreg_delta.json").read_text())
        assert config["base_model"]["name"] == name and config["mask"]["model"] == name, where
        published = run("publish", model, "--repo", f"{TEST_USER}/registry", *common)
        assert published.exit_code == 0, where
        fetched = json.loads(run("fetch", model, "ru", "--repo", f"{TEST_USER}/registry", "-q").output)
        assert fetched["model"] == name and fetched["num_neurons"] == 3, where
    # import names the model the same way: the imported selection replaces the computed one.
    masks = tmp_path / "x0.pt"
    for spelling in GROUPS[name]:
        imported = run("import", masks, "--model", spell(spelling, world), "--languages", "el,en,ru",
                       "--registry", reg)
        assert f"as {name} into" in imported.stderr


def test_the_issue_example_import_then_export_a_hub_id(tmp_path):
    import torch

    masks = [[torch.tensor([1, 5]), torch.tensor([], dtype=torch.long)], [torch.tensor([0]), torch.tensor([2, 3])]]
    torch.save(masks, tmp_path / "OPT.neuron.pth")
    reg = tmp_path / "reg"
    run("import", tmp_path / "OPT.neuron.pth", "--model", "facebook/opt-6.7b", "--languages", "en,zh",
        "--layers", 2, "--intermediate-size", 16384, "--registry", reg)
    for model in ("facebook/opt-6.7b", "facebook--opt-6.7b"):
        run("export", model, "--format", "lape-pt", "-o", tmp_path / "back.pt", "--registry", reg)
        back = torch.load(tmp_path / "back.pt", weights_only=True)
        assert [[t.tolist() for t in lang] for lang in back] == [[t.tolist() for t in lang] for lang in masks]
        assert "2 neurons" in run("show", model, "en", "--registry", reg).output
    assert "facebook--opt-6.7b" in run("ls", "--registry", reg).output
    assert_one_line_error(run("select", "facebook/opt-6.7b", "--registry", reg, ok=False),
                          "no counts for facebook--opt-6.7b")


# Each command with its language arguments; {lang} is the spelling under test.
LANGUAGE_COMMANDS = {
    "compute": ["compute", "{model}", "{lang}", "--corpus", "{texts}", "--tokens", "600", "--seq-len", "64",
                "--top-rate", TOP_RATE],
    "select": ["select", "{model}", "--languages", "en,{lang},el", "--top-rate", TOP_RATE],
    "show": ["show", "{model}", "{lang}", "--json"],
    "export": ["export", "{model}", "-o", "{tmp}/x.pt", "--languages", "{lang},en"],
    "ablate": ["ablate", "{model}", "--languages", "{lang},en", "--data", "{heldout}", "--out", "{tmp}/ab",
               "--tokens", "200", "--seq-len", "64"],
    "finetune": ["finetune", "{model}", "{lang}", "--data", "{texts}", "--steps", "1", "--seq-len", "32", "--out",
                 "{tmp}/run", "--overwrite"],
    "import": ["import", "{tmp}/masks.pt", "--model", "acme/x", "--layers", "2", "--intermediate-size", "48",
               "--languages", "{lang},en", "--registry", "{tmp}/other-reg"],
}


QUIET = {"show": []}


def test_every_command_accepts_every_spelling_of_a_language_and_fails_alike(planted, tmp_path):
    import torch

    reg = tmp_path / "reg"
    torch.save([[torch.tensor([1]), torch.tensor([2])]] * 2, tmp_path / "masks.pt")
    heldout = write_corpus(tmp_path / "heldout", {"en": "en", "ru": "ru", "el": "el"}, docs=10, seed=3)
    run("compute", planted / "model", "en", "ru", "el", "--corpus", planted / "texts", "--tokens", 600,
        "--seq-len", 64, "--top-rate", TOP_RATE, "--registry", reg, "-q")
    values = {"model": str(planted / "model"), "texts": str(planted / "texts"), "tmp": str(tmp_path),
              "heldout": str(heldout)}
    errors = set()
    for command, args in LANGUAGE_COMMANDS.items():
        for spelling in ("ru", "rus", "Russian", "RUSSIAN", "rus_Cyrl", " ru "):
            filled = [a.format(lang=spelling, **values) for a in args]
            result = run(*filled, "--registry", reg, *QUIET.get(command, ["-q"]))
            assert result.exit_code == 0, (command, spelling)
        bad = run(*[a.format(lang="Russiann", **values) for a in args], "--registry", reg, ok=False)
        assert_one_line_error(bad, "Unknown language 'Russiann'. Did you mean ru", "neuronreg languages")
        errors.add(bad.output.strip())
    assert len(errors) == 1, errors  # the same message from every command
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
