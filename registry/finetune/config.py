"""Fine-tuning settings, and the run config every run folder holds (``neuronreg_delta.json``), a typed,
versioned record like the registry's provenance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import FinetuneError, RecordError
from ..evaluation.benchmarks import RUN_CONFIG_FILE, read_run_json
from ..provenance import CorpusInfo, LanguageInfo, ModelInfo, Record, SelectionInfo, VersionedRecord, now, tool_version

SUBSETS = ("lape", "random", "ffn", "full", "lora", "ia3")
DENSE = ("ffn", "full")  # subsets that train dense weights and save the whole model
ADAPTERS = ("lora", "ia3")  # subsets trained as PEFT adapters (saved as a standard PEFT adapter)
SCHEDULES = ("constant", "linear", "cosine")
CONFIG_FILE = RUN_CONFIG_FILE  # neuronreg_delta.json
DELTA_FILE = "delta.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
FULL_MODEL_DIR = "model"  # dense baselines (ffn, full) save their trained weights here
MERGED_DIR = "merged"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's file names: PeftModel.from_pretrained reads them
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
ADAPTER_DIR = "adapter"  # where a released repo keeps the adapter when the merged model takes its root
MERGE_DTYPES = ("float32", "bfloat16", "float16")
# The seed paper's LoRA baseline.
LORA_R, LORA_ALPHA, LORA_DROPOUT = 32, 64.0, 0.1
# A merge (or a save of float32 master weights) that loses more than this is warned about.
MERGE_LOST_SHARE_LIMIT, MERGE_RELATIVE_ERROR_LIMIT = 0.01, 1e-3


@dataclass
class FinetuneSettings:
    data: str  # a folder with one <language>.txt/.jsonl/.parquet, like compute's corpus
    out: str
    subset: str = "lape"
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
    dtype: str | None = None
    device: str | None = None
    gradient_checkpointing: bool = False
    text_field: str | None = None
    merged: bool = False
    # The dtype merged weights (``merged``) or a dense baseline's trained weights are saved in; None: the
    # model's. float32 keeps every bit of the float32 deltas, adapters and master weights.
    merge_dtype: str | None = None
    # PEFT baselines. None: the seed paper's values (r 32, alpha 64, dropout 0.1) for lora; the MLP
    # projections of the model's layout as target modules. Given for another subset, they are refused.
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | None = None

    RESULT_KEYS: ClassVar[tuple[str, ...]] = (
        "subset", "steps", "batch_size", "grad_accum", "seq_len", "tokens", "lr", "weight_decay", "clip",
        "warmup_steps", "schedule", "eval_every", "eval_fraction", "seed", "gradient_checkpointing")

    def lora(self) -> tuple[int, float, float]:
        """r, alpha and dropout, with the seed paper's defaults."""
        return (LORA_R if self.lora_r is None else self.lora_r,
                LORA_ALPHA if self.lora_alpha is None else float(self.lora_alpha),
                LORA_DROPOUT if self.lora_dropout is None else float(self.lora_dropout))

    def result_settings(self) -> dict:
        """What decides the result: a resumed run must have the same values. (The adapter settings only
        for the adapter subsets, so the checkpoints of the other subsets keep their keys.)"""
        values = {k: getattr(self, k) for k in self.RESULT_KEYS}
        if self.subset in ADAPTERS:
            values["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        if self.subset == "lora":
            values["lora_r"], values["lora_alpha"], values["lora_dropout"] = self.lora()
        return values

    def check(self) -> None:
        """FinetuneError for any value that cannot train (also NaN and infinities)."""
        if self.subset not in SUBSETS:
            raise FinetuneError(f"Unknown subset {self.subset!r}; use one of {', '.join(SUBSETS)}.")
        self._check_adapter_settings()
        if self.merge_dtype is not None:
            if self.merge_dtype not in MERGE_DTYPES:
                raise FinetuneError(f"Unknown merge_dtype {self.merge_dtype!r}; use one of {', '.join(MERGE_DTYPES)}.")
            if not self.merged and self.subset not in DENSE:
                raise FinetuneError(f"merge_dtype applies to merged weights, and subset {self.subset!r} saves none "
                                    "unless merged=True.", fix="merge_dtype",
                                    advice="Pass merged=True, or leave merge_dtype out.")
        if self.schedule not in SCHEDULES:
            raise FinetuneError(f"Unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}.")
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

    def _check_adapter_settings(self) -> None:
        given = [k for k in ("lora_r", "lora_alpha", "lora_dropout") if getattr(self, k) is not None]
        if given and self.subset != "lora":
            raise FinetuneError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to subset 'lora' "
                                f"only, not to subset {self.subset!r}.", fix="adapter_options",
                                advice="Pass subset='lora', or leave them out.")
        if self.target_modules is not None:
            if self.subset not in ADAPTERS:
                raise FinetuneError(f"target_modules apply to subsets 'lora' and 'ia3' only, not to subset "
                                    f"{self.subset!r}.", fix="adapter_options",
                                    advice="Pass subset='lora' or 'ia3', or leave them out.")
            if isinstance(self.target_modules, str) or not self.target_modules \
                    or not all(isinstance(t, str) and t.strip() and t == t.strip() for t in self.target_modules):
                raise FinetuneError(f"target_modules must be a non-empty list of module names, got "
                                    f"{self.target_modules!r}.", fix="target_modules")
        r, alpha, dropout = self.lora()
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise FinetuneError(f"lora_r must be a positive integer, got {r!r}.")
        if not math.isfinite(alpha) or alpha <= 0:
            raise FinetuneError(f"lora_alpha must be a finite positive number, got {alpha!r}.")
        if not math.isfinite(dropout) or not 0 <= dropout < 1:
            raise FinetuneError(f"lora_dropout must be in [0, 1), got {dropout!r}.")


