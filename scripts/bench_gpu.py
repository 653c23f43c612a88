"""GPU benchmark: counting throughput and sparse fine-tuning memory and speed, Llama-3.1-8B shape.

    python scripts/bench_gpu.py                      # one H100 / H200: 8B shape, random bf16 weights
    python scripts/bench_gpu.py --small              # the same code paths on CPU, tiny config (smoke test)
    python scripts/bench_gpu.py --json out.json --skip-finetune

No download: the model is built from a config with random weights (what is measured does not depend
on their values). Everything runs in one process on one device, in this order:

Counting (rows of --count-seq tokens, --count-batch rows per batch, inference mode, bf16):
  forward      a bare ``model(input_ids)`` of the *ForCausalLM (LM head included): the baseline
  body         the transformer body alone (no LM head), no hooks
  body+gt0     the body with plain hooks ``counts[l] += (act > 0).sum((0, 1))``
  torch-path   neuronreg's ``count_activations`` with the torch counting path (NEURONREG_FUSED_COUNTING=0)
  fused        neuronreg's ``count_activations`` as it runs by default: the Triton kernel on CUDA, the
               counts and the float64 activation statistics (steering's means) in one read
  fused-counts the same without the statistics (``statistics=False``): what the counts alone cost
Modes are interleaved over --rounds rounds; each round times --count-batches batches with CUDA
events after a warm-up batch; the table gives the median tokens/s, the median ratio to ``forward``
taken within each round, and the peak memory above the weights. The fused and torch-path counts
are compared (they must be identical), and so are their activation sums (to float64 rounding).

Fine-tuning (batch 1, rows of each --seqs length, AdamW lr 1e-4 wd 0.01, clip 1.0, bf16 autocast,
a --rate mask of random neurons over all layers), with and without transformers' gradient
checkpointing:
  neuronreg        row-sparse deltas, the loss as ``finetune`` computes it (chunked linear cross-entropy)
  neuronreg-plain  row-sparse deltas, the plain loss (full-vocabulary logits): the loss's share
  seed             the seed paper's clone-and-splice (slices as Parameters, spliced into a clone of the
                   full matrix every forward), transformers' loss
  masked           gradient masking: full FFN matrices trainable, gradients multiplied by the mask
  full             full fine-tuning
Per configuration: --warmup steps, then --steps timed steps (CUDA events, median); peak memory is
``torch.cuda.max_memory_allocated`` over the configuration, weights and optimizer state included.
An out-of-memory configuration is recorded as "OOM" and the next one runs. Once --budget-s seconds
have passed, the remaining configurations are recorded as "skipped" (the default fits 5 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from baselines import SeedSplice  # noqa: E402  (the scripts folder is on sys.path)

# The issue's figures (one H100, Llama-3.1-8B shape, random bf16 weights): the baseline to beat.
ISSUE_BASELINE = {
    "counting_seq4096": {"forward_tok_s": 31600, "neuronreg_tok_s": 30600, "ratio": 0.97},
    "finetune_seq2048_rate0.01": {
        "neuronreg": {"no_ckpt": {"peak_gib": 27.9, "step_s": 0.184}, "ckpt": {"peak_gib": 19.1, "step_s": 0.288}},
        "seed": {"ckpt": {"peak_gib": 18.8, "step_s": 0.277}},
    },
}
COUNT_MODES = ("forward", "body", "body+gt0", "torch-path", "fused", "fused-counts")
METHODS = ("neuronreg", "neuronreg-plain", "seed", "masked", "full")


def model_config(small: bool):
    from transformers import LlamaConfig

    if small:
        return LlamaConfig(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                           tie_word_embeddings=False)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random weights, made directly on the device in ``dtype`` (no float32 copy of 8B weights)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# -- timing and memory -----------------------------------------------------------------------------------
class Clock:
    """Seconds of device work: CUDA events on a GPU, the wall clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, started) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return started.elapsed_time(end) / 1000
        return time.perf_counter() - started


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return None  # no allocator statistics on CPU: the smoke test checks the code paths, not memory


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


