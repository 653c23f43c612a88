"""What storing trained weights in a lower precision loses: the merge error.

A run trains its change in float32 (row-sparse deltas, PEFT adapters, master copies of dense
weights). Adding that change into bfloat16 base weights rounds every sum to bfloat16's 8 bits of
mantissa: a change smaller than half the spacing of the bfloat16 numbers around its weight vanishes,
and larger ones keep only their leading bits. :class:`MergeTally` measures this while the weights are
written, block by block, and gives a :class:`~neuronreg.runs.MergeInfo`:

* ``lost_share``: the share of the change's nonzero elements whose stored weight still equals the base
  weight (the update rounded away entirely);
* ``relative_error``: ``||(stored - base) - change|| / ||change||`` over every element, in float64.

(:class:`~neuronreg.runs.MergeInfo` is the record; :func:`save_pretrained` writes a merged or dense model.)

Every merge here computes ``base + change`` in float32 and rounds once into the stored dtype, so in
float32 the stored weight is the float32 sum (exact up to that one float32 addition).
"""

from __future__ import annotations

import logging

import torch

from ..files import atomic_folder
from ..runs import MergeInfo

log = logging.getLogger("neuronreg")

_BLOCK = 1 << 22  # elements compared at a time: the float64 copies stay small


class MergeTally:
    """Adds up, block by block, how far stored weights are from base + the change they should hold."""

    def __init__(self, dtype: torch.dtype, operation: str = "merge"):
        self.dtype = dtype
        self.operation = operation
        self.elements = 0
        self.lost = 0
        self.error_sq = 0.0
        self.change_sq = 0.0

    def add(self, base: torch.Tensor, stored: torch.Tensor, *, change: torch.Tensor | None = None,
            target: torch.Tensor | None = None) -> None:
        """``base``: the weights before; ``stored``: after; and either the ``change`` meant (float32) or the
        ``target`` weights meant (float32: base + change as float32 computed it). All of one shape."""
        if (change is None) == (target is None):
            raise ValueError("Give change or target.")
        meant = change if change is not None else target
        flat = [t.detach().reshape(-1) for t in (base, stored, meant)]
        work = torch.float32 if base.device.type == "mps" else torch.float64  # MPS has no float64
        for start in range(0, flat[0].numel(), _BLOCK):
            b, s, m = (t[start:start + _BLOCK].to(work) for t in flat)
            d = m if change is not None else m - b
            nonzero = d != 0
            self.elements += int(nonzero.sum())
            self.lost += int(((s == b) & nonzero).sum())
            self.error_sq += float(((s - b) - d).pow(2).sum())
            self.change_sq += float(d.pow(2).sum())

    def info(self) -> MergeInfo:
        dtype = str(self.dtype).removeprefix("torch.")
        relative = (self.error_sq ** 0.5 / self.change_sq ** 0.5) if self.change_sq else 0.0
        result = MergeInfo(operation=self.operation, dtype=dtype, elements=self.elements, lost=self.lost,
                           lost_share=self.lost / self.elements if self.elements else 0.0,
                           relative_error=relative)
        warn_if_lossy(result)
        return result


def exact(dtype: torch.dtype, operation: str = "save") -> MergeInfo:
    """Float32 weights stored in float32: nothing is rounded."""
    return MergeInfo(operation=operation, dtype=str(dtype).removeprefix("torch."))


def warn_if_lossy(info: MergeInfo) -> None:
    if info.too_lossy:
        what = "Merging into" if info.operation == "merge" else "Saving the trained weights in"
        log.warning("%s %s rounded away %.2f%% of the change's nonzero elements (relative error %.2e): the "
                    "stored weights lose part of the training. Stored in float32 they keep it; the unmerged "
                    "run (base weights plus the float32 change in the forward pass) is exact.",
                    what, info.dtype, 100 * info.lost_share, info.relative_error)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """``model.to(dtype)``, only where some floating weight has another dtype (a model that accelerate
    spread over devices is not touched when there is nothing to cast)."""
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model.to(dtype)


def parse_merge_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype merged weights are stored in: ``name`` (float32, bfloat16, float16) or the model's."""
    return model_dtype if name is None else {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                             "float16": torch.float16}[name]


def save_dtype_of(settings, loaded) -> torch.dtype:
    """The dtype a run stores merged or dense weights in: its ``merge_dtype``, else the model's."""
    from ..models import DTYPES

    return parse_merge_dtype(settings.merge_dtype, DTYPES[loaded.dtype])


def save_pretrained(model, tokenizer, folder) -> None:
    """save_pretrained into a temporary folder that replaces ``folder`` only when complete."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
