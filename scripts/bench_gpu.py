"""GPU benchmark: counting throughput and sparse fine-tuning memory and speed, Llama-3.1-8B shape.

    python scripts/bench_gpu.py                      # one H100 / H200: 8B shape, random bf16 weights, ~5 min
    python scripts/bench_gpu.py --small              # the same code paths on CPU, tiny config (smoke test)
    python scripts/bench_gpu.py --json out.json --skip-finetune

No download: the model is built from a config with random weights (what is measured does not depend
on their values). Sections, in this order, each measured side by side with the code before issue 24
in the same run; a section that would start after --budget-s seconds is recorded as skipped, and the
JSON is rewritten after every section (a run cut short keeps what it measured):

1. Counting (rows of --count-seq tokens, --count-batch rows per batch, inference mode, bf16):
  forward      a bare ``model(input_ids)`` of the *ForCausalLM (LM head included): the baseline
  body         the transformer body alone (no LM head), no hooks
  body+gt0     the body with plain hooks ``counts[l] += (act > 0).sum((0, 1))``
  torch-path   neuronreg's ``count_activations`` with the torch counting path (NEURONREG_FUSED_COUNTING=0)
  fused        neuronreg's ``count_activations`` as it runs by default: the Triton kernel on CUDA, the
               counts and the activation statistics (steering's sums) in one read, each 32-row tile
               summed in float32 and the tile sums in float64 (issue 24)
  fused-f64    the same kernel summing every element in float64 (the code before issue 24)
  fused-counts the kernel without the statistics (``statistics=False``): what the counts alone cost
Modes are interleaved over --rounds rounds; each round times --count-batches batches with CUDA
events after a warm-up batch; the table gives the median tokens/s, the median ratio to ``forward``
taken within each round, and the peak memory above the weights. Every mode's counts must equal the
torch path's; the fused sums must lie within the kernel's stated bound of the torch path's.

2. Fine-tuning (batch 1, rows of each --seqs length, AdamW lr 1e-4 wd 0.01, clip 1.0, bf16 autocast,
a --rate mask of random neurons over all layers). Methods, each without checkpointing (``no``) and
with transformers' gradient checkpointing of every layer (``hf``: what ``finetune`` did before):
  neuronreg        row-sparse deltas, the loss as ``finetune`` computes it (chunked linear cross-entropy)
  neuronreg-plain  row-sparse deltas, the plain loss (full-vocabulary logits): the loss's share
  seed             the seed paper's clone-and-splice, transformers' loss
  masked           gradient masking: full FFN matrices trainable, gradients multiplied by the mask
  full             full fine-tuning
and neuronreg with ``neuronreg.finetune.checkpointing``: ``full`` (every layer, its own wrappers),
``mlp`` (only the MLPs recomputed) and a budget (``--ckpt-budget-gib`` of activations; by default
--memory-target-gib minus the weights minus --ckpt-margin-gib), whose per-layer plan is printed.
Per configuration: --warmup steps, then --steps timed steps (CUDA events, median); peak memory is
``torch.cuda.max_memory_allocated`` over the configuration, weights and optimizer state included.
An out-of-memory configuration is recorded as "OOM" and the next one runs.

3. A 4-bit base (``neuronreg.finetune.quantize``, bitsandbytes NF4), in a subprocess that builds the
model and quantizes its decoder projections: neuronreg's deltas at the first --seqs length with
``hf`` and ``mlp`` checkpointing and without; peak memory as above (NF4 weights included).

4. Faster counting, the counts checked bit for bit against eager ``fused-counts`` on the same rows:
  graphs       CUDA graphs: the body with neuronreg's hooks captured once for the fixed row shape,
               replayed per batch (``graphs-counts`` without the statistics)
  compile-gt0  every decoder layer under ``torch.compile`` with plain ``(act > 0).sum`` counting
               hooks into per-layer buffers (inductor fuses them into the activation)
  compile      every decoder layer under ``torch.compile`` with neuronreg's hooks (the Triton kernel;
               dynamo splits the graph at it)
Each: one warm-up (capture or compilation, timed apart as ``setup_s``), then --rounds rounds of the
timed batches, each after a bare forward of the same batches for the ratio.

The quality a 4-bit base costs needs real weights, so it is a mode of its own (any device; CPU here):
    python scripts/bench_gpu.py --nf4-quality /tmp/smollm2      # scripts/smollm2.py makes that folder
held-out next-token loss (nats per token) on --quality-tokens tokens of each --quality-langs NTREX-128
file (its last lines; --ntrex folder), float32 weights against the decoder's projections in NF4
(embeddings and LM head kept), and bfloat16 weights for scale.

5. More than one GPU (when ``torch.cuda.device_count() > 1``, or --ddp-world N; CPU: gloo): torchrun
starts --ddp-world processes of this script (``--worker ddp``), each builds the model on its GPU,
counts its share of the section-1 rows (``neuronreg.distributed.Ranks``: row i to rank i % world, the
int64 counts summed), checked equal to one process's counts, and trains deltas under DDP with batch 1
per rank. Scaling efficiency: counting tokens/s / (world x one GPU's ``fused``); fine-tuning one
GPU's step time / the DDP step time (each rank a full batch: ideal 1.0).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from baselines import SeedSplice  # noqa: E402  (the scripts folder is on sys.path)

# What the code before issue 24 measured on one H100 (docs/performance.md, the same shape and script),
# and issue 24's targets.
H100_BEFORE = {
    "counting": {"forward_tok_s": 30603, "fused_tok_s": 29522, "fused_ratio": 0.966, "fused_counts_ratio": 1.019},
    "finetune_seq2048": {"neuronreg_no": (25.30, 0.182), "neuronreg_hf": (16.73, 0.277), "seed_hf": (18.93, 0.275)},
}
TARGETS = {"step_vs_seed_hf": 0.8, "step_peak_gib": 20.0, "statistics_ratio": 1.00, "h100_tok_s": 38000,
           "nf4_peak_gib": 12.0}
COUNT_MODES = ("forward", "body", "body+gt0", "torch-path", "fused", "fused-f64", "fused-counts")
METHODS = ("neuronreg", "neuronreg-plain", "seed", "masked", "full")
NEW_CHECKPOINTING = ("full", "mlp", "budget")  # neuronreg.finetune.checkpointing, for neuronreg only
FAST_MODES = ("graphs-counts", "graphs", "compile-gt0", "compile")
GIB = 2 ** 30


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
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return None  # no allocator statistics on CPU: the smoke test checks the code paths, not memory


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


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


@contextlib.contextmanager
def float32_tiles(on: bool):
    """The counting kernel's statistics in float32 tiles (issue 24) or every element in float64 (before)."""
    from neuronreg.lape import kernels

    old = kernels.FLOAT32_BLOCKS
    kernels.FLOAT32_BLOCKS = on
    try:
        yield
    finally:
        kernels.FLOAT32_BLOCKS = old


