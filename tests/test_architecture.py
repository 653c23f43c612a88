"""The layout keeps its promises: layers import downwards only, no cycles, every module imports on its
own, the light commands start without torch, and errors are worded in one place."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neuronreg.cli import cli

from support.cli import assert_one_line_error, run

PACKAGE = Path(__file__).resolve().parents[1] / "registry"
# Lower layers first; a module may import its own layer or lower ones only.
# analysis holds pure computations over models and tensors (no registry, no runs): the methods use it.
LAYERS = ["root", "analysis", "store", "lape", "steering", "evaluation", "finetune", "cli"]


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("neuronreg",) + (parts[:-1] if parts[-1] == "__init__" else parts))
        found[name] = path
    return found


def layer(module: str) -> str:
    if module == "neuronreg.__main__":  # the entry point, above the command line
        return "cli"
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "root"


def imports(name: str, path: Path) -> set[str]:
    """Every neuronreg module ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found, known = set(), modules()
    tree = ast.parse(path.read_text())
    # What `if TYPE_CHECKING:` imports never runs: it only tells type checkers what lazy names are.
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("neuronreg"):
                for alias in node.names:  # 'from . import x' imports the module x, not the package
                    found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("neuronreg"))
    return {m for m in found if m in known and m != name}


def test_layers_import_downwards_only_and_no_library_module_imports_click():
    graph = {name: imports(name, path) for name, path in modules().items()}
    for name, targets in graph.items():
        for target in targets:
            if target == "neuronreg":  # the package root: only __version__ and lazy names
                continue
            assert LAYERS.index(layer(target)) <= LAYERS.index(layer(name)), f"{name} imports {target}"
        source = modules()[name].read_text()
        if layer(name) != "cli":
            assert not re.search(r"^\s*(import click|from click)", source, re.M), f"{name} imports click"
    # cli leaves never import the root group
    for name, targets in graph.items():
        if name.startswith("neuronreg.cli.") and name != "neuronreg.cli":
            assert "neuronreg.cli" not in targets, name


def test_there_is_no_import_cycle_even_inside_functions():
    graph = {name: imports(name, path) - {"neuronreg"} for name, path in modules().items()}
    # A package's __init__ importing its own leaves is not a cycle through them.
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for target in graph.get(node, ()):
            if target.startswith(node + "."):
                continue
            if state.get(target) == 1:
                raise AssertionError(" -> ".join(trail + [target]))
            if not state.get(target):
                visit(target, trail + [target])
        state[node] = 2

    for name in graph:
        if not state.get(name):
            visit(name, [name])


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    names = sorted(set(modules()) - {"neuronreg.__main__"})  # that one runs the command line
    script = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'neuronreg' or m.startswith('neuronreg.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


LIGHT = [["--help"], ["compute", "--help"], ["finetune", "--help"], ["ablate", "--help"], ["ls"],
         ["show", "model", "ru"], ["languages"], ["models"], ["ls", "--json"]]


def test_help_and_listings_start_without_torch(planted, tmp_path):
    from support.tiny import TOP_RATE

    reg = tmp_path / "reg"
    run("compute", planted / "model", "en", "ru", "--corpus", planted / "texts", "--tokens", 600, "--seq-len", 64,
        "--top-rate", TOP_RATE, "--registry", reg, "-q")
    script = (
        "import sys, json\n"
        "from neuronreg.cli import cli\n"
        "cli.main(json.loads(sys.argv[1]), standalone_mode=False)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'huggingface_hub', 'jinja2', 'matplotlib',\n"
        "                           'pandas', 'pyarrow.dataset')\n"
        "               if m in sys.modules)\n"
        "print(json.dumps(heavy), file=sys.stderr)\n"
    )
    env = {**os.environ, "NEURONREG_REGISTRY": str(reg)}
    for args in LIGHT:
        done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, (args, done.stderr[-1500:])
        assert json.loads(done.stderr.strip().splitlines()[-1]) == [], (args, done.stderr)


# -- errors are worded in one place ---------------------------------------------------------------------
def library_sources():
    return {name: path.read_text() for name, path in modules().items() if layer(name) != "cli"}


def test_every_fix_the_library_names_has_a_cli_hint_and_messages_name_no_flags():
    from neuronreg.cli._errors import HINTS

    for name, source in library_sources().items():
        for fix in re.findall(r"fix=\"(\w+)\"", source):
            assert fix in HINTS, f"{name}: fix {fix!r} has no CLI hint"
        for call in ast.walk(ast.parse(source)):
            callee = getattr(call, "func", None)
            callee = getattr(callee, "id", None) or getattr(callee, "attr", None) or ""
            if not isinstance(call, ast.Call) or not re.search(r"(Error|Conflict|Overlap|Failed|warning|info)$",
                                                                 callee):
                continue
            for node in ast.walk(call):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    assert not re.search(r"(^|[\s('\"])--[a-z]", node.value), f"{name}: {node.value!r} names a flag"


def test_usage_errors_are_one_line_and_interrupts_say_resume_only_when_there_is_something_to_resume(
        planted, tmp_path, monkeypatch):
    for args, fragment in ((["compute"], "Missing argument 'MODEL'. (see 'neuronreg compute --help')"),
                           (["show", "--bogus"], "No such option '--bogus'"),
                           (["compute", "m", "en", "--dtype", "fp8"], "Invalid value for '--dtype'"),
                           (["bogus"], "No such command 'bogus'")):
        usage = run(*args, ok=False)
        lines = usage.output.strip().splitlines()
        assert usage.exit_code == 2 and len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0]

    import neuronreg.store.local as local

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(local.LocalRegistry, "models", interrupted)
    stopped = run("ls", "--registry", tmp_path, ok=False)
    assert stopped.exit_code == 130 and stopped.output.strip() == "Interrupted."


def test_debug_shows_the_whole_chain(tmp_path, monkeypatch):
    reg = tmp_path / "reg"
    (reg / "m" / "counts").mkdir(parents=True)
    (reg / "m" / "counts" / "en.parquet").write_bytes(b"not parquet")
    assert_one_line_error(run("select", "m", "--registry", reg, ok=False), "damaged", "neuronreg compute")
    monkeypatch.setenv("NEURONREG_DEBUG", "1")
    result = run("select", "m", "--registry", reg, ok=False)
    error = result.exception
    assert type(error).__name__ == "RegistryError" and error.__cause__ is not None  # chained: raise ... from exc


@pytest.mark.parametrize("command", sorted(cli.commands))  # every command, a new one included
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert "Example:" in result.output and "neuronreg " + command in result.output
    assert cli.commands[command].help and len(cli.commands[command].help.strip()) > 20


def test_the_group_help_lists_every_command():
    listed = run("--help").output
    assert all(f"  {command} " in listed for command in cli.commands)
