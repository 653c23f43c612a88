"""Size and speed of a registry of record: a Llama-3.1-8B-shaped model (32 x 14336 neurons) with 128
languages of synthetic counts (13M tokens each) and 5 selections side by side.

    python scripts/bench_registry.py [--languages 128] [--rates 0.005,0.01,0.02,0.05,0.1]

Prints the bytes on disk (counts, neuron files per selection, one language's file, the card), the
time of each `select` (reading and validating 128 counts files, selecting, writing the files and the
card as one commit), and of `ls` and `show` on the result.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from neuronreg.lape.compute import select
from neuronreg.lape.selection import SelectionParams
from neuronreg.manifest import load_manifest
from neuronreg.provenance import CorpusInfo, CountKey, CountsRecord, LanguageInfo, ModelInfo
from neuronreg.resolve import languages
from neuronreg.store.local import LocalRegistry

LAYERS, INTER, HIDDEN, TOKENS = 32, 14336, 4096, 13_000_000
MODEL = "llama-3.1-8b"


def record(lang) -> CountsRecord:
    model = ModelInfo(name=MODEL, id="meta-llama/Llama-3.1-8B", revision="synthetic", num_layers=LAYERS,
                      intermediate_size=INTER, hidden_size=HIDDEN, mlp_layout="gated", num_parameters=8030261248)
    corpus = CorpusInfo(kind="hub", dataset="cis-lmu/GlotCC-V1", config=lang.corpus_config, split="train")
    return CountsRecord(model=model, language=LanguageInfo.of(lang), corpus=corpus, tokens=TOKENS, seq_len=1024,
                        dtype="bfloat16", settings=CountKey(model_id=model.id, revision=None, corpus=corpus,
                                                            tokens_requested=TOKENS, seq_len=1024, dtype="bfloat16"))


def size(paths) -> int:
    return sum(p.stat().st_size for p in paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--languages", type=int, default=128)
    parser.add_argument("--rates", default="0.005,0.01,0.02,0.05,0.1")
    args = parser.parse_args()
    manifest = load_manifest()
    langs = languages(list(manifest.sets()["ntrex"][: args.languages]), manifest)
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        registry = LocalRegistry(Path(tmp) / "reg")
        g = torch.Generator().manual_seed(0)
        base = torch.rand(LAYERS, INTER, generator=g) * 0.5
        start = time.perf_counter()
        for lang in langs:
            p = (base + 0.05 * torch.rand(LAYERS, INTER, generator=g)).clamp(0, 1)
            p.view(-1)[torch.randint(0, LAYERS * INTER, (3000,), generator=g)] = 0.9
            registry.write_counts(MODEL, lang.code, (p.double() * TOKENS).long(), record(lang))
        print(f"wrote {len(langs)} counts files in {time.perf_counter() - start:.1f} s")
        timings = []
        for rate in rates:
            start = time.perf_counter()
            select(MODEL, registry=registry, params=SelectionParams(top_rate=rate), manifest=manifest)
            timings.append(time.perf_counter() - start)
        root = registry.root
        counts = sorted((root / MODEL / "counts").glob("*.parquet"))
        print(f"\nLlama-3.1-8B shape ({LAYERS} x {INTER}), {len(langs)} languages x {len(rates)} selections "
              f"(synthetic counts, {TOKENS:,} tokens each)")
        print(f"| {'what':<44} | {'size':>10} |\n|{'-' * 46}|{'-' * 11}:|")
        one_counts = statistics.median(p.stat().st_size for p in counts)
        print(f"| {'counts, one language':<44} | {one_counts / 2**20:>6.2f} MiB |")
        print(f"| {'counts, all languages':<44} | {size(counts) / 2**20:>6.1f} MiB |")
        total_neurons = 0
        for entry in registry.selections(MODEL):
            files = sorted((root / entry.path).glob("*.parquet"))
            total_neurons += size(files)
            neurons = sum(entry.neurons.values())
            label = f"selection {entry.name}: all {len(files)} files ({neurons:,} rows)"
            print(f"| {label:<44} | {size(files) / 2**20:>6.2f} MiB |")
            one = statistics.median(p.stat().st_size for p in files)
            print(f"| {'  one language (median)':<44} | {one / 1024:>6.1f} KiB |")
        print(f"| {'neuron files, all selections':<44} | {total_neurons / 2**20:>6.1f} MiB |")
        card = root / "README.md"
        print(f"| {'the card (README.md: configs, sizes, index)':<44} | {card.stat().st_size / 1024:>6.0f} KiB |")
        print(f"| {'the whole registry':<44} | {size(p for p in root.rglob('*') if p.is_file()) / 2**20:>6.1f} MiB |")
        print(f"\nselect (read and validate {len(langs)} counts files, select, write {len(langs)} files + the card "
              f"as one commit): {', '.join(f'{t:.1f}' for t in timings)} s for top rates {args.rates}")
        for command in (["ls"], ["show", MODEL, "sw", "--top-rate", "0.05"]):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "neuronreg", *command, "--registry", str(root)], check=True,
                           capture_output=True)
            print(f"neuronreg {' '.join(command)}: {time.perf_counter() - start:.2f} s (a fresh process)")


if __name__ == "__main__":
    main()