class Deadline:
    def __init__(self, started: float, budget_s: float):
        self.started, self.budget_s = started, budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- counting ----------------------------------------------------------------------------------------------
def count_batches(model, args) -> list[torch.Tensor]:
    """The rows every counting measurement uses: a warm-up batch, then the timed ones (the same in every mode)."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, model.config.vocab_size, (args.count_batch, args.count_seq), generator=g)
            for _ in range(args.count_batches + 1)]


def sums_within_bound(fused, torch_path, rows: int) -> tuple[bool, float]:
    """The fused sums against the torch path's: within 2**-19 of the magnitudes summed (the kernel's bound,
    ``sum |x| = 2 * positive sum - sum``) plus a denormal term; and the largest error relative to them."""
    magnitude = (2 * torch_path.positive_sum - torch_path.activation_sum).double()
    worst, ok = 0.0, True
    for name, scale in (("activation_sum", magnitude), ("positive_sum", torch_path.positive_sum.double())):
        error = (getattr(fused, name).double() - getattr(torch_path, name).double()).abs()
        bound = 2.0 ** -19 * scale * (1 + 1e-9) + rows * 2.0 ** -119 + 1e-15 * getattr(torch_path, name).abs()
        ok &= bool(torch.all(error <= bound))
        worst = max(worst, float((error / scale.clamp(min=1e-300)).max()))
    return ok, worst


def counting(model, args, device: torch.device, clock: Clock) -> tuple[dict, dict]:
    from neuronreg.lape.counting import count_activations
    from neuronreg.lape.kernels import fused_counting_enabled
    from neuronreg.models import body, find_mlp_sites

    sites = find_mlp_sites(model)
    batches = count_batches(model, args)
    tokens = args.count_batches * args.count_batch * args.count_seq
    counts: dict[str, object] = {}

    def plain_hooks():
        totals = torch.zeros(len(sites), sites[0].intermediate_size, dtype=torch.int64, device=device)
        return [site.activation.register_forward_hook(
            lambda module, inputs, out, layer=site.layer: totals[layer].add_((out > 0).sum((0, 1))))
            for site in sites]

    def run(mode: str, rows: list[torch.Tensor]) -> None:
        if mode in ("torch-path", "fused", "fused-f64", "fused-counts"):
            flat = [row for batch in rows for row in batch]
            with env("NEURONREG_FUSED_COUNTING", "0" if mode == "torch-path" else "1"), \
                    float32_tiles(mode != "fused-f64"):
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
    probe = torch.zeros(1, 1, dtype=next(model.parameters()).dtype, device=device)
    torch_path = counts["torch-path"]
    within, worst = sums_within_bound(counts["fused"], torch_path, args.count_batch * args.count_seq)
    f64 = counts["fused-f64"]
    result = {"modes": summary, "tokens_per_round": tokens, "rows": f"{args.count_batch} x {args.count_seq}",
              "fused_kernel_used": fused_counting_enabled(probe),
              "fused_equals_torch_path": all(torch.equal(counts[m].over_zero, torch_path.over_zero)
                                             for m in ("fused", "fused-f64", "fused-counts")),
              "fused_sums_within_bound": within, "fused_sums_worst_relative_error": worst,
              "fused_f64_sums_agree": all(torch.allclose(getattr(f64, n), getattr(torch_path, n), rtol=1e-9,
                                                         atol=1e-6) for n in ("activation_sum", "positive_sum"))}
    return result, {"counts": counts["fused-counts"].over_zero, "fused": counts["fused"]}


# -- faster counting: CUDA graphs, torch.compile --------------------------------------------------------------
def graph_counting(model, sites, batches, device, statistics_on: bool):
    """Capture the body with neuronreg's counting hooks once for the batches' fixed shape; returns
    ``count(rows) -> ActivationCounts`` that replays the graph per batch."""
    from neuronreg.lape.counting import ActivationCounts, activation_hooks
    from neuronreg.models import body

    forward = body(model)
    with torch.inference_mode():
        static = batches[0].to(device).clone()
        with activation_hooks(sites, device, statistics=statistics_on) as step:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # the side-stream warm-up CUDA graphs need (and Triton's compilation)
                    forward(input_ids=static, use_cache=False)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                forward(input_ids=static, use_cache=False)
        # The hooks are gone; the graph's kernels still add into step's tensors on every replay.

    def count(rows: list[torch.Tensor]) -> ActivationCounts:
        with torch.inference_mode():
            for tensor in (step.over_zero, step.activation_sum, step.positive_sum):
                if tensor is not None:
                    tensor.zero_()
            for batch in rows:
                static.copy_(batch, non_blocking=True)
                graph.replay()
            result = ActivationCounts(step.over_zero.clone(), sum(b.numel() for b in rows))
            if statistics_on:
                result.activation_sum, result.positive_sum = step.activation_sum.clone(), step.positive_sum.clone()
        return result

    return count


def _gt0_hook(module, inputs, output):
    # One function for every layer, its state a buffer of the module: torch.compile then traces one graph
    # that every layer reuses (a closure per layer would make dynamo recompile for each).
    module.neuronreg_counts += (output > 0).sum((0, 1))


class CompiledLayers:
    """Every decoder layer under ``torch.compile`` (``nn.Module.compile``) while entered; ``eager()`` pauses it,
    so that the baseline forward of a round runs the eager layers."""

    def __init__(self, model):
        self.layers = list(model.model.layers)
        self.compiled: list = []

    def __enter__(self):
        import torch._dynamo as dynamo

        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 64))
        for layer in self.layers:
            layer.compile(dynamic=False)
        self.compiled = [layer._compiled_call_impl for layer in self.layers]
        return self

    @contextlib.contextmanager
    def eager(self):
        for layer in self.layers:
            layer._compiled_call_impl = None
        try:
            yield
        finally:
            for layer, compiled in zip(self.layers, self.compiled):
                layer._compiled_call_impl = compiled

    def __exit__(self, *exc):
        import torch._dynamo as dynamo

        for layer in self.layers:
            layer._compiled_call_impl = None
        dynamo.reset()


def fast_counting(model, args, device, clock, reference: dict, deadline: Deadline) -> dict:
    from neuronreg.lape.counting import count_activations
    from neuronreg.models import body, find_mlp_sites

    sites = find_mlp_sites(model)
    batches = count_batches(model, args)
    tokens = args.count_batches * args.count_batch * args.count_seq
    per_batch = args.count_batch
    results = {}

    def bare_forward(timed: list[torch.Tensor]) -> float:
        with torch.inference_mode():
            started = clock.start()
            for batch in timed:
                model(input_ids=batch.to(device), use_cache=False)
            return tokens / clock.seconds(started)

    for mode in FAST_MODES:
        row: dict = {}
        results[mode] = row
        if mode.startswith("graphs") and device.type != "cuda":
            row["status"] = "needs CUDA"
            continue
        if mode.startswith("compile") and not args.compile:
            row["status"] = "off (--compile)"
            continue
        needed = 120 if mode.startswith("compile") else 20
        if deadline.left() < needed:
            row["status"] = "skipped (time)"
            continue
        stats_on = mode in ("graphs", "compile")
        handles, stack = [], contextlib.ExitStack()
        eager = contextlib.nullcontext
        try:
            started = time.perf_counter()
            if mode.startswith("graphs"):
                count = graph_counting(model, sites, batches, device, stats_on)
            else:
                eager = stack.enter_context(CompiledLayers(model)).eager
                if mode == "compile-gt0":
                    for site in sites:
                        site.activation.register_buffer(
                            "neuronreg_counts", torch.zeros(site.intermediate_size, dtype=torch.int64, device=device),
                            persistent=False)
                        handles.append(site.activation.register_forward_hook(_gt0_hook))

                    def count(timed, forward=body(model)):
                        with torch.inference_mode():
                            for site in sites:
                                site.activation.neuronreg_counts.zero_()
                            for batch in timed:
                                forward(input_ids=batch.to(device), use_cache=False)
                            return torch.stack([site.activation.neuronreg_counts for site in sites]).clone()
                else:
                    def count(timed):
                        return count_activations(model, sites, [r for b in timed for r in b], batch_size=per_batch,
                                                 device=device, show=False, statistics=True)
            count(batches[:1])  # compilation (or the graph's first replay)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            row["setup_s"] = time.perf_counter() - started
            speeds, ratios = [], []
            for _ in range(args.rounds):
                with eager():
                    forward_tok_s = bare_forward(batches[1:])
                started_at = clock.start()
                got = count(batches[1:])
                speed = tokens / clock.seconds(started_at)
                speeds.append(speed)
                ratios.append(speed / forward_tok_s)
            over_zero = got if isinstance(got, torch.Tensor) else got.over_zero
            row.update(status="ok", tok_s=statistics.median(speeds), ratio_to_forward=statistics.median(ratios),
                       ratio_min=min(ratios), ratio_max=max(ratios),
                       counts_equal_eager=bool(torch.equal(over_zero.cpu(), reference["counts"].cpu())))
            if stats_on:
                fused = reference["fused"]
                row["sums_equal_eager"] = all(torch.equal(getattr(got, n).cpu(), getattr(fused, n).cpu())
                                              for n in ("activation_sum", "positive_sum"))
        except Exception as exc:  # an unsupported capture or compilation is a result too, not the end of the run
            first = str(exc).splitlines()[0][:300] if str(exc) else ""
            row.update(status="error", error=f"{type(exc).__name__}: {first}")
        finally:
            for handle in handles:
                handle.remove()
            for site in sites:
                site.activation._buffers.pop("neuronreg_counts", None)
            stack.close()
            reset_peak(device)
        say(f"  {mode:<14} {row.get('status')} {row.get('tok_s', 0):.0f} tok/s {row.get('error', '')}")
    return results


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
    """transformers' gradient checkpointing of every layer, non-reentrant: ``finetune`` before issue 24."""
    if on:
        model.config.use_cache = False
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def ckpt_label(ckpt) -> str:
    return f"{ckpt:.3g}G" if isinstance(ckpt, float) else ckpt


