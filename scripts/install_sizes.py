"""What each part of neuronreg costs to install: packages and megabytes of the core and of each extra.

Builds a wheel of this checkout, installs it into a throwaway virtual environment (with the torch you
name: by default the 2.13.0 CPU build, as scripts/install.sh), and prints one row for the core and one
per extra: the distributions it adds to the core and their size on disk (every file each one's RECORD
lists, .pyc included). An extra's row counts everything it needs beyond the core, even what another
extra needs too (peft and gpu both bring accelerate); ``all`` is every extra at once.

    python scripts/install_sizes.py                     # about 3 minutes, 2 GB of disk under /tmp
    python scripts/install_sizes.py --json sizes.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a fresh virtual environment holds before anything is installed (not counted).
TOOLING = {"pip", "setuptools", "wheel"}
SIZES = r"""
import importlib.metadata as m, json, os
sizes = {}
for dist in m.distributions():
    total = 0
    for f in dist.files or []:
        path = f.locate()
        if os.path.isfile(path):
            total += os.path.getsize(path)
    sizes[dist.metadata["Name"].lower().replace("_", "-")] = total
print(json.dumps(sizes))
"""


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "-q", "--disable-pip-version-check", *args], check=True)


def installed(python: Path) -> dict[str, int]:
    done = subprocess.run([str(python), "-c", SIZES], check=True, capture_output=True, text=True)
    return {name: size for name, size in json.loads(done.stdout).items() if name not in TOOLING}


def would_add(python: Path, requirement: str) -> set[str]:
    """The distributions ``pip install requirement`` would add to the environment as it is."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip(python, "install", "--dry-run", "--report", str(report), requirement)
        plan = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-") for item in plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--torch", default="torch==2.13.0", help="the torch requirement [torch==2.13.0]")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import tomllib  # Python 3.11+

    extras = [name for name in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
              ["optional-dependencies"] if name != "test"]

    with tempfile.TemporaryDirectory(prefix="neuronreg-sizes-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(ROOT)],
                       check=True)
        wheel = next((tmp / "dist").glob("neuronreg-*.whl"))
        subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
        python = tmp / "venv" / "bin" / "python"
        pip(python, "install", args.torch, str(wheel))
        core = installed(python)
        added = {extra: would_add(python, f"{wheel}[{extra}]") - set(core) for extra in extras}
        pip(python, "install", f"{wheel}[{','.join(e for e in extras if e != 'all')}]")
        sizes = installed(python)

    def size(name: str) -> int:
        return sizes.get(name, core.get(name, 0))

    rows = [("core", sorted(core))] + [(f"[{extra}]", sorted(added[extra])) for extra in extras]
    table = [{"part": label, "packages": len(names), "mb": sum(map(size, names)) / 1e6,
              "largest": sorted(names, key=lambda n: -size(n))[:4]} for label, names in rows]
    print(f"{'part':<11} {'packages':>8} {'MB':>8}  largest")
    for row in table:
        largest = ", ".join(f"{n} {size(n) / 1e6:.0f}" for n in row["largest"])
        print(f"{row['part']:<11} {row['packages']:>8} {row['mb']:>8.0f}  {largest}")
    if args.json:
        args.json.write_text(json.dumps({"torch": args.torch, "rows": table, "sizes": sizes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
