"""Benchmark of `neuronreg compute`'s counting pass, and of `select` at Llama-3.1-8B size.

Side by side in one run, on the SmolLM2-135M architecture (real weights with --model FOLDER, e.g.
from scripts/smollm2.py; else random weights of the same config), same packed token rows:

* forward  - a bare ``model(input_ids)`` of the *ForCausalLM (LM head included), inference mode
* hooks    - counting hooks on that full forward (what a straightforward implementation does)
* neuronreg - neuronreg's counting pass (transformer body only, hooks, counts accumulated)

Each measurement runs in a fresh process, modes interleaved, so that peak memory is per mode;
the table reports the median tokens/s, the ratio to the bare forward, and peak working memory
(the process's high-water mark during the timed run minus its resident size before it).
Then `select` over 128 languages for a 32 x 14336 count tensor (random counts).

    python scripts/bench_compute.py                 # random weights
    python scripts/bench_compute.py --model ~/.cache/neuronreg/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = ("forward", "hooks", "neuronreg")


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def worker(args) -> dict:
    from transformers import AutoModelForCausalLM

    from neuronreg.lape.counting import activation_hooks, count_activations
    from neuronreg.models import find_mlp_sites

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    sites = find_mlp_sites(model)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(0, model.config.vocab_size, (args.seq_len,), generator=g)
            for _ in range(args.batch * (args.batches + 1))]
    warm, timed = rows[: args.batch], rows[args.batch:]

    def run(rows_):
        if args.worker == "neuronreg":
            return count_activations(model, sites, rows_, batch_size=args.batch, show=False)
        with torch.inference_mode():
            if args.worker == "hooks":
                with activation_hooks(sites, "cpu"):
                    for i in range(0, len(rows_), args.batch):
                        model(torch.stack(rows_[i : i + args.batch]))
            else:
                for i in range(0, len(rows_), args.batch):
                    model(torch.stack(rows_[i : i + args.batch]))

    run(warm)
    before = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    run(timed)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": len(timed) * args.seq_len / seconds, "peak_mb": (_status("VmHWM") - before) / 2**20}


def select_worker(args) -> dict:
    from neuronreg.lape.selection import SelectionParams, select_neurons

    g = torch.Generator().manual_seed(0)
    layers, inter, langs = 32, 14336, 128
    tokens = torch.randint(10_000_000, 14_000_000, (langs,), generator=g)
    over_zero = (torch.rand(layers, inter, langs, generator=g) * tokens.double()).long()
    before = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    selection = select_neurons(over_zero, tokens, [f"l{k}" for k in range(langs)], SelectionParams(top_rate=0.01))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": (_status("VmHWM") - before) / 2**20, "selected": selection.selected}


def spawn(mode: str, args, model: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--model", model, "--seq-len", str(args.seq_len),
           "--batch", str(args.batch), "--batches", str(args.batches)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved model folder [default: SmolLM2-135M config, random weights]")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-select", action="store_true")
    parser.add_argument("--scaling", action="store_true",
                        help="only the 1 vs 2 process comparison (torchrun, gloo on CPU); needs --model")
    parser.add_argument("--worker", choices=[*MODES, "select"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "select":
        print(json.dumps(select_worker(args)))
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.scaling:
        scaling(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        weights = "real weights" if model else "random weights"
        if not model:
            from transformers import LlamaForCausalLM

            torch.manual_seed(0)
            LlamaForCausalLM(smollm2_config()).save_pretrained(tmp)
            model = tmp
        results = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                results[mode].append(spawn(mode, args, model))
        print(f"Counting pass, SmolLM2-135M architecture ({weights}), CPU x{torch.get_num_threads()} threads, "
              f"rows {args.batch} x {args.seq_len}, {args.batches} timed batches, median of {args.repeats}")
        # Ratios are taken within each repeat (modes run back to back), then the median: drift in
        # the machine's speed between repeats cancels out.
        print(f"{'mode':<12} {'tokens/s':>10} {'vs forward':>11} {'(min-max)':>12} {'peak MB':>9}")
        for mode in MODES:
            tps = statistics.median(r["tokens_per_s"] for r in results[mode])
            ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(results[mode], results["forward"])]
            peak = statistics.median(r["peak_mb"] for r in results[mode])
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            print(f"{mode:<12} {tps:>10.0f} {statistics.median(ratios):>10.2f}x {spread:>12} {peak:>9.0f}")
    if not args.skip_select:
        sel = [spawn("select", args, "-") for _ in range(args.repeats)]
        seconds = statistics.median(r["seconds"] for r in sel)
        print(f"\nselect: 32 x 14336 neurons x 128 languages (random counts), top-rate 0.01: "
              f"{seconds:.2f} s median of {len(sel)} (min {min(r['seconds'] for r in sel):.2f} s), "
              f"peak {statistics.median(r['peak_mb'] for r in sel):.0f} MB, {sel[0]['selected']} neurons selected")


def _corpus(folder: Path) -> Path:
    """English text: NTREX from ../shared when present, else the project's demo texts, repeated."""
    folder.mkdir(parents=True, exist_ok=True)
    ntrex = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "ntrex" / "eng.txt"
    source = ntrex if ntrex.exists() else Path(__file__).resolve().parents[1] / "examples" / "texts" / "en.txt"
    lines = source.read_text(encoding="utf-8").splitlines()
    (folder / "en.txt").write_text("\n".join(lines * max(1, 4000 // len(lines))) + "\n", encoding="utf-8")
    return folder


def _timed_compute(model: str, corpus: Path, registry: Path, procs: int, tokens: int, seq_len: int) -> float:
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // procs)  # the same cores, shared out
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port", str(port),
           "-m", "neuronreg", "compute", model, "en", "--corpus", str(corpus), "--tokens", str(tokens),
           "--seq-len", str(seq_len), "--batch-size", str(4), "--registry", str(registry), "-q", "--force"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def scaling(args) -> None:
    """Counting tokens/s with 1 and 2 processes; start-up and loading are measured and removed."""
    if not args.model:
        raise SystemExit("--scaling needs --model FOLDER (a model with its tokenizer)")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = _corpus(Path(tmp) / "texts")
        big, small = 16 * args.seq_len * 4, args.seq_len * 4
        rates = {}
        for procs in (1, 2):
            runs = []
            for _ in range(args.repeats):
                t_small = _timed_compute(args.model, corpus, Path(tmp) / f"r{procs}", procs, small, args.seq_len)
                t_big = _timed_compute(args.model, corpus, Path(tmp) / f"r{procs}", procs, big, args.seq_len)
                runs.append((big - small) / max(t_big - t_small, 1e-9))
            rates[procs] = statistics.median(runs)
        print(f"Counting with torchrun, gloo on CPU ({os.cpu_count()} cores shared out), {args.model}, "
              f"rows of {args.seq_len}, median of {args.repeats}")
        print(f"{'processes':>9} {'tokens/s':>10} {'vs 1':>6}")
        for procs, rate in rates.items():
            print(f"{procs:>9} {rate:>10.0f} {rate / rates[1]:>5.2f}x")


if __name__ == "__main__":
    main()
