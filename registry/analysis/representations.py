"""Sentence representations per layer: the mean over a sentence's tokens of the residual stream after
each decoder layer.

Exactly what is pooled, and where:

* Layer ``l`` (0-based, as neuronreg numbers layers everywhere: layer ``l``'s MLP holds the neurons of
  layer ``l``) is the output of decoder layer ``l``: the residual stream after it. It is read by a forward
  hook on that decoder layer. For every layer but the last this equals transformers'
  ``hidden_states[l + 1]``; transformers' last entry has the model's final norm applied, and this one
  does not, so every layer is the same kind of quantity. The input of decoder layer 0 (transformers'
  ``hidden_states[0]``: the token embeddings, scaled as the model scales them) is layer ``-1`` when
  ``embeddings=True``.
* Each sentence is tokenized alone, without special tokens (``add_special_tokens=False``), cut to its
  first ``max_tokens`` tokens when that is given. ``prefix_ids`` are fed before it and not pooled: a
  context the model expects at the start of a text. By default (None) the prefix is the tokenizer's
  BOS token, else its EOS token, else nothing; ``[]`` feeds none.
* Sentences go through the model in batches, right-padded, with an attention mask; only the
  sentence's own tokens are averaged (in float32), so a sentence's representation does not depend on
  the batch it is in (up to float rounding of batched matrix products).
* The model runs in eval mode (restored afterwards) under ``torch.inference_mode``; the LM head is not
  run. Models with neuronreg deltas or a PEFT adapter attached are read the same way: the hooks sit on
  the decoder layers, whatever wraps their projections.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CorpusError, SettingsError, UnsupportedArchitecture
from ..layouts import LAYOUTS, SUPPORTED
from ..models import body

EMBEDDINGS = -1  # the layer number of the embedding output (the input of decoder layer 0)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList whose every item holds one MLP of a layout
    neuronreg knows (found by attribute names alone, so projections wrapped by PEFT or by neuronreg's
    deltas do not hide it)."""
    mlps = {id(m) for m in model.modules()
            if any(all(isinstance(getattr(m, a, None), nn.Module) for a in (layout.first, layout.activation,
                                                                          layout.second)) for layout in LAYOUTS)}
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(mlps) and len(module):
            if all(sum(id(m) in mlps for m in layer.modules()) == 1 for layer in module):
                return module
    raise UnsupportedArchitecture(f"{type(model).__name__} has no list of decoder layers holding its MLPs. "
                                  f"Supported: {SUPPORTED}.")




def default_prefix(tokenizer) -> list[int]:
    """The context fed before every sentence when ``prefix_ids`` is None: BOS, else EOS, else nothing."""
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return [value]
    return []


@contextmanager
def layer_outputs(layers: nn.ModuleList, wanted: Sequence[int], store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Inside the block, each forward pass puts the output of decoder layer ``l`` (for ``l`` in
    ``wanted``; ``EMBEDDINGS``: the input of layer 0) into ``store[l]``. The hooks are removed in ``finally``."""
    handles = []

    def output_hook(index: int):
        def hook(module, inputs, output):
            store[index] = output[0] if isinstance(output, tuple) else output
        return hook

    def input_hook(module, args, kwargs):
        store[EMBEDDINGS] = args[0] if args else kwargs["hidden_states"]

    try:
        for index in wanted:
            if index == EMBEDDINGS:
                handles.append(layers[0].register_forward_pre_hook(input_hook, with_kwargs=True))
            else:
                handles.append(layers[index].register_forward_hook(output_hook(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Representations:
    """Mean-pooled sentence representations: ``vectors[i]`` is layer ``layers[i]``'s ``[sentences, hidden]``
    (float32, on CPU); ``tokens[s]`` is how many tokens sentence ``s`` averaged."""

    layers: list[int]
    vectors: torch.Tensor  # [len(layers), sentences, hidden]
    tokens: list[int]
    prefix_ids: list[int]

    def layer(self, layer: int) -> torch.Tensor:
        return self.vectors[self.layers.index(layer)]


def _wanted_layers(count: int, layers: Sequence[int] | None, embeddings: bool) -> list[int]:
    chosen = list(range(count)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in chosen if not 0 <= layer < count]
    if bad:
        raise SettingsError(f"Layer {bad[0]} is not a decoder layer of this model (0..{count - 1}).", fix="layers")
    chosen = sorted(set(chosen))
    return [EMBEDDINGS, *chosen] if embeddings else chosen


def sentence_representations(model: nn.Module, tokenizer, sentences: Sequence[str], *,
                             layers: Sequence[int] | None = None, prefix_ids: Sequence[int] | None = None,
                             batch_size: int = 16, max_tokens: int | None = None, embeddings: bool = False
                             ) -> Representations:
    """Each sentence's mean residual stream after each decoder layer in ``layers`` (default: all), and
    the embeddings as layer -1 when ``embeddings`` (see the module's definitions).

    CorpusError for a sentence with no tokens; SettingsError for a layer the model lacks or a
    ``batch_size`` below 1."""
    if batch_size < 1:
        raise SettingsError(f"batch_size must be at least 1, not {batch_size}.")
    if not sentences:
        raise CorpusError("No sentences to represent.")
    stack = decoder_layers(model)
    wanted = _wanted_layers(len(stack), layers, embeddings)
    prefix = default_prefix(tokenizer) if prefix_ids is None else [int(i) for i in prefix_ids]
    ids = tokenizer(list(sentences), add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = [row[:max_tokens] for row in ids]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise CorpusError(f"Sentence {empty[0]} ({sentences[empty[0]]!r}) has no tokens to pool.")
    pad = tokenizer.pad_token_id if isinstance(getattr(tokenizer, "pad_token_id", None), int) else 0
    device = model.get_input_embeddings().weight.device
    decoder = body(model)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # similar lengths together: little padding
    out: torch.Tensor | None = None
    store: dict[int, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), layer_outputs(stack, wanted, store):
            for start in range(0, len(order), batch_size):
                chosen = order[start:start + batch_size]
                width = len(prefix) + max(len(ids[i]) for i in chosen)
                batch = torch.full((len(chosen), width), pad, dtype=torch.long)
                attention = torch.zeros((len(chosen), width), dtype=torch.long)
                pooled = torch.zeros((len(chosen), width), dtype=torch.float32)  # 1 on the sentence's tokens
                for row, i in enumerate(chosen):
                    full = prefix + list(ids[i])
                    batch[row, :len(full)] = torch.tensor(full)
                    attention[row, :len(full)] = 1
                    pooled[row, len(prefix):len(full)] = 1.0
                store.clear()
                decoder(input_ids=batch.to(device), attention_mask=attention.to(device), use_cache=False)
                for k, layer in enumerate(wanted):
                    states = store[layer].float()
                    keep = pooled.to(states.device)
                    # where, not a product: a padded position's state never enters, even if it is not finite
                    means = torch.where(keep[..., None] > 0, states, 0.0).sum(1) / keep.sum(1, keepdim=True)
                    if out is None:
                        out = torch.empty((len(wanted), len(ids), states.shape[-1]), dtype=torch.float32)
                    out[k, chosen] = means.cpu()
    finally:
        model.train(was_training)
    return Representations(wanted, out, [len(row) for row in ids], prefix)
