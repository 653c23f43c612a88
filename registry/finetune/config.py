"""Fine-tuning settings: what every method shares (:class:`FinetuneSettings`); a method's own options
(LoRA's rank ...) are a dataclass of that method (:mod:`.method`), given here as ``options``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import FinetuneError

SCHEDULES = ("constant", "linear", "cosine")
MERGE_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("4bit",)


@dataclass
class FinetuneSettings:
    data: str  # a folder with one <language>.txt/.jsonl/.parquet, like compute's corpus
    out: str
    subset: str = "lape"  # the method, by its registered name (neuronreg.finetune.method.method_names())
    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1
    seq_len: int = 512
    tokens: int = 100_000_000  # at most this much training text is read
    lr: float = 1e-4
    weight_decay: float = 0.01
    clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    eval_every: int = 100
    eval_data: str | None = None
    eval_fraction: float = 0.02
    checkpoint_every: int | None = None  # default: eval_every
    seed: int = 0
    # Activations recomputed in the backward pass: "none", "full" (every decoder layer), "mlp" (only the MLP
    # intermediates), or a memory budget in GiB (as a string, e.g. "20") that chooses per layer.
    checkpointing: str = "none"
    # The chunked cross-entropy (True), the plain one (False), or chosen by the size of the logits (None).
    chunked_loss: bool | None = None
    # "4bit": the frozen base's decoder projections stored in NF4 while training (bitsandbytes); the deltas
    # or adapter stay float32 and apply to the full-precision base. None: the base as loaded.
    quantize: str | None = None
    text_field: str | None = None
    merged: bool = False
    # The dtype merged weights (``merged``) or a dense run's trained weights are saved in; None: the model's.
    # float32 keeps every bit of the float32 deltas, adapters and master weights.
    merge_dtype: str | None = None
    # The method's own options (e.g. {"r": 16} for lora), checked by the method; unknown ones are refused.
    options: dict = field(default_factory=dict)

    RESULT_KEYS: ClassVar[tuple[str, ...]] = (
        "subset", "steps", "batch_size", "grad_accum", "seq_len", "tokens", "lr", "weight_decay", "clip",
        "warmup_steps", "schedule", "eval_every", "eval_fraction", "seed", "quantize")

    @property
    def method(self):
        """The registered method this run trains with (FinetuneError for an unknown name)."""
        from .method import get_method

        return get_method(self.subset)

    def method_options(self):
        """The method's options object, checked (defaults filled in)."""
        return self.method.parse_options(self.options)

    @property
    def gradient_checkpointing(self) -> bool:
        return str(self.checkpointing).strip().lower() != "none"

    def result_settings(self) -> dict:
        """What decides the result: a resumed run must have the same values (the method's options too)."""
        values = {k: getattr(self, k) for k in self.RESULT_KEYS}
        values.update(self.method.result_settings(self.method_options()))
        return values

    def check(self) -> None:
        """FinetuneError for any value that cannot train (also NaN and infinities)."""
        method = self.method
        method.parse_options(self.options)
        if self.merge_dtype is not None:
            if self.merge_dtype not in MERGE_DTYPES:
                raise FinetuneError(f"Unknown merge_dtype {self.merge_dtype!r}; use one of {', '.join(MERGE_DTYPES)}.")
            if not self.merged and method.kind != "dense":
                raise FinetuneError(f"merge_dtype applies to merged weights, and subset {self.subset!r} saves none "
                                    "unless merged=True.", fix="merge_dtype",
                                    advice="Pass merged=True, or leave merge_dtype out.")
        if self.schedule not in SCHEDULES:
            raise FinetuneError(f"Unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}.")
        from .checkpointing import parse_checkpointing

        parse_checkpointing(self.checkpointing)
        if self.quantize is not None:
            if self.quantize not in QUANTIZE:
                raise FinetuneError(f"Unknown quantize {self.quantize!r}; use one of {', '.join(QUANTIZE)}.")
            if method.kind == "dense":
                raise FinetuneError(f"Subset {self.subset!r} trains the base's own weights, which a 4-bit base "
                                    "cannot hold.", fix="quantize", advice="Train a delta or an adapter, or leave "
                                                                           "quantize out.")
            if self.merged:
                raise FinetuneError("A 4-bit base cannot be merged into; the run's change applies to the "
                                    "full-precision base.", fix="quantize_merged",
                                    advice="Leave merged out and merge later (load_sparse_model(run, merge=True)).")
        for key in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every", "tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FinetuneError(f"{key} must be a positive integer, got {value!r}.")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise FinetuneError(f"checkpoint_every must be a positive integer, got {self.checkpoint_every!r}.")
        if self.warmup_steps < 0:
            raise FinetuneError(f"warmup_steps must not be negative, got {self.warmup_steps!r}.")
        for key, low, high in (("lr", 0.0, 10.0), ("weight_decay", 0.0, 10.0), ("clip", 0.0, 1e6),
                               ("eval_fraction", 0.0, 1.0)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise FinetuneError(f"{key} must be a finite number, got {value!r}.")
            if value < low or value > high or (key in ("lr", "eval_fraction") and value <= low) \
                    or (key == "eval_fraction" and value >= high):
                raise FinetuneError(f"{key} {value!r} is out of range.")
        # Last, and before any model is loaded: the optional packages these settings train with.
        method.require_packages()
        if self.quantize is not None:
            from .quantize import require_bitsandbytes

            require_bitsandbytes()
