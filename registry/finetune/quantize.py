"""A 4-bit frozen base: the decoder's linear projections stored in NF4 under trainable deltas or adapters.

QLoRA's storage (bitsandbytes' NormalFloat4, blocks of 64 weights with one absmax each, the absmaxes
themselves quantized to 8 bits with ``double_quant``) for neuron training: what is trained (row-sparse
deltas, LoRA) stays float32 and is added on top, so only the frozen base loses precision. Quantized:
every ``nn.Linear`` (and GPT-2's ``Conv1D``, transposed) inside the decoder layers whose weight is
frozen: attention's q/k/v/o and the MLP's projections, including those a :class:`~.deltas.RowDelta`,
:class:`~.deltas.ColumnDelta` or PEFT layer wraps. Kept as they are: the embeddings, the LM head (tied
to the embeddings in many models, and the loss's precision), norms and biases.

A delta wrapper calls its base projection and adds ``x @ delta.T``: with an NF4 base, ``base(x)``
is ``x @ dequantize(W).T`` (bitsandbytes dequantizes a block to the compute dtype for each product;
on CPU the result equals the product with the dequantized weight exactly, tested), and gradients
flow to ``x`` through the same dequantized weight, so the deltas get the gradients they would get
on a base whose weights are the dequantized ones. The delta file holds the deltas only, nothing of
how the base was stored, so a delta trained on the NF4 base applies to the full-precision base
(:func:`~.deltas.apply_delta_tensors`): the release is the same file; what the NF4 rounding of the
base cost is measured by evaluating it on the full-precision base (``docs/performance.md``).

Order: quantize after :func:`~.deltas.attach_deltas` (or after ``get_peft_model``), or attach to an
already quantized model (``attach_deltas`` reads the width off ``in_features``). Merging a delta
into a 4-bit weight is not possible: apply the saved delta to the full-precision base to merge.

Memory: NF4 takes 0.5 bytes per weight plus its absmaxes (``4 / 64`` bytes per weight, or about
``1 / 64 + 4 / (64 * 256)`` with ``double_quant``), against 2 for bfloat16: the decoder of
Llama-3.1-8B (6.98B weights) goes from 13.0 GiB to 3.4 GiB; its embeddings and LM head stay 1.96 GiB.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FinetuneError
from ..extras import require
from ..models import MLPSite


@dataclass(frozen=True)
class QuantizedBase:
    """What :func:`quantize_frozen_base` did."""

    modules: int  # linear projections now in 4 bits
    bytes_before: int  # their weights' bytes before
    bytes_after: int  # after: packed 4-bit weights and quantization statistics
    quant_type: str
    blocksize: int
    double_quant: bool


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or MissingExtra saying how to install it."""
    return require("bitsandbytes", "quantize", "A 4-bit base needs bitsandbytes")


@functools.cache
def frozen_linear4bit():
    """bitsandbytes' ``Linear4bit`` with one forward for training and evaluation, on every device.

    ``Linear4bit`` itself repacks its weight for a bfloat16-only CPU kernel the first time it runs in
    eval mode without gradients (then evaluation computes in bfloat16 whatever the compute dtype), and
    its product with a bias is a view that the delta wrappers' in-place additions may not modify. This
    one always computes ``x @ dequantize(W).T`` in the compute dtype (bitsandbytes' ``matmul_4bit``) and
    adds the bias out of place.
    """
    import bitsandbytes as bnb
    from bitsandbytes.nn import modules

    fix_state = getattr(modules, "fix_4bit_weight_quant_state_from_module", lambda module: None)

    class FrozenLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fix_state(self)
            dtype = x.dtype
            out = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight, bias=None,
                                  quant_state=self.weight.quant_state)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            elif out._is_view():
                out = out.clone()
            return out.to(dtype)

    return FrozenLinear4bit


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _frozen_projections(layer: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, projection) for every frozen linear projection inside a decoder layer."""
    import bitsandbytes as bnb

    found = []
    for parent in layer.modules():
        for name, child in parent.named_children():
            if isinstance(child, bnb.nn.Linear4bit):
                continue
            if (isinstance(child, nn.Linear) or _is_conv1d(child)) and not child.weight.requires_grad:
                found.append((parent, name, child))
    return found


def quantize_frozen_base(model: nn.Module, sites: list[MLPSite], *, quant_type: str = "nf4", blocksize: int = 64,
                         double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                         device: torch.device | str | None = None) -> QuantizedBase:
    """Store the frozen linear projections of every decoder layer of ``model`` in 4 bits, in place.

    ``compute_dtype``: the dtype bitsandbytes dequantizes to for each product (by default the weight's
    own dtype: bfloat16 for a bfloat16 model). ``device``: where to quantize and keep the weights (by
    default where each already is); quantizing a model loaded on the CPU straight onto a GPU keeps the
    GPU's memory at the 4-bit size plus one projection.
    """
    bnb = require_bitsandbytes()
    from .checkpointing import decoder_layers

    if quant_type not in ("nf4", "fp4"):
        raise FinetuneError(f"quant_type must be 'nf4' or 'fp4', not {quant_type!r}.")
    modules = before = after = 0
    for layer in decoder_layers(model, sites):
        for parent, name, child in _frozen_projections(layer):
            weight = child.weight.detach()
            if _is_conv1d(child):  # Conv1D keeps [in, out]; Linear4bit wants nn.Linear's [out, in]
                weight = weight.T
            out_features, in_features = weight.shape
            target = torch.device(device) if device is not None else weight.device
            quantized = frozen_linear4bit()(in_features, out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype or weight.dtype,
                                          compress_statistics=double_quant, quant_type=quant_type, device="meta")
            quantized.weight = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=blocksize,
                                                 compress_statistics=double_quant, quant_type=quant_type,
                                                 module=quantized).to(target)
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.detach().to(target), requires_grad=False)
            quantized.train(child.training)
            before += weight.numel() * weight.element_size()
            after += _quantized_bytes(quantized.weight)
            setattr(parent, name, quantized)
            modules += 1
    if modules == 0:
        raise FinetuneError("The model has no frozen linear projection in its decoder layers to quantize.")
    return QuantizedBase(modules, before, after, quant_type, blocksize, double_quant)


def _quantized_bytes(weight) -> int:
    """The packed weight and every tensor of its quantization state (absmaxes, their own statistics)."""
    size = weight.numel() * weight.element_size()
    state = weight.quant_state
    for part in (state, getattr(state, "state2", None)):
        if part is None:
            continue
        for value in (part.absmax, part.code, getattr(part, "offset", None)):
            if isinstance(value, torch.Tensor):
                size += value.numel() * value.element_size()
    return size


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight a 4-bit projection computes with, as a dense ``[out, in]`` tensor in its compute dtype."""
    import bitsandbytes.functional as F

    weight = F.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return weight.to(module.compute_dtype or weight.dtype)
