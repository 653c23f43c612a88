"""Activation checkpointing per decoder layer: keep everything, recompute only the MLP, or recompute the layer.

transformers' gradient checkpointing recomputes every decoder layer in the backward pass: the least
memory (one ``[tokens, hidden]`` input per layer), and a second forward pass of the whole model. Most
of a layer's activations are its MLP's (``gate``, ``up`` and ``act(gate)``, three ``[tokens, I]``
tensors against about ``2.5 x hidden`` for the attention), while most of its recomputation is the MLP
too; :func:`enable_checkpointing` chooses per layer:

* ``none``: the layer keeps what autograd saves;
* ``mlp``: the MLP's ``forward`` runs under non-reentrant :func:`torch.utils.checkpoint.checkpoint`,
  so the layer keeps its attention's activations and the MLP's input and recomputes the MLP;
* ``full``: the whole layer's ``forward`` runs under it (what transformers does for every layer).

``mode`` is one of those for every layer, or a memory budget in GiB for the activations the layers
keep: the plan that fits it with the least recomputation (estimated FLOPs; :func:`plan`, from
:func:`estimate`). Layers that recompute come first, those that keep everything last: the
backward pass frees the last layers' activations before it recomputes any layer.

Recomputation replays the same operations on the same inputs, with the random state of the forward
pass restored (LoRA's dropout draws the same mask), so the gradients are those without checkpointing
bit for bit where the kernels are deterministic (every CPU kernel; tested), and the loss is unchanged.
The wrappers are an instance ``forward`` on the MLP or decoder-layer module (the modules, their
parameters and ``state_dict`` stay as they are); row-sparse deltas (:mod:`.deltas`), PEFT adapters and
dense training all work under them, since each wrapper only runs the module's own ``forward``.

The estimate (:class:`LayerShape`; bytes kept per token and layer, ``p`` bytes per activation element,
``h`` hidden, ``I`` intermediate, ``n_h``/``n_kv`` heads and key-value heads of width ``d``) is what
autograd saves in a Llama decoder layer (RMSNorm, SDPA, gated MLP), term by term; the tests count the
saved tensors with saved-tensor hooks and find exactly these bytes for deltas, LoRA (with and without
dropout) and dense training, in bfloat16 and float32:

* attention half, kept by ``none`` and ``mlp``: two RMSNorms, each a float32 copy of its input and
  its ``rsqrt`` (``2 (4 h + 4)``); SDPA's query, key, value and output and its float32 log-sum-exp
  (``p (2 n_h d + 2 n_kv d) + 4 n_h``); the frozen projections save nothing (their weights need no
  gradient, so autograd keeps no input for them);
* the MLP's input, ``p h``: kept by the checkpoint under ``mlp``, and by the deltas' and dense
  products under ``none``;
* the MLP's intermediates, kept by ``none`` only: ``gate``, ``up`` and ``act(gate)``, ``3 p I`` (a
  plain MLP: the activation's input, ``p I``);
* what the trained weights need. Row-sparse deltas on ``k`` neurons: ``3 p k`` (gate's and up's added
  outputs, down's selected inputs), and per layer, whatever the tokens, the deltas cast to the
  activations' dtype (``3 p k h``; none in float32). LoRA of rank ``r``: per adapted projection of
  input width ``w``, PEFT's copy of its input ``p w`` (``4 w`` more with dropout: its float32 mask on CPU) and A's
  output ``p r``, and per layer the casts of A and B. Dense training: ``3 p h`` in the attention half
  (the norms' normalised inputs, q/k/v's input) and down_proj's input ``p I``;
* ``full`` keeps the layer's input, ``p h``.

A layer that recomputes holds its recomputed activations while its backward runs (a whole layer's
``none`` bytes under ``full``, the MLP's intermediates under ``mlp``); by then the later layers' have
been freed, and :func:`estimate` takes the peak over the backward pass. Not counted: the weights,
gradients and optimizer state, the embeddings' output, the final norm and the loss (the same in every
plan), and the allocator's slack. Other layouts (Gemma's four norms, GPT-2's LayerNorm and GELU, eager
attention's ``[heads, seq, seq]`` probabilities) are estimated as a Llama layer of their sizes; the
real figure differs there.

At the Llama-3.1-8B shape in bfloat16 with a 1% mask (143 neurons a layer), per layer and token:
``full`` 8 KiB, ``mlp`` 60 KiB, ``none`` 145 KiB; at 2,048 tokens the 32 layers keep 0.79 GiB (every
layer ``full``), 3.93 GiB (``mlp``) or 9.17 GiB (``none``). ``mlp`` recomputes 78% of the FLOPs
``full`` recomputes (the MLP is most of a layer), so it saves at most a fifth of the recomputation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FinetuneError, SettingsError
from ..layouts import BY_NAME as LAYOUTS
from ..layouts import GATED
from ..models import MLPSite, hidden_size_of

log = logging.getLogger("neuronreg")

MODES = ("none", "mlp", "full")
TRAINABLE = ("deltas", "lora", "dense")
GIB = 1 << 30


def parse_checkpointing(value: str | float | int) -> str | float:
    """``"none"``, ``"mlp"``, ``"full"``, or a budget in GiB (a positive finite number, given as a number or
    text such as ``"20"``); SettingsError otherwise."""
    if isinstance(value, str) and value.strip().lower() in MODES:
        return value.strip().lower()
    try:
        budget = float(value.strip().lower().removesuffix("gib")) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        budget = math.nan
    if isinstance(value, bool) or not math.isfinite(budget) or budget <= 0:
        raise SettingsError(f"checkpointing must be 'none', 'mlp', 'full' or a memory budget in GiB (a positive "
                            f"number), not {value!r}.", fix="checkpointing")
    return budget


# -- the estimate ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """What the activation estimate of one decoder layer depends on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # of the activations (2 for bf16 autocast or a bf16 model)
    gated: bool = True
    trainable: str = "deltas"  # deltas | lora | dense
    neurons: int = 0  # deltas: the most neurons any layer trains
    lora_rank: int = 0
    lora_dropout: bool = False  # lora with dropout > 0
    lora_firsts: int = 2  # lora: adapted first projections (gate and up)
    lora_second: bool = True  # lora: down_proj adapted

    def kept(self, mode: str) -> int:
        """Bytes per token this layer keeps for the backward pass under ``mode``."""
        p, h = self.dtype_bytes, self.hidden
        if mode == "full":
            return p * h
        attention = 2 * (4 * h + 4) + p * (2 * self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim) \
            + 4 * self.heads
        if self.trainable == "dense":  # the norms' weights need their normalised inputs; q/k/v its input
            attention += 3 * p * h
        if mode == "mlp":  # and the MLP's input, kept by the checkpoint
            return attention + p * h
        if mode != "none":
            raise ValueError(f"unknown checkpointing mode {mode!r}")
        # The MLP's input is kept by the deltas' and dense products; LoRA keeps copies of it instead.
        return attention + p * h * (self.trainable != "lora") + self.intermediates()

    def intermediates(self) -> int:
        """Bytes per token of what the MLP's own operations keep (what ``mlp`` recomputes)."""
        p, h, i = self.dtype_bytes, self.hidden, self.intermediate
        firsts = 2 if self.gated else 1
        inner = (3 if self.gated else 1) * p * i
        if self.trainable == "deltas":  # each first projection's index_add source, the second's selected inputs
            inner += (firsts + 1) * p * self.neurons
        elif self.trainable == "lora":  # a copy of each adapted projection's input (+ dropout's mask), A's output
            extra = 4 if self.lora_dropout else 0
            inner += self.lora_firsts * ((p + extra) * h + p * self.lora_rank)
            inner += self.lora_second * ((p + extra) * i + p * self.lora_rank)
        elif self.trainable == "dense":  # down_proj's input
            inner += p * i
        return inner

    def casts(self) -> int:
        """Bytes per layer, whatever the tokens: the trained float32 weights cast to the activations' dtype
        that the MLP's matrix products keep (none in float32)."""
        p, h, i = self.dtype_bytes, self.hidden, self.intermediate
        if p >= 4:
            return 0
        if self.trainable == "deltas":
            return ((2 if self.gated else 1) + 1) * p * self.neurons * h
        if self.trainable == "lora":
            return p * self.lora_rank * (self.lora_firsts * (h + i) + self.lora_second * (i + h))
        return 0

    def kept_bytes(self, mode: str, tokens: int) -> int:
        return tokens * self.kept(mode) + (self.casts() if mode == "none" else 0)

    def transient_bytes(self, mode: str, tokens: int) -> int:
        """What a recomputing layer holds while its backward runs, beside what it keeps."""
        if mode == "none":
            return 0
        if mode == "mlp":
            return tokens * self.intermediates() + self.casts()
        return self.kept_bytes("none", tokens)

    def flops(self, mode: str, seq_len: int) -> float:
        """Forward FLOPs per token that ``mode`` recomputes (causal attention over ``seq_len``)."""
        h, i, d = self.hidden, self.intermediate, self.head_dim
        mlp = 2 * h * i * (3 if self.gated else 2)
        if mode == "mlp":
            return mlp
        if mode == "none":
            return 0.0
        projections = 2 * h * (self.heads * d + 2 * self.kv_heads * d) + 2 * self.heads * d * h
        return projections + 2 * seq_len * self.heads * d + mlp