@dataclass(kw_only=True)
class MaskRef(Record):
    """Which mask a run trained: where it came from and how it was selected."""

    model: str
    language: str
    source: dict = field(default_factory=dict)
    selection: SelectionInfo | None = None
    model_revision: str | None = None  # the revision of the model the mask was computed on


@dataclass(kw_only=True)
class NeuronCounts(Record):
    total: int
    per_layer: list[int]


@dataclass(kw_only=True)
class TrainingInfo(Record):
    """The settings a run used (those that decide its result), and what it read."""

    subset: str
    steps: int
    batch_size: int
    grad_accum: int
    seq_len: int
    tokens: int
    lr: float
    weight_decay: float
    clip: float
    warmup_steps: int
    schedule: str
    eval_every: int
    eval_fraction: float
    seed: int
    gradient_checkpointing: bool
    dtype: str
    device: str
    data: CorpusInfo
    eval_data: CorpusInfo | None = None
    train_rows: int
    eval_rows: int
    optimizer: str = "AdamW"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    seconds_this_session: float = 0.0
    resumed_from_step: int = 0
    # The dtype the optimizer updated the trainable weights in (float32 master weights whatever the model's
    # dtype); None in runs of neuronreg versions that did not record it.
    master_dtype: str | None = None
    # How the work was spread and the loss computed, which change the float rounding but not what is
    # computed: processes (torchrun ranks, each training on its share of every batch), accelerate's
    # device_map, and the loss as asked for (True: the chunked cross-entropy, False: the plain one, None:
    # chosen by the size of the logits). Runs of versions that did not record them read as the defaults.
    world_size: int = 1
    device_map: str | None = None
    chunked_loss: bool | None = None


@dataclass(kw_only=True)
class AdapterInfo(Record):
    """The PEFT adapter a ``lora`` or ``ia3`` run trained (as its ``adapter_config.json`` says)."""

    method: str  # "lora" or "ia3"
    target_modules: list[str]
    feedforward_modules: list[str] | None = None  # IA3: the modules whose input (not output) is scaled
    r: int | None = None  # LoRA
    alpha: float | None = None
    dropout: float | None = None
    fan_in_fan_out: bool = False  # GPT-2's Conv1D projections
    peft_version: str | None = None


