"""Peak memory and time per step of four ways to fine-tune a language's neurons, on the same batches.

    .venv/bin/python scripts/bench_finetune.py                      # hidden 1024, inter 3584, 8 layers
    .venv/bin/python scripts/bench_finetune.py --hidden 512 --intermediate 1792 --layers 4 --steps 3

Modes (each measured in a fresh subprocess; peak RSS is /proc/self/status VmHWM after the model is
built and "5" is written to /proc/self/clear_refs, so it is the peak while training, model included):

  full    every weight trainable, AdamW over all of them
  masked  gate/up/down weights trainable as full matrices, gradients multiplied by the neuron mask
  seed    the seed paper's code: the selected slices are separate Parameters, and every forward
          clones the full matrix and writes the slices in
  sparse  neuronreg: row-sparse deltas [k_l, H] added in the forward (neuronreg.finetune.deltas)

All modes: float32, the same model (seeded), the same random token batches, AdamW lr 1e-4, weight
decay 0.01, clip 1.0. A 5% mask (top_rate 0.05 of all neurons), drawn at random over all layers.
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

from baselines import SeedSplice  # noqa: E402  (the scripts folder is on sys.path)

MODES = ("full", "masked", "seed", "sparse")


def vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 128, max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config)
    total = args.layers * args.intermediate
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(1))[: round(total * args.rate)]
    per_layer = [(chosen[chosen // args.intermediate == layer] % args.intermediate).sort().values
                 for layer in range(args.layers)]
    return model, per_layer


def prepare(mode: str, model, per_layer):
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    if mode == "full":
        return list(model.parameters())
    if mode == "sparse":
        from neuronreg.finetune.deltas import attach_deltas

        layers = attach_deltas(model, per_layer)
        model.neuronreg_layers = layers  # kept for writing the delta file
        return [p for layer in layers for p in layer.parameters()]
    params = []
    for layer, idx in zip(model.model.layers, per_layer):
        mlp = layer.mlp
        if mode == "masked":
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                w = getattr(mlp, name).weight
                keep = torch.zeros(w.shape[dim], dtype=w.dtype)
                keep[idx] = 1
                keep = keep[:, None] if dim == 0 else keep[None, :]
                w.requires_grad_(True)
                w.register_hook(lambda g, keep=keep: g * keep)
                params.append(w)
        else:
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                wrapped = SeedSplice(getattr(mlp, name), idx, dim)
                setattr(mlp, name, wrapped)
                params.append(wrapped.trainable)
    return params


def worker(args) -> dict:
    import neuronreg.finetune.deltas  # noqa: F401  every mode imports the same libraries, so RSS baselines match

    torch.set_num_threads(args.threads)
    model, per_layer = build(args)
    model.train()
    params = prepare(args.mode, model, per_layer)
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
               for _ in range(args.steps + 1)]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    rss_before = vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    times, cpu_times = [], []
    for ids in batches:
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    trainable = sum(p.numel() for p in params)
    moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer.state.values())
    result = {"mode": args.mode, "peak_rss": vm("VmHWM"), "rss_model": rss_before,
              "step_s": statistics.median(times[1:]), "cpu_s": statistics.median(cpu_times[1:]),
              "trainable": trainable, "adam_moments": moments,
              "params": sum(p.numel() for n, p in model.named_parameters() if not n.endswith(("delta", "trainable"))),
              "neurons": int(sum(t.numel() for t in per_layer)), "loss": float(loss)}
    if args.mode == "sparse":  # the release: neuronreg's delta file, as `finetune` writes it
        from safetensors.torch import save_file

        from neuronreg.finetune.deltas import delta_tensors, save_delta

        with tempfile.TemporaryDirectory() as tmp:
            save_delta(model.neuronreg_layers, Path(tmp) / "delta.safetensors")
            result["delta_bytes_fp32"] = os.path.getsize(Path(tmp) / "delta.safetensors")
            tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                       for k, v in delta_tensors(model.neuronreg_layers).items()}
            save_file(tensors, str(Path(tmp) / "delta16.safetensors"))
            result["delta_bytes_bf16"] = os.path.getsize(Path(tmp) / "delta16.safetensors")
    return result


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps (after one warm-up step).")
    parser.add_argument("--rate", type=float, default=0.05, help="Share of all neurons in the mask.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on shared cores, 2 threads made every op wait on the other)")
    parser.add_argument("--rounds", type=int, default=2, help="Measure every mode this many times, interleaved.")
    parser.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return

    results: dict[str, dict] = {}
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k not in ("mode", "json", "rounds")]
    # Rounds interleave the modes, so that load from other processes hits them alike; per mode the
    # fastest round's time and the largest peak are kept.
    for round_ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--mode", mode], check=True,
                                 capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
            new = json.loads(out.stdout.strip().splitlines()[-1])
            if mode not in results:
                results[mode] = {**new, "rounds": []}
            kept = results[mode]
            kept["rounds"].append(new["step_s"])
            kept["step_s"], kept["peak_rss"] = min(kept["rounds"]), max(kept["peak_rss"], new["peak_rss"])
            kept["cpu_s"] = min(kept["cpu_s"], new["cpu_s"])
            print(f"round {round_ + 1} {mode}: {new['step_s']:.2f} s/step", file=sys.stderr)

    r = results
    print(f"Llama-shaped model: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, vocab "
          f"{args.vocab}: {r['full']['params'] / 1e6:.1f}M parameters; mask {r['sparse']['neurons']} neurons "
          f"({args.rate:.0%}); batch {args.batch_size} x {args.seq_len} tokens; float32; {args.threads} threads")
    print(f"{'mode':<8} {'trainable':>12} {'Adam moments':>13} {'peak RSS':>10} {'over model':>11} {'s/step':>7} "
          f"{'CPU s/step':>10}")
    base = r["sparse"]
    for mode in MODES:
        x = r[mode]
        print(f"{mode:<8} {x['trainable']:>12,} {x['adam_moments']:>13,} {gib(x['peak_rss']):>10} "
              f"{gib(x['peak_rss'] - x['rss_model']):>11} {x['step_s']:>7.2f} {x['cpu_s']:>10.2f}")
    print("ratios to sparse (peak RSS / wall time / CPU time per step): " + ", ".join(
        f"{m} {r[m]['peak_rss'] / base['peak_rss']:.2f}x / {r[m]['step_s'] / base['step_s']:.2f}x / "
        f"{r[m]['cpu_s'] / base['cpu_s']:.2f}x" for m in MODES[:3]))
    full_bytes = r["full"]["params"] * 4
    print(f"release: delta {base['delta_bytes_fp32'] / 2**20:.1f} MiB fp32 "
          f"({base['delta_bytes_bf16'] / 2**20:.1f} MiB "
          f"bf16) vs full checkpoint {full_bytes / 2**20:.0f} MiB fp32 (params x 4 bytes): "
          f"{full_bytes / base['delta_bytes_fp32']:.0f}x smaller")

    # Llama-3.1-8B by formula: hidden 4096, intermediate 14336, 32 layers, 8.03B params; 5% mask.
    total, ffn = 8.03e9, 32 * 3 * 4096 * 14336
    neurons = 22_938
    train = neurons * 3 * 4096
    gb = 1e9
    print(f"Llama-3.1-8B, 5% mask ({neurons:,} neurons x 3 x 4096 = {train / 1e6:.1f}M weights, "
          f"{train / total:.2%} of the model), bf16 frozen weights:")
    print(f"  full fine-tuning (mixed precision, 16 B/param):   {16 * total / gb:6.1f} GB")
    print(f"  gradient masking on the FFN (2P + 2P_ffn + 8P_ffn): {(2 * total + 10 * ffn) / gb:6.1f} GB")
    print(f"  row-sparse deltas (2P + 16 P_train, fp32 deltas):  {(2 * total + 16 * train) / gb:6.1f} GB")
    print(f"  release: delta {train * 2 / gb:.2f} GB bf16 ({train * 4 / gb:.2f} GB fp32) vs full checkpoint "
          f"{2 * total / gb:.1f} GB bf16")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
