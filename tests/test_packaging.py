"""What `pip install neuronreg` brings and what each extra adds: every third-party import is declared, the
extras' packages are imported only where a feature needs them, a missing one is a one-line error naming its
extra, and the README's main job runs with none of them importable."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neuronreg.extras import EXTRAS

from support.cli import assert_one_line_error

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "registry"
# Every module an extra makes importable.
BLOCKED = sorted({module for extra in EXTRAS.values() for module in extra.modules})


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0).lower().replace("_", "-")


def normalized(name: str) -> str:
    return name.lower().replace("_", "-")


def test_the_extras_table_is_pyprojects():
    project = pyproject()["project"]
    optional = project["optional-dependencies"]
    for extra in EXTRAS.values():
        assert sorted(map(requirement_name, optional[extra.name])) == sorted(map(normalized, extra.packages)), extra
    assert optional["all"] == [f"neuronreg[{','.join(EXTRAS)}]"]
    assert "neuronreg[all]" in optional["test"]
    assert set(optional) == {*EXTRAS, "all", "test"}
    core = set(map(requirement_name, project["dependencies"]))
    assert not core & {normalized(p) for extra in EXTRAS.values() for p in extra.packages}


def third_party_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level?) for every absolute import outside ``if TYPE_CHECKING``."""
    found = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and not child.level and child.module:
                found.append((child.module.split(".")[0], top))
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, nested)

    visit(tree, True)
    return [(name, top) for name, top in found if name not in sys.stdlib_module_names and name != "neuronreg"]


def test_every_third_party_import_is_declared_and_the_extras_are_imported_lazily():
    """Core dependencies may be imported anywhere; an extra's modules only inside functions (behind
    neuronreg.extras.require), never at a module's top; nothing else at all."""
    from importlib.metadata import packages_distributions

    project = pyproject()["project"]
    core = set(map(requirement_name, project["dependencies"]))
    extra_of = {module: extra.name for extra in EXTRAS.values() for module in extra.modules}
    distributions = packages_distributions()
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, top in third_party_imports(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)} imports {module}"
            if module in extra_of:
                assert not top, f"{where} at the top of the module: import it inside the function that needs it"
                continue
            owners = {normalized(d) for d in distributions.get(module, [])}
            assert owners & core, f"{where}, which pyproject.toml's dependencies do not declare ({owners})"