@contextlib.contextmanager
def env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# -- counting ----------------------------------------------------------------------------------------------
def counting(model, args, device: torch.device, clock: Clock) -> dict:
    from neuronreg.lape.counting import count_activations
    from neuronreg.models import body, find_mlp_sites

    sites = find_mlp_sites(model)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (args.count_batch, args.count_seq), generator=g)
               for _ in range(args.count_batches + 1)]
    tokens = args.count_batches * args.count_batch * args.count_seq
    counts: dict[str, object] = {}

    def plain_hooks():
        totals = torch.zeros(len(sites), sites[0].intermediate_size, dtype=torch.int64, device=device)
        handles = [site.activation.register_forward_hook(
            lambda module, inputs, out, layer=site.layer: totals[layer].add_((out > 0).sum((0, 1))))
            for site in sites]
        return handles

    def run(mode: str, rows: list[torch.Tensor]) -> None:
        if mode in ("torch-path", "fused", "fused-counts"):
            flat = [row for batch in rows for row in batch]
            with env("NEURONREG_FUSED_COUNTING", "0" if mode == "torch-path" else "1"):
                counts[mode] = count_activations(model, sites, flat, batch_size=args.count_batch, device=device,
                                                 show=False, statistics=mode != "fused-counts")
            return
        handles = plain_hooks() if mode == "body+gt0" else []
        try:
            with torch.inference_mode():
                forward = model if mode == "forward" else body(model)
                for batch in rows:
                    forward(input_ids=batch.to(device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()

    rounds: dict[str, list[dict]] = {mode: [] for mode in COUNT_MODES}
    for _ in range(args.rounds):
        for mode in COUNT_MODES:
            run(mode, batches[:1])  # warm-up (and the kernel's compilation)
            reset_peak(device)
            base = allocated(device)
            started = clock.start()
            run(mode, batches[1:])
            seconds = clock.seconds(started)
            peak = peak_bytes(device)
            above = None if peak is None else peak - base
            rounds[mode].append({"tok_s": tokens / seconds, "peak_above_weights": above})
    summary = {}
    for mode in COUNT_MODES:
        ratios = [r["tok_s"] / f["tok_s"] for r, f in zip(rounds[mode], rounds["forward"])]
        peaks = [r["peak_above_weights"] for r in rounds[mode] if r["peak_above_weights"] is not None]
        summary[mode] = {"tok_s": statistics.median(r["tok_s"] for r in rounds[mode]),
                         "ratio_to_forward": statistics.median(ratios), "ratio_min": min(ratios),
                         "ratio_max": max(ratios), "peak_above_weights_bytes": max(peaks) if peaks else None}
    from neuronreg.lape.kernels import fused_counting_enabled

    probe = torch.zeros(1, 1, dtype=next(model.parameters()).dtype, device=device)
    fused, torch_path = counts["fused"], counts["torch-path"]
    sums_agree = all(torch.allclose(getattr(fused, name).cpu(), getattr(torch_path, name).cpu(), rtol=1e-9, atol=1e-6)
                     for name in ("activation_sum", "positive_sum"))
    return {"modes": summary, "tokens_per_round": tokens, "rows": f"{args.count_batch} x {args.count_seq}",
            "fused_kernel_used": fused_counting_enabled(probe),
            "fused_equals_torch_path": all(torch.equal(counts[mode].over_zero.cpu(), torch_path.over_zero.cpu())
                                           for mode in ("fused", "fused-counts")),
            "fused_sums_agree": sums_agree}


# -- fine-tuning -------------------------------------------------------------------------------------------
def random_mask(config, rate: float) -> list[torch.Tensor]:
    layers, inter = config.num_hidden_layers, config.intermediate_size
    total = layers * inter
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(1))[: round(total * rate)]
    return [(chosen[chosen // inter == layer] % inter).sort().values for layer in range(layers)]


def prepare(method: str, model, per_layer):
    """Makes ``method``'s weights trainable; returns (parameters, undo)."""
    from neuronreg.finetune.deltas import attach_deltas

    mlps = [layer.mlp for layer in model.model.layers]
    if method.startswith("neuronreg"):
        layers = attach_deltas(model, per_layer)

        def undo():
            for layer in layers:
                for name, wrapper in [*layer.first, layer.second]:
                    setattr(layer.mlp, name, wrapper.base)
        return [p for layer in layers for p in layer.parameters()], undo
    if method == "seed":
        originals = []
        params = []
        for mlp, idx in zip(mlps, per_layer):
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                base = getattr(mlp, name)
                wrapped = SeedSplice(base, idx, dim)
                originals.append((mlp, name, base))
                setattr(mlp, name, wrapped)
                params.append(wrapped.trainable)

        def undo():
            for mlp, name, base in originals:
                setattr(mlp, name, base)
        return params, undo
    if method == "masked":
        handles, params = [], []
        for mlp, idx in zip(mlps, per_layer):
            for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                w = getattr(mlp, name).weight
                keep = torch.zeros(w.shape[dim], dtype=w.dtype, device=w.device)
                keep[idx.to(w.device)] = 1
                keep = keep[:, None] if dim == 0 else keep[None, :]
                w.requires_grad_(True)
                handles.append(w.register_hook(lambda g, keep=keep: g * keep))
                params.append(w)

        def undo():
            for handle in handles:
                handle.remove()
            for p in params:
                p.requires_grad_(False)
        return params, undo
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)

    def undo():
        for p in params:
            p.requires_grad_(False)
    return params, undo


def set_checkpointing(model, on: bool) -> None:
    if on:
        model.config.use_cache = False
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def one_config(model, method: str, seq: int, checkpointing: bool, per_layer, args, device, clock) -> dict:
    from neuronreg.evaluation.heldout import token_nll

    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, model.config.vocab_size, (1, seq), generator=g).to(device)
               for _ in range(args.warmup + args.steps)]
    params, undo, optimizer = [], None, None
    reset_peak(device)
    times = []
    try:
        params, undo = prepare(method, model, per_layer)
        model.train()
        set_checkpointing(model, checkpointing)
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        for i, ids in enumerate(batches):
            started = clock.start()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if method.startswith("neuronreg"):
                    loss, count = token_nll(model, ids, chunked=method == "neuronreg")
                    loss = loss / count
                else:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = clock.seconds(started)
            if i >= args.warmup:
                times.append(seconds)
        peak = peak_bytes(device)
        result = {"status": "ok", "step_s": statistics.median(times), "peak_bytes": peak,
                  "trainable": sum(p.numel() for p in params), "loss": float(loss.detach())}
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        result = {"status": "OOM", "peak_bytes": peak_bytes(device)}
    finally:
        optimizer = None
        for p in model.parameters():
            p.grad = None
        for p in params:
            p.grad = None
        params = []
        with contextlib.suppress(Exception):
            set_checkpointing(model, False)
        if undo is not None:
            undo()
        model.eval()
        reset_peak(device)
    return result


def finetuning(model, args, device, clock, started: float) -> list[dict]:
    per_layer = random_mask(model.config, args.rate)
    rows = []
    for seq in args.seqs:
        for checkpointing in (False, True):
            for method in METHODS:
                row = {"method": method, "seq": seq, "checkpointing": checkpointing}
                if time.perf_counter() - started > args.budget_s:
                    row["status"] = "skipped"
                else:
                    row.update(one_config(model, method, seq, checkpointing, per_layer, args, device, clock))
                rows.append(row)
                print(f"  {method:<16} seq {seq:<5} ckpt {str(checkpointing):<5} {row['status']:<8} "
                      f"{fmt_s(row)} {fmt_gib(row.get('peak_bytes'))}", file=sys.stderr)
    return rows


# -- report ------------------------------------------------------------------------------------------------
def fmt_gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def fmt_s(row) -> str:
    return f"{row['step_s']:.3f} s" if row.get("status") == "ok" else row.get("status", "-")


def report(result: dict) -> None:
    print(f"\n{result['device_name']}, torch {result['torch']}, {result['model']}; "
          f"{'small smoke-test config' if result['small'] else 'random bf16 weights'}")
    if "counting" in result:
        c = result["counting"]
        kernel = "Triton kernel" if c["fused_kernel_used"] else "no CUDA/Triton here: the torch path"
        print(f"\nCounting: rows {c['rows']}, {c['tokens_per_round']:,} tokens per round; fused = {kernel}; "
              f"fused counts == torch-path counts: {c['fused_equals_torch_path']}; "
              f"activation sums agree: {c.get('fused_sums_agree')}")
        print(f"{'mode':<12} {'tokens/s':>10} {'vs forward':>11} {'(min-max)':>12} {'peak above weights':>19}")
        for mode, m in c["modes"].items():
            print(f"{mode:<12} {m['tok_s']:>10.0f} {m['ratio_to_forward']:>10.3f}x "
                  f"{m['ratio_min']:>5.2f}-{m['ratio_max']:<5.2f} {fmt_gib(m['peak_above_weights_bytes']):>19}")
    if "finetune" in result:
        rows = result["finetune"]
        print(f"\nFine-tuning: batch 1, mask {result['rate']:.0%} of the neurons, bf16 autocast, AdamW; "
              "peak = max_memory_allocated (weights included); ratios to neuronreg in the same setting")
        print(f"{'seq':>5} {'ckpt':<5} {'method':<16} {'peak':>11} {'s/step':>8} {'mem ratio':>9} {'time ratio':>10}")
        for row in rows:
            ours = next(r for r in rows if r["method"] == "neuronreg" and r["seq"] == row["seq"]
                        and r["checkpointing"] == row["checkpointing"])
            ratio_mem = ratio_time = "-"
            if row.get("status") == "ok" and ours.get("status") == "ok":
                ratio_time = f"{row['step_s'] / ours['step_s']:.2f}x"
                if row.get("peak_bytes") and ours.get("peak_bytes"):
                    ratio_mem = f"{row['peak_bytes'] / ours['peak_bytes']:.2f}x"
            print(f"{row['seq']:>5} {'yes' if row['checkpointing'] else 'no':<5} {row['method']:<16} "
                  f"{fmt_gib(row.get('peak_bytes')):>11} {fmt_s(row):>8} {ratio_mem:>9} {ratio_time:>10}")
        b = ISSUE_BASELINE["finetune_seq2048_rate0.01"]
        print(f"issue's H100 baseline (seq 2048, 1%): neuronreg {b['neuronreg']['no_ckpt']['peak_gib']} GiB / "
              f"{b['neuronreg']['no_ckpt']['step_s']} s without checkpointing, {b['neuronreg']['ckpt']['peak_gib']} "
              f"GiB / {b['neuronreg']['ckpt']['step_s']} s with; seed {b['seed']['ckpt']['peak_gib']} GiB / "
              f"{b['seed']['ckpt']['step_s']} s with")
    print(f"\n{result['seconds']:.0f} s in all; JSON: {result['json']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny config on CPU (or the GPU if present): smoke test")
    parser.add_argument("--device", default=None, help="[default: cuda when present, else cpu]")
    parser.add_argument("--count-seq", type=int, default=None, help="[default: 4096; --small 128]")
    parser.add_argument("--count-batch", type=int, default=1)
    parser.add_argument("--count-batches", type=int, default=None, help="timed batches per round [8; --small 3]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seqs", default=None, help="fine-tuning row lengths [2048,4096; --small 64,128]")
    parser.add_argument("--rate", type=float, default=0.01, help="share of all neurons in the mask")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="fine-tuning configurations that would start after this many seconds are skipped")
    parser.add_argument("--skip-counting", action="store_true")
    parser.add_argument("--skip-finetune", action="store_true")
    parser.add_argument("--json", default=".cache/bench_gpu.json", help="where to write the results")
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.small:
        raise SystemExit("No CUDA GPU here: the 8B benchmark needs one. Use --small for the CPU smoke test.")
    args.count_seq = args.count_seq or (128 if args.small else 4096)
    args.count_batches = args.count_batches or (3 if args.small else 8)
    args.seqs = [int(s) for s in (args.seqs or ("64,128" if args.small else "2048,4096")).split(",")]
    if device.type == "cpu":
        torch.set_num_threads(1)  # on shared cores, a second thread makes every op wait on the other

    config = model_config(args.small)
    model = build_model(config, device, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    result = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()})",
              "torch": torch.__version__, "small": args.small, "rate": args.rate,
              "model": f"Llama {config.num_hidden_layers} x {config.hidden_size} / {config.intermediate_size}, "
                       f"vocab {config.vocab_size}: {params / 1e9:.2f}B parameters",
              "issue_baseline": ISSUE_BASELINE, "json": args.json, "settings": vars(args).copy()}
    clock = Clock(device)
    print(f"built {result['model']} on {device} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not args.skip_counting:
        result["counting"] = counting(model, args, device, clock)
        print(f"counting done at {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not args.skip_finetune:
        result["finetune"] = finetuning(model, args, device, clock, started)
    result["seconds"] = time.perf_counter() - started
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    report(result)


if __name__ == "__main__":
    main()
