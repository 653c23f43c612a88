"""The registry of record, side by side with the code before issue 21, in one run: a Llama-3.1-8B-shaped
model (32 x 14,336 neurons) with 8, 32 and 130 languages of counts at 13M tokens, written by each
version's own `write_counts` WITH the activation statistics, as `compute` writes them.

    python scripts/bench_registry.py [--languages 8,32,130] [--before 5eb0fd0]

For each size and each version ("before": that commit checked out into a temporary git worktree;
"after": this tree), every step runs in a fresh process and is measured there:

* bytes of the counts on disk;
* `select` at top rate 0.01, then a second `select` at 0.05: wall time, CPU time (user + sys) and peak
  RSS of the process (`wait4`), and whether both versions select the same neurons with the same
  entropies and probabilities, bit for bit;
* `publish` to the loopback Hub server of the test suite (blobs on disk), requests and bytes counted
  by the server: the first publish; the second, after the selection at 0.05 was added; a third with
  nothing changed; a fourth after one language was counted again (every selection's files change);
* `fetch` of one language (``af``, the first of ``@ntrex``), `ls --repo`, and `datasets.load_dataset` of
  that language: of the whole config (it prepares every split), `streaming=True`, and `data_files=`
  (fresh caches each).

The synthetic counts and statistics are shaped like real ones (activation probabilities of about
0.03 to 0.9, float32 means a few binades wide, 60% of them negative; measured on SmolLM2-135M and
Gemma-3-270M, see docs/counts-format.md), so that what compression makes of them is what it makes
of real counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "5eb0fd0"  # the last commit before issue 21 (counts with float64 sums; select reads every column)
LAYERS, INTER, HIDDEN, TOKENS = 32, 14336, 4096, 13_000_000
MODEL = "llama-3.1-8b"
TOKEN, USER = "hf_bench_token", "bench"
FIRST = "af"  # the first language of @ntrex, fetched and loaded alone


# -- what runs in the child processes (imports neuronreg from the version it is given) ---------------------
def synthetic(k: int, seed: int = 0):
    """Language k's counts and float64 activation sums (the same in every process and version)."""
    import numpy as np

    base = np.random.default_rng(1).beta(0.8, 1.8, (LAYERS, INTER))
    rng = np.random.default_rng(1000 * seed + k + 2)
    p = np.clip(base + 0.05 * rng.standard_normal((LAYERS, INTER)), 0.0, 1.0)
    p.reshape(-1)[rng.integers(0, LAYERS * INTER, 3000)] = 0.9  # neurons that fire mostly for this language
    counts = rng.binomial(TOKENS, p).astype(np.int64)
    positive_mean = 10 ** rng.normal(-0.75, 0.3, (LAYERS, INTER))
    negative_mean = -rng.uniform(0.02, 0.15, (LAYERS, INTER))
    activation_sum = counts * positive_mean + (TOKENS - counts) * negative_mean
    positive_sum = np.where(counts > 0, counts * positive_mean, 0.0)
    return counts, activation_sum, positive_sum


def record(lang):
    from neuronreg.provenance import CorpusInfo, CountKey, CountsRecord, LanguageInfo, ModelInfo

    model = ModelInfo(name=MODEL, id="meta-llama/Llama-3.1-8B", revision="synthetic", num_layers=LAYERS,
                      intermediate_size=INTER, hidden_size=HIDDEN, mlp_layout="gated", num_parameters=8030261248)
    corpus = CorpusInfo(kind="hub", dataset="cis-lmu/GlotCC-V1", config=lang.corpus_config, split="train")
    return CountsRecord(model=model, language=LanguageInfo.of(lang), corpus=corpus, tokens=TOKENS, seq_len=1024,
                        dtype="bfloat16", settings=CountKey(model_id=model.id, revision=None, corpus=corpus,
                                                            tokens_requested=TOKENS, seq_len=1024, dtype="bfloat16"))


def languages(n: int):
    from neuronreg.manifest import load_manifest

    manifest = load_manifest()
    codes = list(manifest.sets()["ntrex"][:n])
    try:  # the resolver of this version; the version before issue 18 asked the manifest
        from neuronreg.resolve import languages as resolve
    except ImportError:
        return [manifest.language(code) for code in codes]
    return resolve(codes, manifest)


def child_write(registry: str, n: int, only: int | None, seed: int) -> dict:
    import torch

    from neuronreg.store.local import LocalRegistry

    reg = LocalRegistry(registry)
    for k, lang in enumerate(languages(n)):
        if only is not None and k != only:
            continue
        counts, total, positive = synthetic(k, seed)
        reg.write_counts(MODEL, lang.code, torch.from_numpy(counts), record(lang),
                         activation_sum=torch.from_numpy(total), positive_sum=torch.from_numpy(positive))
    return {}


def child_select(registry: str, rate: float) -> dict:
    from neuronreg.lape.compute import select
    from neuronreg.lape.selection import SelectionParams
    from neuronreg.manifest import load_manifest
    from neuronreg.store.local import LocalRegistry

    select(MODEL, registry=LocalRegistry(registry), params=SelectionParams(top_rate=rate), manifest=load_manifest())
    return {}