def one_config(model, method: str, seq: int, ckpt, per_layer, args, device, clock, loss_module=None) -> dict:
    """One configuration's step time and peak memory. ``ckpt``: ``no``, ``hf`` (transformers, every layer),
    ``full`` / ``mlp`` (neuronreg.finetune.checkpointing) or a float (an activation budget in GiB)."""
    from neuronreg.evaluation.heldout import token_nll
    from neuronreg.finetune.checkpointing import enable_checkpointing
    from neuronreg.models import find_mlp_sites

    g = torch.Generator().manual_seed(2 + (loss_module.rank if loss_module is not None else 0))
    batches = [torch.randint(0, model.config.vocab_size, (1, seq), generator=g).to(device)
               for _ in range(args.warmup + args.steps)]
    params, undo, optimizer, plan = [], None, None, None
    hf = False
    reset_peak(device)
    times = []
    try:
        params, undo = prepare(method, model, per_layer)
        model.train()
        if ckpt == "hf":
            set_checkpointing(model, True)
            hf = True
        elif ckpt != "no":
            if ckpt == "budget":
                ckpt = activation_budget(model, args, seq)
            plan = enable_checkpointing(model, find_mlp_sites(model), ckpt, batch_size=1, seq_len=seq,
                                        dtype=torch.bfloat16)
        step_module = loss_module.wrap(model) if loss_module is not None else None
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        for i, ids in enumerate(batches):
            started = clock.start()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if step_module is not None:
                    loss = step_module(ids)
                elif method.startswith("neuronreg"):
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
        if plan is not None:
            result.update(plan=plan.describe(), layer_modes="".join(m[0] for m in plan.modes),
                          estimate_bytes=plan.estimate_bytes, checkpointing=ckpt_label(ckpt))
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        result = {"status": "OOM", "peak_bytes": peak_bytes(device)}
    finally:
        optimizer = None
        step_module = None
        for p in model.parameters():
            p.grad = None
        for p in params:
            p.grad = None
        params = []
        if plan is not None:
            plan.undo()
        if hf:
            with contextlib.suppress(Exception):
                set_checkpointing(model, False)
        if undo is not None:
            undo()
        model.eval()
        reset_peak(device)
    return result