@dataclass(kw_only=True)
class MergeInfo(Record):
    """What storing the trained weights in ``dtype`` lost: a delta or adapter merged into the base weights
    (``operation`` "merge"), or a dense baseline's float32 master weights saved in the model's dtype ("save").

    ``elements``: the trained change's nonzero elements; ``lost``: those whose stored weight still equals
    the base weight (the change rounded away entirely); ``relative_error``: ||(stored - base) - change|| /
    ||change||, over every element (in float64)."""

    operation: str = "merge"
    dtype: str
    elements: int | None = None  # None: nothing was rounded (float32 weights saved in float32)
    lost: int = 0
    lost_share: float = 0.0
    relative_error: float = 0.0

    @property
    def too_lossy(self) -> bool:
        return self.lost_share > MERGE_LOST_SHARE_LIMIT or self.relative_error > MERGE_RELATIVE_ERROR_LIMIT

    def describe(self) -> str:
        what = "Merged into" if self.operation == "merge" else "Saved the float32 trained weights in"
        if self.elements is None:
            return f"{what} {self.dtype}: exact."
        return (f"{what} {self.dtype}: {100 * self.lost_share:.2f}% of the {self.elements:,} nonzero elements of "
                f"the change rounded away, relative error {self.relative_error:.2e}.")


@dataclass(kw_only=True)
class RunConfig(VersionedRecord):
    """``neuronreg_delta.json``: what a fine-tuning run trained, on what, and how it went."""

    KIND: ClassVar[str] = "run"
    format: str = "neuronreg-delta"
    tool_version: str = field(default_factory=tool_version)
    created: str = field(default_factory=now)
    base_model: ModelInfo
    # The base's local folder, for loading it on THIS machine; never published (release drops it).
    base_path: str | None = None
    language: LanguageInfo
    subset: str
    mask: MaskRef | None = None
    neurons: NeuronCounts | None = None
    trainable_parameters: int
    trainable_share: float
    training: TrainingInfo
    best_step: int | None = None
    best_val_loss: float | None = None
    validation_curve: list[dict] = field(default_factory=list)
    adapter: AdapterInfo | None = None  # lora / ia3 runs
    merge: MergeInfo | None = None  # runs that merged (merged=True) or saved dense weights in a lower precision

    def check(self, where: str) -> None:
        if self.subset not in SUBSETS:
            raise RecordError(f"{where}: subset {self.subset!r} is not one of {', '.join(SUBSETS)}.")
        if (self.subset in ADAPTERS) != (self.adapter is not None):
            raise RecordError(f"{where}: subset {self.subset!r} " + ("needs" if self.adapter is None else "has no")
                              + " adapter settings.")

    @property
    def dense(self) -> bool:
        return self.subset in DENSE

    @property
    def is_adapter(self) -> bool:
        return self.subset in ADAPTERS

    @classmethod
    def migrate_unversioned(cls, data: dict) -> dict:
        data = super().migrate_unversioned(data)
        data.pop("version", None)
        base = dict(data.get("base_model") or {})
        data["base_path"] = base.pop("path", None)
        data["base_model"] = base
        if isinstance(data.get("mask"), dict):
            mask = dict(data["mask"])
            mask["model_revision"] = mask.pop("mask_model_revision", None)
            mask.setdefault("language", (data.get("language") or {}).get("code", ""))
            if isinstance(mask.get("selection"), dict):
                selection = dict(mask["selection"])
                if selection.pop("imported", False):
                    selection["method"] = "imported"
                mask["selection"] = selection
            data["mask"] = mask
        return data

    def public(self) -> dict:
        """The config as published: no local paths."""
        data = self.to_dict()
        data.pop("base_path", None)
        return data


def read_run_config(folder: str | Path) -> RunConfig:
    """A finished run's config, typed and validated."""
    path, data = read_run_json(folder)
    return RunConfig.from_dict(data, str(path))