def test_every_folder_that_ships_is_a_listed_package():
    """setuptools warns (and may leave files out) for a folder with package files that `packages` omits."""
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    for folder in [PACKAGE, *sorted(p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        if any(f.is_file() and not f.name.endswith(".pyc") for f in folder.iterdir()):
            name = ".".join(["neuronreg", *folder.relative_to(PACKAGE).parts])
            assert name in listed, f"{folder} ships files but {name} is not in pyproject's packages"


def blocked_python(script: str, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter where no extra's package can be imported, as in a core install."""
    prelude = f"import sys\nfor _name in {BLOCKED!r}:\n    sys.modules[_name] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + script, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_importing_every_neuronreg_module_imports_no_extra():
    """With every extra installed (as here), none is imported until a feature asks for it: the import graph of
    the library, the command line and every command's module does not reach them. (transformers itself
    imports accelerate, Triton and pillow when it finds them, once a model class is imported: its own
    optional use, absent from a core install, as the run below shows.)"""
    script = ("import importlib, json, pkgutil, sys, neuronreg\n"
              "for info in pkgutil.walk_packages(neuronreg.__path__, 'neuronreg.'):\n"
              "    if info.name != 'neuronreg.__main__':\n"
              "        importlib.import_module(info.name)\n"
              f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({BLOCKED!r}))))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == []


# One feature of each extra, called as a user would; the message it must give.
FEATURES = {
    "plots": ("from neuronreg.plots import metric_bars\n"
              "metric_bars(['base'], [1.0], sys.argv[1] + '/bars.png', title='t', ylabel='y')",
              "Figures need matplotlib"),
    "steer": ("from neuronreg.steering.identify import LanguageIdentifier\nLanguageIdentifier()",
              "Measuring the language of outputs needs py3langid"),
    "peft": ("from neuronreg.finetune.config import FinetuneSettings\n"
             "FinetuneSettings(data=sys.argv[1], out=sys.argv[1] + '/run', subset='lora').check()",
             "LoRA and IA3 adapters need peft"),
    "eval": ("from neuronreg.evaluation.benchmarks import task_manager\ntask_manager()",
             "Benchmarks need lm-evaluation-harness"),
    "quantize": ("from neuronreg.finetune.config import FinetuneSettings\n"
                 "FinetuneSettings(data=sys.argv[1], out=sys.argv[1] + '/run', quantize='4bit').check()",
                 "A 4-bit base needs bitsandbytes"),
    "gpu": ("from neuronreg.manifest import load_manifest\nfrom neuronreg.models import load_model\n"
            "from neuronreg.options import LoadOptions\nfrom neuronreg.resolve import resolve_model\n"
            "load_model(resolve_model(sys.argv[2], load_manifest()), LoadOptions(device_map='auto'))",
            "Spreading a model over devices (device_map) needs accelerate"),
}


def test_every_extra_has_a_feature_checked_here():
    assert set(FEATURES) == set(EXTRAS)


@pytest.mark.parametrize("extra", sorted(FEATURES))
def test_a_missing_extra_is_one_line_naming_what_to_install(extra, tmp_path, planted):
    code, needs = FEATURES[extra]
    body = "".join(f"    {line}\n" for line in code.split("\n"))
    script = ("from neuronreg.errors import MissingExtra\ntry:\n" + body
              + "except MissingExtra as exc:\n    print(str(exc))\nelse:\n    print('no error')\n")
    done = blocked_python(script, tmp_path, planted / "model")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"{needs}, which is not installed: pip install 'neuronreg[{extra}]'.\n"
    assert not list(tmp_path.iterdir())  # it stopped before writing anything


def test_the_command_line_says_it_in_one_line_before_loading_the_model(tmp_path, planted):
    script = "from neuronreg.cli import main\nsys.argv[0] = 'neuronreg'\nmain()\n"
    done = blocked_python(script, "finetune", planted / "model", "en", "--data", planted / "texts", "--out",
                          tmp_path / "run", "--subset", "lora")
    assert_one_line_error(Result(done.returncode, done.stdout + done.stderr),
                          "LoRA and IA3 adapters need peft, which is not installed: pip install 'neuronreg[peft]'.")
    assert not (tmp_path / "run").exists()


class Result:
    def __init__(self, exit_code: int, output: str):
        self.exit_code, self.output = exit_code, output


MAIN_JOB = r"""
import json
from pathlib import Path
import datasets
from neuronreg.cli import cli
model, texts, heldout, reg, out = sys.argv[1:6]
common = ["--seq-len", "64", "--registry", reg, "-q"]
for args in (["compute", model, "en", "ru", "el", "--name", "planted", "--corpus", texts, "--tokens", "1500",
              "--top-rate", "0.05", *common],
             ["select", "planted", "--top-rate", "0.1", "--registry", reg, "-q"],
             ["ls", "--registry", reg], ["show", "planted", "ru", "--registry", reg],
             ["ablate", model, "--name", "planted", "--data", heldout, "--tokens", "600", "--out", out, *common]):
    cli.main(args, standalone_mode=False)
print(json.dumps({"rows": len(datasets.load_dataset(reg, "planted", split="ru"))}))
"""


@pytest.mark.slow
def test_the_main_job_runs_with_no_extra_importable(planted, tmp_path):
    """The quickstart's commands (compute, select, ls, show, datasets, ablate) as a core install runs them:
    everything but ablate's heatmap, which it says it skipped."""
    from support.tiny import write_corpus

    heldout = write_corpus(tmp_path / "heldout", {"en": "en", "ru": "ru", "el": "el"}, docs=20, seed=1)
    out = tmp_path / "ablation"
    done = blocked_python(MAIN_JOB, planted / "model", planted / "texts", heldout, tmp_path / "reg", out,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["rows"] > 0
    assert "planted" in done.stdout  # ls and show printed their tables
    assert sorted(p.name for p in out.iterdir()) == ["ablation.csv", "ablation.json", "measurements.csv"]
    skipped = [line for line in done.stderr.splitlines() if "matplotlib" in line]
    assert skipped == ["Figures need matplotlib, which is not installed: pip install 'neuronreg[plots]'. Tables, CSV "
                       "and JSON are written without their figures."]


def test_the_wheel_metadata_names_the_extras(tmp_path):
    """What pip reads: the built metadata declares every extra and the core as pyproject says (no warnings)."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert done.returncode == 0, done.stderr[-2000:]
    # e.g. "Package 'neuronreg.evaluation.tasks.sib200' is absent from the `packages` configuration"
    assert not re.search("warn", done.stdout + done.stderr, re.I), done.stdout + done.stderr
    import zipfile

    wheel = next(tmp_path.glob("neuronreg-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = zf.namelist()
    extras = re.findall(r"^Provides-Extra: (.+)$", metadata, re.M)
    assert sorted(extras) == sorted([*EXTRAS, "all", "test"])
    core = [r for r in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M) if "extra ==" not in r]
    assert sorted(map(requirement_name, core)) == sorted(map(requirement_name, pyproject()["project"]["dependencies"]))
    assert sum(n.startswith("neuronreg/evaluation/tasks/flores200/") for n in names) == len(
        list((PACKAGE / "evaluation" / "tasks" / "flores200").glob("*.yaml")))
    assert wheel.name.endswith("-py3-none-any.whl")  # pure Python: one wheel for every platform