def activation_budget(model, args, seq: int) -> float:
    """GiB of activations for the ``budget`` configurations (called with the deltas attached):
    --ckpt-budget-gib, or what --memory-target-gib leaves after the weights and --ckpt-margin-gib (the
    loss, optimizer, workspace); in --small mode, what half the layers full and half none keep (so
    that the plan mixes modes)."""
    from neuronreg.finetune.checkpointing import estimate, layer_shape
    from neuronreg.models import find_mlp_sites

    if args.ckpt_budget_gib is not None:
        return args.ckpt_budget_gib
    if args.small:
        sites = find_mlp_sites(model)
        shape = layer_shape(model, sites, dtype=torch.bfloat16)
        half = len(sites) // 2
        return estimate(shape, ["full"] * half + ["none"] * (len(sites) - half), seq) / GIB
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    return max(0.25, args.memory_target_gib - weights - args.ckpt_margin_gib)


def finetuning(model, args, device, clock, deadline: Deadline) -> list[dict]:
    per_layer = random_mask(model.config, args.rate)
    configs = []
    for seq in args.seqs:
        for ckpt in ("no", "hf"):
            configs += [(method, seq, ckpt) for method in METHODS]
        configs += [("neuronreg", seq, ckpt) for ckpt in NEW_CHECKPOINTING]
    rows = []
    for method, seq, ckpt in configs:
        row = {"method": method, "seq": seq, "checkpointing": ckpt}
        if deadline.left() < 0:
            row["status"] = "skipped"
        else:
            row.update(one_config(model, method, seq, ckpt, per_layer, args, device, clock))
        rows.append(row)
        say(f"  {method:<16} seq {seq:<5} ckpt {row['checkpointing']:<9} {row['status']:<8} {fmt_s(row)} "
            f"{fmt_gib(row.get('peak_bytes'))} {row.get('plan', '')}")
    return rows


# -- workers: the 4-bit base, DDP ----------------------------------------------------------------------
def worker_nf4(args, device, clock) -> dict:
    """Build the model, store its decoder projections in NF4, train deltas at the first sequence length."""
    from neuronreg.finetune.quantize import quantize_frozen_base
    from neuronreg.models import find_mlp_sites

    model = build_model(model_config(args.small), device, torch.bfloat16)
    started = time.perf_counter()
    info = quantize_frozen_base(model, find_mlp_sites(model), compute_dtype=torch.bfloat16)
    reset_peak(device)
    out = {"quantize_s": time.perf_counter() - started, "modules": info.modules, "bytes_before": info.bytes_before,
           "bytes_after": info.bytes_after, "weights_bytes": allocated(device) or None, "rows": []}
    per_layer = random_mask(model.config, args.rate)
    seq = args.seqs[0]
    for ckpt in ("hf", "mlp", "no"):
        row = {"method": "neuronreg-nf4", "seq": seq, "checkpointing": ckpt}
        row.update(one_config(model, "neuronreg", seq, ckpt, per_layer, args, device, clock))
        out["rows"].append(row)
        say(f"  nf4 seq {seq} ckpt {ckpt:<4} {row['status']:<6} {fmt_s(row)} {fmt_gib(row.get('peak_bytes'))}")
    return out