def child_publish(registry: str, repo: str, url: str, home: str) -> dict:
    connect(url, home)
    from neuronreg.store.hub import publish
    from neuronreg.store.local import LocalRegistry

    result = publish(LocalRegistry(registry), repo)
    return {key: getattr(result, key, None) for key in ("changed", "sent_bytes", "present", "present_bytes")} | {
        "uploaded": len(result.uploaded)}


def child_fetch(repo: str, url: str, home: str, how: str, lang: str) -> dict:
    connect(url, home)
    if how == "fetch":
        from neuronreg.store.hub import fetch_mask

        return {"neurons": len(fetch_mask(MODEL, lang, repo=repo))}
    if how == "ls":
        from neuronreg.store.hub import read_remote_index

        return {"languages": len(read_remote_index(repo).entries(MODEL)[0].languages)}
    import datasets

    if how == "whole":
        rows = datasets.load_dataset(repo, MODEL, split=lang)
    elif how == "streaming":
        rows = list(datasets.load_dataset(repo, MODEL, split=lang, streaming=True))
    else:
        rows = datasets.load_dataset(repo, data_files={lang: f"{MODEL}/{lang}.parquet"}, split=lang)
    return {"rows": len(rows)}


def connect(url: str, home: str) -> None:
    """Point this process's huggingface_hub and datasets at the loopback server, with its own caches."""
    import pytest

    sys.path.insert(0, str(ROOT / "tests"))
    from support.hubserver import point_clients_at

    point_clients_at(url, pytest.MonkeyPatch(), Path(home), token=TOKEN)
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def child_idle() -> dict:
    import neuronreg.lape.compute  # noqa: F401  (torch, transformers' config classes, the library)

    return {}


CHILDREN = {"write": child_write, "select": child_select, "publish": child_publish, "fetch": child_fetch,
            "idle": child_idle}


# -- the parent: runs each step in a fresh process and measures it ----------------------------------------
class Runner:
    def __init__(self, shims: dict[str, Path]):
        self.shims = shims

    def run(self, version: str, action: str, *args) -> dict:
        """One step in a fresh process: its answer, wall time, CPU time and peak RSS."""
        code = (f"import sys, json; sys.path.insert(0, {str(self.shims[version])!r}); "
                f"sys.path.insert(1, {str(Path(__file__).parent)!r}); import bench_registry as b; "
                f"print(json.dumps(b.CHILDREN[{action!r}](*json.loads(sys.argv[1]))))")
        env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "TRANSFORMERS_VERBOSITY": "error"}
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            start = time.perf_counter()
            process = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=out, stderr=err,
                                       env=env)
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            if process.returncode:
                raise RuntimeError(f"{version} {action} {args} failed:\n{err.read().decode()[-3000:]}")
            answer = json.loads(out.read().decode().strip().splitlines()[-1])
        return {**answer, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024}


def shim(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "neuronreg").symlink_to(source)
    return folder


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.parquet") if p.is_file())


def same_selection(a: Path, b: Path) -> bool:
    """The neuron files of both registries' selections hold the same rows, bit for bit."""
    import pyarrow.parquet as pq

    def rows(registry: Path) -> dict:
        found = {}
        for path in sorted((registry / MODEL).glob("top*/v*/*.parquet")):
            table = pq.ParquetFile(path).read(columns=["layer", "neuron", "entropy", "activation_prob"])
            found[(path.parent.parent.name, path.stem)] = table.to_pydict()
        return found

    first, second = rows(a), rows(b)
    return bool(first) and first == second


def traffic_of(traffic, step) -> dict:
    from support.traffic import total

    step()
    calls = traffic.take()
    count, sent, received = total(calls)
    return {"requests": count, "sent": sent, "received": received,
            "downloads": total(calls, "download")[0], "uploads": total(calls, "upload")[0]}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def measure(n: int, runner: Runner, tmp: Path, server, traffic) -> dict:
    out: dict = {}
    for version in ("before", "after"):
        reg = tmp / f"{version}-{n}"
        runner.run(version, "write", str(reg), n, None, 0)
        counts = sorted((reg / MODEL / "counts").glob("*.parquet"))
        got = {"counts": size(reg / MODEL / "counts"), "per_language": size(reg / MODEL / "counts") / len(counts)}
        got["select"] = runner.run(version, "select", str(reg), 0.01)
        got["select2"] = runner.run(version, "select", str(reg), 0.05)
        repo = f"{USER}/{version}-{n}"
        url = server.url
        publish = lambda: runner.run(version, "publish", str(reg), repo, url, str(tmp / f"hf-{version}-{n}"))  # noqa: E731
        got["publish1"] = traffic_of(traffic, publish)
        runner.run(version, "select", str(reg), 0.02)  # one more selection
        got["publish2"] = traffic_of(traffic, publish)
        got["publish3"] = traffic_of(traffic, publish)
        runner.run(version, "write", str(reg), n, 0, 1)  # the first language counted again, other counts
        for rate in (0.01, 0.05, 0.02):
            runner.run(version, "select", str(reg), rate)
        got["publish4"] = traffic_of(traffic, publish)
        for how in ("fetch", "ls", "whole", "streaming", "data_files"):
            if version == "before" and how not in ("fetch", "ls"):
                continue  # the neuron files did not change: datasets reads them alike
            home = tmp / f"hf-{version}-{n}-{how}"
            got[how] = traffic_of(traffic, lambda: runner.run(version, "fetch", repo, url, str(home), how, FIRST))
        out[version] = got
        if version == "after":
            out["same"] = same_selection(tmp / f"before-{n}", reg)
    return out