def estimate(shape: LayerShape, modes: list[str], tokens: int) -> int:
    """Peak bytes the layers keep for ``tokens`` tokens (batch x sequence) under the per-layer ``modes``.

    The backward pass runs from the last layer to the first and frees each layer's activations when it
    is done, so while layer ``j`` recomputes, layers ``0..j`` keep theirs and ``j`` holds its transient
    too: the peak is the larger of everything kept (when the backward pass starts) and, over the
    recomputing layers, what layers ``0..j`` keep plus ``j``'s transient."""
    kept = [shape.kept_bytes(mode, tokens) for mode in modes]
    peak, prefix = sum(kept), 0
    for mode, size in zip(modes, kept):
        prefix += size
        if mode != "none":
            peak = max(peak, prefix + shape.transient_bytes(mode, tokens))
    return peak


def plan(shape: LayerShape, layers: int, tokens: int, seq_len: int, budget_bytes: float) -> list[str]:
    """Per layer, the modes whose estimate fits ``budget_bytes`` with the fewest recomputed FLOPs (ties: the
    fewest bytes). Layers that recompute everything come first, then those that recompute their MLP,
    then those that keep everything: of all orders, the lowest peak (the tests check it against every
    assignment). Every layer ``full`` (with a warning) when nothing fits."""
    best = None
    for n_full in range(layers + 1):
        for n_mlp in range(layers - n_full + 1):
            modes = ["full"] * n_full + ["mlp"] * n_mlp + ["none"] * (layers - n_full - n_mlp)
            size = estimate(shape, modes, tokens)
            if size > budget_bytes:
                continue
            cost = n_full * shape.flops("full", seq_len) + n_mlp * shape.flops("mlp", seq_len)
            if best is None or (cost, size) < best[:2]:
                best = (cost, size, modes)
    if best is None:
        modes = ["full"] * layers
        log.warning("Even checkpointing every layer keeps about %.2f GiB of activations, more than the budget "
                    "of %.2f GiB; checkpointing every layer.", estimate(shape, modes, tokens) / GIB,
                    budget_bytes / GIB)
        return modes
    return best[2]