class DDPLoss:
    """Wraps the model in DDP around the loss as ``finetune`` computes it; only the deltas are reduced."""

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        from neuronreg.evaluation.heldout import token_nll

        class Loss(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, ids):
                loss, count = token_nll(self.inner, ids, chunked=True)
                return loss / count

        loss = Loss(model)
        ignored = [n for n, p in loss.named_parameters() if not p.requires_grad] + [n for n, _ in loss.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss, ignored)
        return DistributedDataParallel(loss, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       broadcast_buffers=False, gradient_as_bucket_view=True)


def worker_ddp(args) -> dict | None:
    """One rank under torchrun: counting its share of the section-1 rows, then DDP fine-tuning steps."""
    from neuronreg.distributed import Ranks
    from neuronreg.lape.counting import count_activations
    from neuronreg.models import find_mlp_sites

    ranks = Ranks.from_env("cpu" if args.device == "cpu" else None)
    device = torch.device(ranks.device("cpu" if args.device == "cpu" else "cuda") or "cpu")
    clock = Clock(device)
    try:
        model = build_model(model_config(args.small), device, torch.bfloat16)
        sites = find_mlp_sites(model)
        batches = count_batches(model, args)
        rows = [row for batch in batches[1:] for row in batch]
        count_activations(model, sites, list(ranks.shard(rows))[:1], device=device, show=False)  # warm-up
        ranks.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        mine = count_activations(model, sites, ranks.shard(rows), batch_size=args.count_batch, device=device,
                                 show=False, statistics=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ranks.barrier()
        seconds = time.perf_counter() - started
        over_zero = ranks.sum(mine.over_zero)
        tokens = int(ranks.sum(torch.tensor([mine.tokens]))[0])
        out = {"world": ranks.world, "count_tok_s": tokens / seconds, "count_tokens": tokens}
        if args.reference_counts and ranks.is_main:
            reference = torch.load(args.reference_counts, weights_only=True)
            out["counts_equal_one_process"] = bool(torch.equal(over_zero, reference))
        per_layer = random_mask(model.config, args.rate)
        out["finetune"] = []
        for ckpt in ("hf", "mlp"):
            row = {"method": "neuronreg-ddp", "seq": args.seqs[0], "checkpointing": ckpt}
            row.update(one_config(model, "neuronreg", args.seqs[0], ckpt, per_layer, args, device, clock,
                                  loss_module=DDPLoss(ranks.rank, device)))
            out["finetune"].append(row)
        return out if ranks.is_main else None
    finally:
        ranks.close()


def run_worker(kind: str, args, deadline: Deadline, extra: list[str], world: int = 1) -> dict:
    """Run ``--worker kind`` in a fresh process (or ``world`` under torchrun); its JSON, or why not."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "worker.json"
        common = ["--worker", kind, "--json", str(out), "--seqs", ",".join(map(str, args.seqs)),
                  "--rate", str(args.rate), "--warmup", str(args.warmup), "--steps", str(args.steps),
                  "--count-seq", str(args.count_seq), "--count-batch", str(args.count_batch),
                  "--count-batches", str(args.count_batches), *(["--small"] if args.small else []),
                  *(["--device", args.device] if args.device else []), *extra]
        script = str(Path(__file__).resolve())
        if world > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(world), script, *common]
        else:
            command = [sys.executable, script, *common]
        timeout = max(30.0, deadline.left() + 60)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": f"timed out after {timeout:.0f} s"}
        sys.stderr.write(done.stderr[-4000:])
        if done.returncode != 0 or not out.exists():
            return {"status": "error", "error": done.stderr.strip().splitlines()[-1][:300] if done.stderr else "?"}
        result = json.loads(out.read_text())
        result["status"] = "ok"
        return result


def nf4_quality(args, device) -> dict:
    """Held-out bits per character of a real model in float32, in bfloat16 and with its decoder projections in
    NF4, measured as ``evaluate`` measures them (rows packed and fed as the model expects: after BOS for Gemma)."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuronreg.corpus import CorpusSource
    from neuronreg.evaluation.heldout import heldout_text, score
    from neuronreg.finetune.quantize import quantize_frozen_base
    from neuronreg.models import find_mlp_sites

    tokenizer = AutoTokenizer.from_pretrained(args.nf4_quality)
    texts, scratch = {}, Path(tempfile.mkdtemp(prefix="nf4-quality-"))
    for lang in args.quality_langs.split(","):
        lines = (Path(args.ntrex) / f"{lang}.txt").read_text(encoding="utf-8").splitlines()[-80:]
        (scratch / f"{lang}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        source = CorpusSource("local", str(scratch / f"{lang}.txt"))
        texts[lang] = heldout_text(source, lang, tokenizer, 256, args.quality_tokens)

    def measure(model) -> dict:
        return {lang: score(model, text, batch_size=4, device=device).bits_per_character
                for lang, text in texts.items()}

    result = {"model": args.nf4_quality, "tokens": args.quality_tokens, "metric": "bits_per_character"}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(args.nf4_quality, dtype=dtype).to(device).eval()
        result[name] = measure(model)
        del model
    model = AutoModelForCausalLM.from_pretrained(args.nf4_quality, dtype=torch.float32).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    info = quantize_frozen_base(model, find_mlp_sites(model))
    result["nf4"] = measure(model)
    result["nf4_modules"], result["nf4_bytes"] = info.modules, (info.bytes_before, info.bytes_after)
    print(f"\nHeld-out bits per character (up to {args.quality_tokens} NTREX-128 tokens a language, the last 80 "
          f"lines), {Path(args.nf4_quality).name}; NF4: {info.modules} decoder projections, "
          f"{info.bytes_before / 2**20:.0f} MiB float32 -> {info.bytes_after / 2**20:.0f} MiB")
    print(f"{'language':<9} {'float32':>8} {'bfloat16':>9} {'NF4':>8} {'NF4 - fp32':>11} {'relative':>9}")
    for lang in texts:
        f32, bf16, nf4 = result["float32"][lang], result["bfloat16"][lang], result["nf4"][lang]
        print(f"{lang:<9} {f32:>8.4f} {bf16:>9.4f} {nf4:>8.4f} {nf4 - f32:>+11.4f} {nf4 / f32 - 1:>+8.1%}")
    return result


# -- report ------------------------------------------------------------------------------------------------
def fmt_gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def fmt_s(row) -> str:
    return f"{row['step_s']:.3f} s" if row.get("status") == "ok" else row.get("status", "-")


def find_row(rows, method, seq, ckpt):
    return next((r for r in rows if r["method"] == method and r["seq"] == seq and r["checkpointing"] == ckpt), None)


def report(result: dict) -> None:
    print(f"\n{result['device_name']}, torch {result['torch']}, transformers {result.get('transformers')}, "
          f"Triton {result.get('triton')}, bitsandbytes {result.get('bitsandbytes')}; {result['model']}; "
          f"{'small smoke-test config' if result['small'] else 'random bf16 weights'}")
    if "counting" in result:
        c = result["counting"]
        kernel = "Triton kernel" if c["fused_kernel_used"] else "no CUDA/Triton here: the torch path"
        print(f"\nCounting: rows {c['rows']}, {c['tokens_per_round']:,} tokens per round; fused = {kernel}; "
              f"counts == torch-path counts: {c['fused_equals_torch_path']}; fused sums within the bound: "
              f"{c['fused_sums_within_bound']} (worst {c['fused_sums_worst_relative_error']:.2e} of sum |x|); "
              f"fused-f64 sums agree: {c['fused_f64_sums_agree']}")
        print(f"{'mode':<14} {'tokens/s':>10} {'vs forward':>11} {'(min-max)':>12} {'peak above weights':>19}")
        for mode, m in c["modes"].items():
            print(f"{mode:<14} {m['tok_s']:>10.0f} {m['ratio_to_forward']:>10.3f}x "
                  f"{m['ratio_min']:>5.2f}-{m['ratio_max']:<5.2f} {fmt_gib(m['peak_above_weights_bytes']):>19}")
    if "fast_counting" in result:
        print("\nFaster counting (the same rows; ratio to a bare forward timed in the same round; counts against "
              "eager fused-counts)")
        print(f"{'mode':<14} {'tokens/s':>10} {'vs forward':>11} {'(min-max)':>12} {'setup':>8} {'counts==':>9} "
              f"{'sums==':>7}")
        for mode, m in result["fast_counting"].items():
            if m.get("status") != "ok":
                print(f"{mode:<14} {m.get('status')}: {m.get('error', '')}")
                continue
            print(f"{mode:<14} {m['tok_s']:>10.0f} {m['ratio_to_forward']:>10.3f}x {m['ratio_min']:>5.2f}-"
                  f"{m['ratio_max']:<5.2f} {m['setup_s']:>6.1f} s {str(m['counts_equal_eager']):>9} "
                  f"{str(m.get('sums_equal_eager', '-')):>7}")
    rows = list(result.get("finetune", []))
    nf4 = result.get("nf4", {})
    rows += nf4.get("rows", [])
    if rows:
        print(f"\nFine-tuning: batch 1, mask {result['rate']:.0%} of the neurons, bf16 autocast, AdamW; peak = "
              "max_memory_allocated (weights included); ckpt: no, hf = transformers' every layer (before issue 24), "
              "full / mlp / N.NNG = neuronreg.finetune.checkpointing (N.NN GiB of activations); ratios to neuronreg "
              "in the same setting and to the seed with hf checkpointing at the same length")
        print(f"{'seq':>5} {'ckpt':<9} {'method':<16} {'peak':>11} {'s/step':>8} {'mem ratio':>9} {'time ratio':>10} "
              f"{'vs seed hf':>10}  plan")
        for row in rows:
            ours = find_row(rows, "neuronreg", row["seq"], row["checkpointing"])
            seed = find_row(rows, "seed", row["seq"], "hf")
            ratio_mem = ratio_time = vs_seed = "-"
            if row.get("status") == "ok" and ours and ours.get("status") == "ok":
                ratio_time = f"{row['step_s'] / ours['step_s']:.2f}x"
                if row.get("peak_bytes") and ours.get("peak_bytes"):
                    ratio_mem = f"{row['peak_bytes'] / ours['peak_bytes']:.2f}x"
            if row.get("status") == "ok" and seed and seed.get("status") == "ok":
                vs_seed = f"{row['step_s'] / seed['step_s']:.2f}x"
            plan = row.get("layer_modes", "")
            if row.get("estimate_bytes") is not None:
                plan = f"{plan} (activations est. {row['estimate_bytes'] / GIB:.2f} GiB)"
            print(f"{row['seq']:>5} {row['checkpointing']:<9} {row['method']:<16} "
                  f"{fmt_gib(row.get('peak_bytes')):>11} {fmt_s(row):>8} {ratio_mem:>9} {ratio_time:>10} "
                  f"{vs_seed:>10}  {plan}")
        if nf4:
            print(f"4-bit base: {nf4.get('status')}; {nf4.get('modules', '-')} projections in NF4, "
                  f"{fmt_gib(nf4.get('bytes_before'))} -> {fmt_gib(nf4.get('bytes_after'))}, all weights after: "
                  f"{fmt_gib(nf4.get('weights_bytes'))}, quantized in {nf4.get('quantize_s', 0):.1f} s "
                  f"{nf4.get('error', '')}")
    if "ddp" in result:
        d = result["ddp"]
        print(f"\nMore than one GPU: {d.get('status')} {d.get('error', '')}")
        if d.get("status") == "ok":
            print(f"  counting, {d['world']} processes: {d['count_tok_s']:.0f} tokens/s, efficiency "
                  f"{d.get('count_efficiency', float('nan')):.2f}; counts equal one process's: "
                  f"{d.get('counts_equal_one_process')}")
            for row in d.get("finetune", []):
                print(f"  DDP fine-tuning seq {row['seq']} ckpt {row['checkpointing']}: {fmt_s(row)} per step "
                      f"({d['world']} x 1 rows), {fmt_gib(row.get('peak_bytes'))} on rank 0, efficiency "
                      f"{row.get('efficiency', float('nan')):.2f}")
    targets = result.get("targets")
    if targets:
        print("\nIssue 24's targets (measured here; the H100 targets are for an H100):")
        for line in targets:
            print(f"  {line}")
    print(f"\n{result['seconds']:.0f} s in all; JSON: {result['json']}")


def targets(result: dict) -> list[str]:
    lines = []
    rows = list(result.get("finetune", []))
    seq = rows[0]["seq"] if rows else None
    seed = find_row(rows, "seed", seq, "hf")
    if seed and seed.get("status") == "ok":
        limit = TARGETS["step_peak_gib"] * GIB
        ok = [r for r in rows if r["method"] == "neuronreg" and r["seq"] == seq and r.get("status") == "ok"
              and r["checkpointing"] not in ("no", "hf") and (r.get("peak_bytes") or 0) <= limit]
        best = min(ok, key=lambda r: r["step_s"], default=None)
        if best:
            ratio = best["step_s"] / seed["step_s"]
            lines.append(f"1. selective checkpointing, seq {seq}, <= 20 GiB: best {best['checkpointing']} "
                         f"{best['step_s']:.3f} s at {fmt_gib(best.get('peak_bytes'))} = {ratio:.2f}x the seed's "
                         f"{seed['step_s']:.3f} s (target <= 0.80x): {'met' if ratio <= 0.8 else 'not met'}")
    c = result.get("counting", {}).get("modes")
    if c:
        ratio = c["fused"]["ratio_to_forward"]
        lines.append(f"2. counting with statistics: {ratio:.3f}x a bare forward (float64 sums: "
                     f"{c['fused-f64']['ratio_to_forward']:.3f}x; target >= 1.00x): "
                     f"{'met' if ratio >= 1 else 'not met'}")
        speeds = {"eager fused-counts": c["fused-counts"]["tok_s"]}
        for mode, m in result.get("fast_counting", {}).items():
            if m.get("status") == "ok" and m.get("counts_equal_eager"):
                speeds[mode] = m["tok_s"]
        mode, best = max(speeds.items(), key=lambda kv: kv[1])
        lines.append(f"3. counting throughput: best {mode} {best:.0f} tokens/s with bit-identical counts (H100 target "
                     f">= {TARGETS['h100_tok_s']}: {'met' if best >= TARGETS['h100_tok_s'] else 'not met'} here)")
    nf4 = result.get("nf4", {})
    fits = [r for r in nf4.get("rows", []) if r.get("status") == "ok" and r.get("peak_bytes")]
    if fits:
        best = min(fits, key=lambda r: r["peak_bytes"])
        lines.append(f"4. 4-bit base, seq {best['seq']}: {fmt_gib(best['peak_bytes'])} with ckpt "
                     f"{best['checkpointing']} (target <= 12 GiB): "
                     f"{'met' if best['peak_bytes'] <= TARGETS['nf4_peak_gib'] * GIB else 'not met'}")
    d = result.get("ddp", {})
    if d.get("status") == "ok":
        lines.append(f"5. {d['world']} GPUs: counting efficiency {d.get('count_efficiency', float('nan')):.2f}, DDP "
                     f"fine-tuning " + ", ".join(f"{r['checkpointing']} {r.get('efficiency', float('nan')):.2f}"
                                                 for r in d.get("finetune", [])))
    return lines


def versions() -> dict:
    out = {}
    for name in ("transformers", "triton", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # absent, or an install that cannot be imported here
            out[name] = None
    return out


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
    parser.add_argument("--memory-target-gib", type=float, default=20.0,
                        help="the budget configuration's target peak (issue 24: 20 GiB at seq 2048)")
    parser.add_argument("--ckpt-margin-gib", type=float, default=1.5,
                        help="what the budget leaves for the loss, optimizer and workspace beside the weights")
    parser.add_argument("--ckpt-budget-gib", type=float, default=None, help="the activation budget itself")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="sections and fine-tuning configurations that would start after this are skipped")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="measure torch.compile counting [default: on CUDA only]")
    parser.add_argument("--ddp-world", type=int, default=None,
                        help="processes for section 5 [default: the GPUs when more than one, else off]")
    for section in ("counting", "finetune", "nf4", "fast", "ddp"):
        parser.add_argument(f"--skip-{section}", action="store_true")
    parser.add_argument("--json", default=".cache/bench_gpu.json", help="where to write the results")
    parser.add_argument("--nf4-quality", metavar="FOLDER", help="only the 4-bit base's quality cost on this model")
    parser.add_argument("--quality-langs", default="eng,deu,fra,swa")
    parser.add_argument("--quality-tokens", type=int, default=512)
    parser.add_argument("--ntrex", default=str(Path(__file__).resolve().parents[2] / "shared" / "corpora" / "ntrex"))
    parser.add_argument("--worker", choices=("nf4", "ddp"), help=argparse.SUPPRESS)
    parser.add_argument("--reference-counts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.nf4_quality:
        if device.type == "cpu":
            torch.set_num_threads(1)
        result = nf4_quality(args, device)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return
    if device.type != "cuda" and not args.small:
        raise SystemExit("No CUDA GPU here: the 8B benchmark needs one. Use --small for the CPU smoke test.")
    args.count_seq = args.count_seq or (128 if args.small else 4096)
    args.count_batches = args.count_batches or (3 if args.small else 8)
    args.seqs = [int(s) for s in (args.seqs or ("64,128" if args.small else "2048,4096")).split(",")]
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    if args.ddp_world is None:
        args.ddp_world = torch.cuda.device_count() if device.type == "cuda" and torch.cuda.device_count() > 1 else 0
    if device.type == "cpu":
        torch.set_num_threads(1)  # on shared cores, a second thread makes every op wait on the other
    clock = Clock(device)

    if args.worker == "nf4":
        Path(args.json).write_text(json.dumps(worker_nf4(args, device, clock), default=str))
        return
    if args.worker == "ddp":
        out = worker_ddp(args)
        if out is not None:
            Path(args.json).write_text(json.dumps(out, default=str))
        return

    deadline = Deadline(started, args.budget_s)
    config = model_config(args.small)
    model = build_model(config, device, torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    result = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
              f"CPU ({platform.processor() or platform.machine()}, torch threads: {torch.get_num_threads()})",
              "torch": torch.__version__, **versions(), "small": args.small, "rate": args.rate,
              "model": f"Llama {config.num_hidden_layers} x {config.hidden_size} / {config.intermediate_size}, "
                       f"vocab {config.vocab_size}: {params / 1e9:.2f}B parameters",
              "h100_before": H100_BEFORE, "targets_set": TARGETS, "json": args.json, "settings": vars(args).copy()}

    def save() -> None:
        result["seconds"] = deadline.elapsed()
        result["targets"] = targets(result)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")

    say(f"built {result['model']} on {device} in {deadline.elapsed():.0f} s")
    reference = None
    if not args.skip_counting:
        result["counting"], reference = counting(model, args, device, clock)
        save()
        say(f"counting done at {deadline.elapsed():.0f} s")
    if not args.skip_finetune:
        result["finetune"] = finetuning(model, args, device, clock, deadline)
        save()
        say(f"fine-tuning done at {deadline.elapsed():.0f} s")
    if not args.skip_nf4:
        if versions()["bitsandbytes"] is None:
            result["nf4"] = {"status": "bitsandbytes is not installed"}
        elif deadline.left() < 30:
            result["nf4"] = {"status": "skipped (time)"}
        else:
            result["nf4"] = run_worker("nf4", args, deadline, [])
        save()
        say(f"4-bit base done at {deadline.elapsed():.0f} s")
    if not args.skip_fast and reference is not None:
        result["fast_counting"] = fast_counting(model, args, device, clock, reference, deadline)
        save()
        say(f"faster counting done at {deadline.elapsed():.0f} s")
    if not args.skip_ddp and args.ddp_world > 1:
        with tempfile.TemporaryDirectory() as tmp:
            extra = []
            if reference is not None:
                torch.save(reference["counts"].cpu(), Path(tmp) / "counts.pt")
                extra = ["--reference-counts", str(Path(tmp) / "counts.pt")]
            model = None  # each rank builds its own; GPU 0 is rank 0's
            reset_peak(device)
            if deadline.left() < 60:
                result["ddp"] = {"status": "skipped (time)"}
            else:
                result["ddp"] = run_worker("ddp", args, deadline, extra, world=args.ddp_world)
        d = result["ddp"]
        if d.get("status") == "ok":
            one = result.get("counting", {}).get("modes", {}).get("fused", {}).get("tok_s")
            if one:
                d["count_efficiency"] = d["count_tok_s"] / (d["world"] * one)
            for row in d.get("finetune", []):
                single = find_row(result.get("finetune", []), "neuronreg", row["seq"], row["checkpointing"])
                if single and single.get("status") == "ok" and row.get("status") == "ok":
                    row["efficiency"] = single["step_s"] / row["step_s"]
        save()
    save()
    report(result)


if __name__ == "__main__":
    main()
