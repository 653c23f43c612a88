"""Start-up time of the command line, before and after a change, side by side with `hf --help`.

    python scripts/bench_startup.py                 # this tree against the commit before the redesign
    python scripts/bench_startup.py --before REV    # against another commit

Each command runs in a fresh process, all of them interleaved, `--repeats` times; the table shows
the median wall time and the ratio to `hf --help` measured in the same run. The "before" code is
checked out into a temporary git worktree and run with this environment's Python and packages.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "6ca96c7"  # the last commit before the foundation redesign (issue 9)


def shim(source: Path, folder: Path) -> Path:
    """A folder where `import neuronreg` finds ``source`` (a checkout's registry/)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "neuronreg").symlink_to(source)
    return folder


def neuronreg(path: Path, *args: str) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(path)!r}); sys.argv[0] = 'neuronreg'; " \
           "from neuronreg.cli import main; main()"
    return [sys.executable, "-c", code, *args]


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--show-before", default="legacy-0.1", choices=["legacy-0.1", "counts-1.0"],
                        help="the registry under tests/data that `show` reads with the before code: 0.1's layout "
                             "(what the default before wrote), or the index layout (for a before after the redesign)")
    args = parser.parse_args()
    hf = Path(sys.executable).with_name("hf")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tmp / "before"), args.before],
                       check=True)
        try:
            paths = {"before": shim(tmp / "before" / "registry", tmp / "shim-before"),
                     "after": shim(ROOT / "registry", tmp / "shim-after")}
            env = {**os.environ, "NEURONREG_REGISTRY": str(tmp / "empty-registry"), "HF_HUB_DISABLE_TELEMETRY": "1"}
            commands = {"hf --help": [str(hf), "--help"]}
            # `show` reads one neuron file of a registry in the layout the version writes: neuronreg 0.1's
            # (no index, so the folders are scanned) before the redesign, the card's index after it.
            layouts = {"before": args.show_before, "after": "counts-1.0"}
            for label, path in paths.items():
                registry = ["--registry", str(ROOT / "tests" / "data" / layouts[label] / "registry")]
                commands[f"neuronreg --help ({label})"] = neuronreg(path, "--help")
                commands[f"neuronreg ls ({label})"] = neuronreg(path, "ls")
                commands[f"neuronreg languages ({label})"] = neuronreg(path, "languages")
                commands[f"neuronreg show ({label})"] = neuronreg(path, "show", "planted", "ru", *registry)
            for command in commands.values():  # warm the file cache
                timed(command, env)
            times: dict[str, list[float]] = {name: [] for name in commands}
            for _ in range(args.repeats):
                for name, command in commands.items():
                    times[name].append(timed(command, env))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")], check=False)
    reference = statistics.median(times["hf --help"])
    print(f"Start-up, median of {args.repeats} fresh processes (before = {args.before}; show: `show planted ru` of "
          f"tests/data/{args.show_before} before, tests/data/counts-1.0 after):")
    print(f"| {'command':<34} | {'median':>8} | {'min-max':>13} | {'vs hf --help':>12} |")
    print(f"|{'-' * 36}|{'-' * 9}:|{'-' * 14}:|{'-' * 13}:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name:<34} | {median:>6.3f} s | {min(values):.2f}-{max(values):.2f} s | "
              f"{median / reference:>11.2f}x |")


if __name__ == "__main__":
    main()