def layer_shape(model: nn.Module, sites: list[MLPSite], *, dtype: torch.dtype | None = None,
                trainable: str | None = None) -> LayerShape:
    """The estimate's inputs, read off the model: its config's sizes, the activations' dtype (``dtype``, e.g.
    autocast's; by default the embeddings'), and what is trained (by default found from the model:
    delta wrappers, LoRA layers or trainable base weights)."""
    if trainable is not None and trainable not in TRAINABLE:
        raise SettingsError(f"trainable must be one of {', '.join(TRAINABLE)}, not {trainable!r}.")
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = hidden_size_of(config) or _width(sites[0])
    heads = _first(config, ("num_attention_heads", "n_head", "num_heads")) or 1
    kv_heads = _first(config, ("num_key_value_heads",)) or heads
    head_dim = _first(config, ("head_dim",)) or hidden // heads
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    found, neurons, rank, dropout, firsts, second = _trainable(model, sites)
    return LayerShape(hidden=hidden, intermediate=sites[0].intermediate_size, heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, dtype_bytes=torch.finfo(dtype).bits // 8,
                      gated=sites[0].layout in GATED, trainable=trainable or found, neurons=neurons,
                      lora_rank=rank, lora_dropout=dropout, lora_firsts=firsts, lora_second=second)


