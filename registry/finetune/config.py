"""Fine-tuning settings, and the run config every run folder holds (``neuronreg_delta.json``), a typed,
versioned record like the registry's provenance."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import FinetuneError, RecordError
from ..provenance import CorpusInfo, LanguageInfo, ModelInfo, Record, SelectionInfo, VersionedRecord, now, tool_version

SUBSETS = ("lape", "random", "ffn", "full")
DENSE = ("ffn", "full")  # subsets that train dense weights and save the whole model
SCHEDULES = ("constant", "linear", "cosine")
CONFIG_FILE = "neuronreg_delta.json"
DELTA_FILE = "delta.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
FULL_MODEL_DIR = "model"  # dense baselines (ffn, full) save their trained weights here
MERGED_DIR = "merged"


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

    RESULT_KEYS: ClassVar[tuple[str, ...]] = (
        "subset", "steps", "batch_size", "grad_accum", "seq_len", "tokens", "lr", "weight_decay", "clip",
        "warmup_steps", "schedule", "eval_every", "eval_fraction", "seed", "gradient_checkpointing")

    def result_settings(self) -> dict:
        """What decides the result: a resumed run must have the same values."""
        return {k: getattr(self, k) for k in self.RESULT_KEYS}

    def check(self) -> None:
        """FinetuneError for any value that cannot train (also NaN and infinities)."""
        if self.subset not in SUBSETS:
            raise FinetuneError(f"Unknown subset {self.subset!r}; use one of {', '.join(SUBSETS)}.")
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

    def check(self, where: str) -> None:
        if self.subset not in SUBSETS:
            raise RecordError(f"{where}: subset {self.subset!r} is not one of {', '.join(SUBSETS)}.")

    @property
    def dense(self) -> bool:
        return self.subset in DENSE

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
    import json

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FinetuneError(f"{folder} holds no {CONFIG_FILE}, so it is not a finished fine-tuning run.",
                            fix="run_folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise FinetuneError(f"{path} is not readable JSON ({type(exc).__name__}); the run folder is damaged.") from exc
    return RunConfig.from_dict(data, str(path))
