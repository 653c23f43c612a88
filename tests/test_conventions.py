"""One convention for every command, checked over ``cli.commands`` so that a new command is covered by
itself: ``-o/--out`` for where output goes (``--output`` kept as a hidden, deprecated alias where it was),
``-q/--quiet`` and ``--json`` everywhere, and ``--json`` printing one JSON document on stdout."""

import json

import click
import pytest
import torch

from neuronreg.cli import cli
from neuronreg.store.local import LocalRegistry

from support.cli import run
from support.hubserver import TEST_USER
from support.tiny import TOP_RATE

# The commands that write a file or folder, each through -o/--out.
WRITES = {"fetch", "export", "ablate", "report", "analyze", "finetune", "compose", "overlap", "steer-eval"}
# Where --output was the spelling before -o/--out: kept working, hidden, with a warning.
OLD_OUTPUT = {"fetch", "export"}


def options(command) -> dict[str, click.Option]:
    return {opt: param for param in command.params if isinstance(param, click.Option)
            for opt in param.opts + param.secondary_opts}


@pytest.mark.parametrize("name", sorted(cli.commands))
def test_every_command_keeps_the_option_conventions(name):
    command = cli.commands[name]
    found = options(command)
    assert found["-q"] is found["--quiet"] and found["-q"].is_flag, name
    assert "--json" in found and found["--json"].is_flag, name
    out = [param for param in command.params if param.name == "out"]
    if name in WRITES:
        [param] = out
        assert param.opts == ["-o", "--out"] and not param.hidden, name
    else:
        assert not out and "-o" not in found, f"{name} writes no file, yet has -o/--out"
    # No other spelling of where output goes: --output only as the hidden old name of -o/--out.
    for opt, param in found.items():
        if opt in ("--output", "--output-dir", "--out-dir", "--dest"):
            assert name in OLD_OUTPUT and opt == "--output" and param.hidden, (name, opt)
    assert ("--output" in found) == (name in OLD_OUTPUT), name


def test_the_declared_sets_name_real_commands():
    assert WRITES <= set(cli.commands) and OLD_OUTPUT <= WRITES


def test_the_old_output_spelling_still_works_with_a_warning(planted, tmp_path):
    reg = tmp_path / "reg"
    compute(planted, reg)
    old = run("export", "model", "--output", tmp_path / "old.pt", "--registry", reg)
    assert "--output is deprecated; use -o/--out" in old.stderr and old.stdout.strip() == str(tmp_path / "old.pt")
    new = run("export", "model", "-o", tmp_path / "new.pt", "--registry", reg)
    assert "deprecated" not in new.stderr
    old_masks, new_masks = (torch.load(tmp_path / f, weights_only=True) for f in ("old.pt", "new.pt"))
    assert [[t.tolist() for t in lang] for lang in old_masks] == [[t.tolist() for t in lang] for lang in new_masks]
    both = run("export", "model", "-o", tmp_path / "a.pt", "--output", tmp_path / "b.pt", "--registry", reg, ok=False)
    assert both.exit_code == 2 and "Give -o/--out once" in both.output
    missing = run("export", "model", "--registry", reg, ok=False)
    assert missing.exit_code == 2 and "Missing option '-o' / '--out'" in missing.output
    assert "--output" not in run("export", "--help").output  # hidden: the help teaches one spelling


def compute(planted, reg, *extra):
    return run("compute", planted / "model", "en", "ru", "el", "--corpus", planted / "texts", "--tokens", "3k",
               "--seq-len", 64, "--top-rate", TOP_RATE, "--registry", reg, "-q", *extra)


def test_quiet_is_accepted_everywhere_and_silences_status(planted, tmp_path):
    reg = tmp_path / "reg"
    empty = run("ls", "--registry", reg)
    assert "is empty" in empty.stderr
    assert run("ls", "--registry", reg, "-q").output == ""
    compute(planted, reg)
    for args in (("ls", "--registry", reg), ("show", "model", "ru", "--registry", reg), ("languages", "sw"),
                 ("models", "smollm2-135m")):
        loud, quiet = run(*args), run(*args, "-q")
        assert quiet.stdout == loud.stdout and loud.stdout and quiet.stderr == "", args
    assert "default selection" in run("ls", "--registry", reg).stderr


def test_ls_lists_the_languages_and_select_tells_its_two_numbers_apart(planted, tmp_path):
    reg = tmp_path / "reg"
    compute(planted, reg)
    # Half the neurons: some of them belong to two languages or more, so the per-language counts sum higher.
    selected = run("select", "model", "--top-rate", 0.5, "--registry", reg)
    data = json.loads(run("select", "model", "--top-rate", 0.5, "--registry", reg, "--json").stdout)
    pairs = sum(data["neurons"].values())
    assert data["selected"] == 48 and pairs != data["selected"]
    assert f"Selected {data['selected']} neurons over 3 languages as selection top50; per language {pairs} in all" \
        in selected.stderr
    assert sum(int(line.split()[1]) for line in selected.stdout.splitlines()[1:]) == pairs
    assert data["name"] == "top50" and data["default"] is False and data["languages"] == ["el", "en", "ru"]

    table = run("ls", "--registry", reg).stdout.splitlines()
    assert "languages" in table[0].split() and "3: el en ru" in table[1] and "top9.375 *" in table[1]
    assert "top50" in table[2] and table[2].rstrip().endswith("3: el en ru")