def _first(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _width(site: MLPSite) -> int:
    weight = getattr(site.projection, "weight", None)
    return int(weight.shape[-1]) if weight is not None else 0


def _trainable(model: nn.Module, sites: list[MLPSite]) -> tuple[str, int, int, bool, int, bool]:
    """(kind, most delta neurons in a layer, LoRA rank, LoRA dropout > 0, LoRA-adapted first projections,
    down adapted), read off the first layer's MLP (the deltas: every layer's)."""
    from .deltas import RowDelta

    neurons = [m.index.numel() // LAYOUTS[s.layout].rows_per_neuron
               for s in sites for m in s.mlp.modules() if isinstance(m, RowDelta)]
    if neurons:
        return "deltas", max(neurons), 0, False, 0, False
    lora = [(name.split(".")[-1], m) for name, m in sites[0].mlp.named_modules() if hasattr(m, "lora_A")]
    if lora:
        second = LAYOUTS[sites[0].layout].second
        rank = max(int(r) for _, m in lora for r in getattr(m, "r", {}).values()) if lora else 0
        dropout = any(getattr(d, "p", 0.0) > 0 for _, m in lora for d in m.lora_dropout.values())
        return ("lora", 0, rank, dropout, sum(name != second for name, _ in lora),
                any(name == second for name, _ in lora))
    dense = any(p.requires_grad for s in sites for p in s.mlp.parameters())
    return ("dense" if dense else "deltas"), 0, 0, False, 0, False


# -- the wrappers --------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module, sites: list[MLPSite]) -> list[nn.Module]:
    """The decoder layer that holds each site's MLP (OPT's MLP is its decoder layer itself)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(sites):
            if all(any(m is site.mlp for m in layer.modules()) for layer, site in zip(module, sites)):
                return list(module)
    raise FinetuneError(f"{type(model).__name__} keeps its MLPs outside one list of decoder layers; neuronreg "
                        "cannot checkpoint it per layer.")


def _wrap_forward(module: nn.Module) -> Callable[[], None]:
    """Run ``module.forward`` under non-reentrant checkpointing while training with gradients; returns the
    undo. An instance ``forward`` already there (accelerate's device-map hooks) is kept and restored."""
    from torch.utils.checkpoint import checkpoint

    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    forward = module.forward

    def checkpointed(*args, **kwargs):
        if module.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    module.forward = checkpointed

    def undo() -> None:
        if had:
            module.forward = previous
        else:
            del module.forward

    return undo


@dataclass
class Checkpointing:
    """What :func:`enable_checkpointing` did: the mode of every decoder layer, the estimate of what the
    layers keep (None without the batch shape), and how to undo it (:meth:`undo`)."""

    modes: list[str]
    estimate_bytes: int | None = None
    shape: LayerShape | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Put every wrapped module's ``forward`` back (safe to call twice)."""
        while self._undo:
            self._undo.pop()()

    def describe(self) -> str:
        counts = {mode: self.modes.count(mode) for mode in MODES if self.modes.count(mode)}
        text = ", ".join(f"{mode} on {n} layer{'s' * (n != 1)}" for mode, n in counts.items())
        if self.estimate_bytes is not None:
            text += f"; activations kept about {self.estimate_bytes / GIB:.2f} GiB"
        return text


def enable_checkpointing(model: nn.Module, sites: list[MLPSite], mode: str | float, *,
                         batch_size: int | None = None, seq_len: int | None = None,
                         dtype: torch.dtype | None = None, trainable: str | None = None) -> Checkpointing:
    """Checkpoint ``model``'s decoder layers for training: ``mode`` is ``"none"``, ``"mlp"``, ``"full"`` or a
    budget in GiB (a number: the activations the layers keep, see the module docstring), for which
    ``batch_size`` and ``seq_len`` (the largest micro-batch's rows and tokens per row) are needed.
    Returns a :class:`Checkpointing`; ``.undo()`` (or :func:`disable_checkpointing`) takes it off.

    How a training loop calls it:

    * after the trainable weights exist (``attach_deltas``, ``get_peft_model``, or the base weights
      set trainable) and after the model is placed (``.to(device)``, ``device_map``), so that the
      estimate sees what is trained; before or after creating the optimizer (the parameters are not
      touched); before wrapping the model in DDP or after, as long as DDP wraps this same model;
    * instead of transformers' ``gradient_checkpointing_enable``/``activation_checkpointing_enable``,
      never with it (FinetuneError if it is on);
    * the model in ``train()`` mode for the steps: the wrappers checkpoint only while the module is in
      training mode and gradients are enabled, so validation under ``torch.no_grad()``/``eval()``
      runs the plain forward;
    * every forward with ``use_cache=False``: a layer replayed in the backward pass must not write a
      KV cache a second time;
    * ``dtype``: the activations' dtype, i.e. the autocast dtype when training under autocast (the
      embeddings' dtype by default); ``trainable``: ``"deltas"``, ``"lora"`` or ``"dense"`` (found
      from the model by default);
    * ``.undo()`` before saving or merging the model (``merge_deltas``, ``merge_and_unload``), or
      copying it: the wrappers are closures over these modules.
    """
    mode = parse_checkpointing(mode)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        raise FinetuneError("transformers' gradient checkpointing is on for this model; neuronreg's checkpointing "
                            "replaces it.", advice="Call model.gradient_checkpointing_disable() first.")
    layers = decoder_layers(model, sites)
    shape = layer_shape(model, sites, dtype=dtype, trainable=trainable)
    tokens = batch_size * seq_len if batch_size and seq_len else None
    if isinstance(mode, float):
        if tokens is None:
            raise SettingsError("A checkpointing budget needs batch_size and seq_len (the micro-batch's rows and "
                                "tokens per row) to estimate the activations.")
        modes = plan(shape, len(layers), tokens, seq_len, mode * GIB)
    else:
        modes = [mode] * len(layers)
    done = Checkpointing([], shape=shape)
    for layer, site, layer_mode in zip(layers, sites, modes):
        if layer_mode == "mlp" and site.mlp is layer:
            layer_mode = "full"  # OPT: the MLP is the decoder layer itself
        done.modes.append(layer_mode)
        if layer_mode == "full":
            done._undo.append(_wrap_forward(layer))
        elif layer_mode == "mlp":
            done._undo.append(_wrap_forward(site.mlp))
    if tokens is not None:
        done.estimate_bytes = estimate(shape, done.modes, tokens)
    return done


def disable_checkpointing(done: Checkpointing) -> None:
    done.undo()