def report(results: dict, sizes: list[int]) -> None:
    head = "| what | " + " | ".join(f"{n} languages: before | after" for n in sizes) + " |"
    print(head)
    print("|---|" + "---:|---:|" * len(sizes))

    def row(label, fn):
        cells = []
        for n in sizes:
            cells += [fn(results[n]["before"]), fn(results[n]["after"])]
        print(f"| {label} | " + " | ".join(cells) + " |")

    row("counts on disk", lambda r: mib(r["counts"]))
    row("counts per language", lambda r: mib(r["per_language"]))
    for key, label in (("select", "select top 0.01"), ("select2", "second select (0.05)")):
        row(f"{label}: wall", lambda r, k=key: f"{r[k]['wall']:.1f} s")
        row(f"{label}: CPU", lambda r, k=key: f"{r[k]['cpu']:.1f} s")
        row(f"{label}: peak RSS", lambda r, k=key: f"{r[k]['rss'] / 1e9:.2f} GB")
    for key, label in (("publish1", "publish, first"), ("publish2", "publish after one more selection"),
                       ("publish3", "publish, nothing changed"),
                       ("publish4", "publish after one language was recounted")):
        row(f"{label}: requests", lambda r, k=key: f"{r[k]['requests']:,}")
        row(f"{label}: sent", lambda r, k=key: mib(r[k]["sent"]))
        row(f"{label}: downloaded", lambda r, k=key: mib(r[k]["received"]))
    for key, label in (("fetch", "fetch one language"), ("ls", "ls --repo")):
        row(f"{label}: requests, downloaded", lambda r, k=key: f"{r[k]['requests']}, {mib(r[k]['received'])}")
    for key, label in (("whole", f"load_dataset(repo, model, split={FIRST!r})"),
                       ("streaming", "the same, streaming=True"), ("data_files", f"data_files={{{FIRST!r}: ...}}")):
        row(f"{label}: requests, downloaded",
            lambda r, k=key: f"{r[k]['requests']}, {mib(r[k]['received'])}" if k in r else "")
    print("\nratios after / before:")
    for n in sizes:
        b, a = results[n]["before"], results[n]["after"]
        ratios = {"counts": a["counts"] / b["counts"], "select CPU": a["select"]["cpu"] / b["select"]["cpu"],
                  "select peak RSS": a["select"]["rss"] / b["select"]["rss"],
                  "first publish bytes": a["publish1"]["sent"] / b["publish1"]["sent"],
                  "second publish bytes": a["publish2"]["sent"] / max(b["publish2"]["sent"], 1)}
        print(f"  {n} languages: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
              + f"; same neurons, entropies and probabilities: {'yes' if results[n]['same'] else 'NO'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--languages", default="8,32,130")
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with")
    args = parser.parse_args()
    sizes = [int(n) for n in args.languages.split(",")]
    sys.path.insert(0, str(ROOT / "tests"))
    from support.hubserver import HubServer
    from support.traffic import Traffic

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tmp / "before"), args.before],
                       check=True)
        try:
            runner = Runner({"before": shim(tmp / "before" / "registry", tmp / "shim-before"),
                             "after": shim(ROOT / "registry", tmp / "shim-after")})
            floor = runner.run("after", "idle")
            with HubServer(root=tmp / "hub", tokens={TOKEN: USER}) as server:
                traffic = Traffic(server)
                results = {}
                for n in sizes:
                    start = time.perf_counter()
                    results[n] = measure(n, runner, tmp, server, traffic)
                    print(f"{n} languages measured in {time.perf_counter() - start:.0f} s", file=sys.stderr)
                    for version in ("before", "after"):
                        for folder in tmp.glob(f"{version}-{n}"):
                            subprocess.run(["rm", "-rf", str(folder)], check=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")], check=False)
    print(f"\nLlama-3.1-8B shape ({LAYERS} x {INTER}), counts at {TOKENS:,} tokens with their activation statistics; "
          f"before = {args.before}, after = this tree; each step a fresh process")
    report(results, sizes)
    print(f"\n(a process that only imports neuronreg.lape.compute peaks at {floor['rss'] / 1e9:.2f} GB)")
    print("\n" + json.dumps(results, default=str))


if __name__ == "__main__":
    main()
