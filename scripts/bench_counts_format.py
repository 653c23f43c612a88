"""Which Parquet layout makes a counts file small: measured on REAL counts, projected to the 8B shape.

    python scripts/bench_counts_format.py REGISTRY MODEL [--tokens 13000000]

REGISTRY/MODEL/counts/*.parquet are counts that ``neuronreg compute`` wrote (any format it reads, with
the activation statistics). For every language, each candidate layout is written and its bytes counted
column by column (a file per column, so the table says what each choice costs); the bytes per neuron
are then projected to Llama-3.1-8B (32 x 14,336 neurons). Counts measured on a short text are small
numbers; the projection also writes counts of the same activation probabilities at ``--tokens``
tokens (binomial spread around ``p x tokens``), which is what a count of the registry of record holds.
The activation means are the real ones in every case: their bits do not depend on the text's length.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neuronreg.store.local import LocalRegistry

NEURONS_8B = 32 * 14336


def size(table: pa.Table, **options) -> int:
    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.tell()


def column_sizes(languages: dict, tokens: int | None) -> dict[str, list[float]]:
    """Bytes per neuron of every candidate, per language."""
    out: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)

    def add(name, table, **options):
        out.setdefault(name, []).append(size(table, **options) / table.num_rows)

    for count, mean, positive, real_tokens, layers in languages.values():
        n = count.size
        if tokens:  # the same probabilities at the registry's token count
            p = count / real_tokens
            count = np.clip(np.rint(p * tokens + rng.standard_normal(n) * np.sqrt(tokens * p * (1 - p))), 0, tokens)
        layer = np.repeat(np.arange(layers, dtype=np.int32), n // layers)
        neuron = np.tile(np.arange(n // layers, dtype=np.int32), layers)
        c64, c32 = count.astype(np.int64), count.astype(np.int32)
        for level in (1, 3, 9, 19):
            add(f"count int64 zstd({level})", pa.table({"c": c64}), compression="zstd", compression_level=level)
            add(f"count int32 zstd({level})", pa.table({"c": c32}), compression="zstd", compression_level=level)
            add(f"count int32 delta zstd({level})", pa.table({"c": c32}), compression="zstd",
                compression_level=level, use_dictionary=False, column_encoding={"c": "DELTA_BINARY_PACKED"})
            add(f"count int32 byte-split zstd({level})", pa.table({"c": c32}), compression="zstd",
                compression_level=level, use_dictionary=False, column_encoding={"c": "BYTE_STREAM_SPLIT"})
        add("count int32 lz4", pa.table({"c": c32}), compression="lz4")
        add("count int32 snappy", pa.table({"c": c32}), compression="snappy")
        add("count int32 byte-split brotli", pa.table({"c": c32}), compression="brotli", use_dictionary=False,
            column_encoding={"c": "BYTE_STREAM_SPLIT"})
        add("layer+neuron int32 zstd(1) (dictionary/RLE)", pa.table({"l": layer, "n": neuron}), compression="zstd")
        add("layer+neuron int32 delta zstd(1)", pa.table({"l": layer, "n": neuron}), compression="zstd",
            use_dictionary=False, column_encoding={"l": "DELTA_BINARY_PACKED", "n": "DELTA_BINARY_PACKED"})
        sums = pa.table({"a": (mean * real_tokens), "p": positive * np.maximum(count, 1)})
        add("two float64 sums zstd(1)", sums, compression="zstd")
        means = pa.table({"a": mean.astype(np.float32), "p": positive.astype(np.float32)})
        for level in (1, 3, 9, 19):
            add(f"two float32 means zstd({level})", means, compression="zstd", compression_level=level)
            add(f"two float32 means byte-split zstd({level})", means, compression="zstd", compression_level=level,
                use_dictionary=False, use_byte_stream_split=True)
        add("two float32 means byte-split brotli", means, compression="brotli", use_dictionary=False,
            use_byte_stream_split=True)
        add("two float32 means byte-split lz4", means, compression="lz4", use_dictionary=False,
            use_byte_stream_split=True)
        file = pa.table({"count": c32, "mean": mean.astype(np.float32), "positive_mean": positive.astype(np.float32)})
        for level in (1, 9, 19):  # the whole file as neuronreg 2.0 writes it (at its zstd level: 9)
            add(f"2.0 file: count delta + two means byte-split, zstd({level})", file,
                compression="zstd", compression_level=level, use_dictionary=False,
                column_encoding={"count": "DELTA_BINARY_PACKED", "mean": "BYTE_STREAM_SPLIT",
                                 "positive_mean": "BYTE_STREAM_SPLIT"})
        add("2.0 file with ONE mean (zstd 9)", pa.table({"count": c32, "mean": mean.astype(np.float32)}),
            compression="zstd", compression_level=9, use_dictionary=False,
            column_encoding={"count": "DELTA_BINARY_PACKED", "mean": "BYTE_STREAM_SPLIT"})
        add("two float16 means byte-split zstd(9) (NOT exact)", pa.table(
            {"a": mean.astype(np.float16), "p": positive.astype(np.float16)}), compression="zstd", compression_level=9,
            use_dictionary=False, use_byte_stream_split=True)
    return out


def write_time(languages: dict) -> dict[int, float]:
    """Seconds per million neurons to write a 2.0 counts file, per zstd level."""
    count, mean, positive, _, _ = next(iter(languages.values()))
    table = pa.table({"count": count.astype(np.int32), "mean": mean.astype(np.float32),
                      "positive_mean": positive.astype(np.float32)})
    out = {}
    for level in (1, 3, 9, 19):
        best = []
        for _ in range(3):
            start = time.perf_counter()
            size(table, compression="zstd", compression_level=level, use_dictionary=False,
                 column_encoding={"count": "DELTA_BINARY_PACKED", "mean": "BYTE_STREAM_SPLIT",
                                  "positive_mean": "BYTE_STREAM_SPLIT"})
            best.append(time.perf_counter() - start)
        out[level] = min(best) / count.size * 1e6
    return out


def read_time(languages: dict) -> dict[str, float]:
    """Seconds per million neurons to read the count column of a file with and without the statistics."""
    out = {}
    count, mean, positive, _, _ = next(iter(languages.values()))
    tables = {
        "count alone": pa.table({"count": count.astype(np.int32)}),
        "count beside two float32 means": pa.table({"count": count.astype(np.int32), "a": mean.astype(np.float32),
                                                    "p": positive.astype(np.float32)}),
    }
    for name, table in tables.items():
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd", compression_level=9, use_dictionary=False,
                       column_encoding={"count": "BYTE_STREAM_SPLIT"})
        data = sink.getvalue()
        best = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(20):
                pq.ParquetFile(pa.BufferReader(data)).read(columns=["count"])
            best.append((time.perf_counter() - start) / 20)
        out[name] = min(best) / count.size * 1e6
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("registry")
    parser.add_argument("model")
    parser.add_argument("--tokens", type=int, default=13_000_000)
    args = parser.parse_args()
    registry = LocalRegistry(args.registry)
    languages = {}
    for lang in registry.counted_languages(args.model):
        stats = registry.read_activation_means(args.model, lang)
        languages[lang] = (stats.over_zero.numpy().reshape(-1), stats.mean.numpy().reshape(-1),
                           stats.positive_mean.numpy().reshape(-1), stats.tokens, stats.record.model.num_layers)
    count, _, _, real_tokens, _ = next(iter(languages.values()))
    print(f"{args.model}: {len(languages)} languages, {count.size:,} neurons, {real_tokens:,} tokens each")
    for label, tokens in ((f"as counted ({real_tokens:,} tokens)", None), (f"at {args.tokens:,} tokens", args.tokens)):
        sizes = column_sizes(languages, tokens)
        print(f"\ncounts {label}: bytes per neuron (median over languages), MiB per language at 8B")
        print(f"| {'column(s), encoding, codec':<52} | {'B/neuron':>8} | {'MiB at 8B':>9} |")
        print(f"|{'-' * 54}|{'-' * 9}:|{'-' * 10}:|")
        for name, values in sizes.items():
            per = statistics.median(values)
            print(f"| {name:<52} | {per:>8.3f} | {per * NEURONS_8B / 2**20:>9.3f} |")
    print("\nwriting a 2.0 file (ms per million neurons, best of 3): " + ", ".join(
        f"zstd({level}) {ms * 1e3:.0f}" for level, ms in write_time(languages).items()))
    print("\nreading the count column alone (ms per million neurons, best of 5):")
    for name, ms in read_time(languages).items():
        print(f"  {name:<34} {ms * 1e3:.1f}")


if __name__ == "__main__":
    main()
