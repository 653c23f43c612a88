"""Benchmark of the Hub registry: file sizes at Llama-3.1-8B scale, and fetch from a cold and a
warm cache against the loopback Hub server of the test suite (requests counted).

    python scripts/bench_hub.py

Sizes: a Llama-3.1-8B-shaped model (32 x 14336 neurons), 12 languages of synthetic counts
(13M tokens each, some neurons made language-specific), selection at top rate 0.05 as in the seed
paper's release.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from neuronreg.lape.compute import select  # noqa: E402
from neuronreg.lape.selection import SelectionParams  # noqa: E402
from neuronreg.provenance import CorpusInfo, CountKey, CountsRecord, LanguageInfo, ModelInfo  # noqa: E402
from neuronreg.store.local import LocalRegistry  # noqa: E402

LANGS = "mt af is cy mk lv lt sl sk et ka ne".split()
LAYERS, INTER, HIDDEN, TOKENS = 32, 14336, 4096, 13_000_000


def synthetic_record(lang: str) -> CountsRecord:
    model = ModelInfo(name="llama-3.1-8b", id="meta-llama/Llama-3.1-8B", revision="synthetic", num_layers=LAYERS,
                      intermediate_size=INTER, hidden_size=HIDDEN, mlp_layout="gated", num_parameters=8030261248)
    corpus = CorpusInfo(kind="synthetic")
    return CountsRecord(model=model, language=LanguageInfo(code=lang, name=lang), corpus=corpus, tokens=TOKENS,
                        seq_len=1024, dtype="bfloat16",
                        settings=CountKey(model_id=model.id, revision="synthetic", corpus=corpus,
                                          tokens_requested=TOKENS, seq_len=1024, dtype="bfloat16"))


def synthetic_registry(root: Path) -> LocalRegistry:
    registry = LocalRegistry(root)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(LAYERS, INTER, generator=g) * 0.5
    for k, lang in enumerate(LANGS):
        p = (base + 0.05 * torch.rand(LAYERS, INTER, generator=g)).clamp(0, 1)
        special = torch.randint(0, LAYERS * INTER, (3000,), generator=g)
        p.view(-1)[special] = 0.9  # neurons that fire mostly for this language
        counts = (p.double() * TOKENS).long()
        registry.write_counts("llama-3.1-8b", lang, counts, synthetic_record(lang))
    select("llama-3.1-8b", registry=registry, params=SelectionParams(top_rate=0.05))
    return registry


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        registry = synthetic_registry(tmp / "reg")
        neuron_sizes = [registry.neuron_path("llama-3.1-8b", lang).stat().st_size for lang in LANGS]
        rows = [len(registry.read_mask("llama-3.1-8b", lang)) for lang in LANGS]
        count_sizes = [registry.counts_path("llama-3.1-8b", lang).stat().st_size for lang in LANGS]
        print(f"Sizes, Llama-3.1-8B shape ({LAYERS} x {INTER}), {len(LANGS)} languages, top rate 0.05 "
              "(synthetic counts)")
        print(f"  one language's neuron file: median {statistics.median(neuron_sizes) / 1024:.0f} KiB "
              f"({statistics.median(rows):.0f} neurons; min {min(neuron_sizes) / 1024:.0f}, "
              f"max {max(neuron_sizes) / 1024:.0f} KiB)")
        print(f"  one language's counts file: {statistics.median(count_sizes) / 2**20:.2f} MiB "
              f"({LAYERS * INTER:,} neurons)")
        print(f"  the model's counts ({len(LANGS)} languages): {sum(count_sizes) / 2**20:.1f} MiB; "
              f"whole model folder: {sum(neuron_sizes + count_sizes) / 2**20:.1f} MiB")
        fetch_benchmark(registry, tmp)


def fetch_benchmark(registry, tmp: Path, repeats: int = 5) -> None:
    import pytest

    from support.hubserver import HubServer, point_clients_at

    with HubServer(tokens={"hf_bench_token": "bench"}) as server, pytest.MonkeyPatch.context() as mp:
        point_clients_at(server.url, mp, tmp / "clients")
        mp.setenv("HF_TOKEN", "hf_bench_token")
        import huggingface_hub.constants as c

        from neuronreg.store.hub import fetch_mask, publish

        publish(registry, "bench/lape-neurons", token="hf_bench_token")
        cold, warm, requests = [], [], []
        for i in range(repeats):
            cache = tmp / f"cache-{i}"
            mp.setattr(c, "HF_HUB_CACHE", str(cache))
            server.clear_requests()
            start = time.perf_counter()
            fetch_mask("llama-3.1-8b", "cy", repo="bench/lape-neurons")
            cold.append(time.perf_counter() - start)
            requests.append(list(server.requests))
            start = time.perf_counter()
            mp.setattr(c, "HF_HUB_OFFLINE", True)
            fetch_mask("llama-3.1-8b", "cy", repo="bench/lape-neurons")
            warm.append(time.perf_counter() - start)
            mp.setattr(c, "HF_HUB_OFFLINE", False)
        files = sorted({path for method, path in requests[0] if method == "GET" and "/resolve/" in path})
        print(f"\nfetch llama-3.1-8b cy from the loopback Hub server, median of {repeats}:")
        listed = ", ".join(f"{method} {path.split('?')[0]}" for method, path in requests[0])
        print(f"  cold cache: {statistics.median(cold) * 1000:.0f} ms, {len(requests[0])} requests ({listed})")
        print(f"  warm cache, HF_HUB_OFFLINE=1: {statistics.median(warm) * 1000:.1f} ms, 0 requests")
        print(f"  files downloaded by the cold fetch: {files}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    main()