def test_language_lists_are_shortened_with_their_count():
    from neuronreg.cli._tables import language_list

    assert language_list(["el", "en", "ru"]) == "3: el en ru"
    codes = [f"l{i:03d}" for i in range(130)]
    shown = language_list(codes)
    listed = shown.split()[1:-2]
    assert shown.startswith("130: l000 l001") and listed == codes[:len(listed)]
    assert shown.endswith(f" ... (+{130 - len(listed)})")
    assert len(shown) <= 40 and language_list([]) == "0:"


def test_show_names_the_selection_and_says_it_is_the_default(planted, tmp_path, hub):
    reg = tmp_path / "reg"
    compute(planted, reg)
    run("select", "model", "--top-rate", 0.5, "--registry", reg, "-q")
    local = run("show", "model", "ru", "--registry", reg).stdout
    assert "[selection top9.375, the default]" in local
    assert "[selection top50]" in run("show", "model", "ru", "--top-rate", 0.5, "--registry", reg).stdout
    repo = f"{TEST_USER}/conventions"
    run("publish", "--repo", repo, "--registry", reg, "-q")
    remote = run("show", "model", "ru", "--repo", repo).stdout
    assert remote.splitlines()[0] == local.splitlines()[0]  # the same name the registry gives it
    shown = json.loads(run("show", "model", "ru", "--repo", repo, "--json").stdout)
    assert shown["selection"] == "top9.375" and shown["default"] is True
    other = json.loads(run("show", "model", "ru", "--repo", repo, "--top-rate", 0.5, "--json").stdout)
    assert other["selection"] == "top50" and other["default"] is False


def test_every_command_prints_one_json_document(planted, tmp_path, hub):
    """Each command, run with --json, leaves exactly one JSON document on stdout (status stays on stderr);
    the table below must name every command of ``cli.commands``."""
    reg, runs = tmp_path / "reg", tmp_path / "runs"
    model, texts = planted / "model", planted / "texts"
    train = ("--mask", reg, "--data", texts, "--steps", 2, "--eval-every", 1, "--seq-len", 32, "--registry", reg)
    repo = f"{TEST_USER}/json"
    calls = [
        ("compute", model, "en", "ru", "el", "--corpus", texts, "--tokens", "3k", "--seq-len", 64, "--top-rate",
         TOP_RATE, "--registry", reg),
        ("select", "model", "--top-rate", 0.5, "--registry", reg),
        ("ls", "--registry", reg),
        ("show", "model", "ru", "--registry", reg),
        ("languages", "sw", "el"),
        ("models", "smollm2-135m"),
        ("export", "model", "-o", tmp_path / "masks.pt", "--registry", reg),
        ("import", tmp_path / "masks.pt", "--model", "model", "--languages", "el,en,ru", "--top-rate", 0.05,
         "--registry", reg),
        ("overlap", "model", "-o", tmp_path / "overlap", "--registry", reg),
        ("ablate", model, "--data", texts, "--allow-same-text", "--tokens", 600, "--seq-len", 64, "-o",
         tmp_path / "ablation", "--registry", reg),
        ("finetune", model, "ru", *train, "-o", runs / "ru"),
        ("finetune", model, "el", *train, "-o", runs / "el"),
        ("compose", runs / "ru", runs / "el", "-o", runs / "el+ru"),
        ("evaluate", runs / "ru", "--data", texts, "--tokens", 300, "--seq-len", 32),
        ("report", runs / "ru", runs / "el", "-o", tmp_path / "report"),
        ("analyze", runs / "ru", "--only", "updates", "--draws", 5, "--registry", reg),
        ("generate", model, "abc", "--activate", "el", "--max-new-tokens", 2, "--registry", reg),
        ("steer-eval", model, "--from", "en", "--to", "ru", "--strengths", 1, "--max-new-tokens", 2, "-o",
         tmp_path / "steer", "--registry", reg),
        ("publish", "--repo", repo, "--registry", reg),
        ("fetch", "model", "ru", "--repo", repo, "-o", tmp_path / "ru.parquet"),
        ("release", runs / "ru", "--repo", f"{TEST_USER}/ru-run", "--license", "apache-2.0"),
    ]
    assert {call[0] for call in calls} == set(cli.commands)
    printed = {}
    for call in calls:
        result = run(*call, "--json")
        try:
            printed[call[0]] = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{call[0]} --json printed more than JSON: {result.stdout[:300]!r}") from exc
    # A few fields, to see that the documents are the results they claim to be.
    assert [row["code"] for row in printed["compute"]["languages"]] == ["en", "ru", "el"]
    assert printed["compute"]["selection"]["default"] is True and printed["compute"]["selection"]["selected"] == 9
    assert printed["import"]["selection"] == "imported-top5" and printed["import"]["neurons"] == \
        printed["export"]["neurons"]
    assert printed["export"]["languages"] == ["el", "en", "ru"]
    assert printed["publish"]["changed"] is True and printed["publish"]["repo_id"] == repo
    assert printed["fetch"]["path"] == str(tmp_path / "ru.parquet") and printed["fetch"]["neurons"] == 3
    assert printed["finetune"]["config"]["language"]["code"] == "el"
    assert printed["release"]["repo_id"] == f"{TEST_USER}/ru-run" and printed["release"]["license"] == "apache-2.0"
    assert printed["ablate"]["model"]["name"] == "model" and printed["report"]["format"] == "neuronreg-report"
    assert LocalRegistry(reg).index().models["model"].default == "top9.375"
