"""A fine-tuning run folder: the names of its files, and its config (``neuronreg_delta.json``), a typed,
versioned record like the registry's provenance. Every reader of runs (loading, evaluation, the report,
release) reads them here, typed and migrated; nothing here imports torch.

A run folder holds::

    neuronreg_delta.json        the run config (RunConfig): written last, it marks the run finished
    delta.safetensors           row-sparse deltas (lape, random)
    adapter_config.json, adapter_model.safetensors    a PEFT adapter (lora, ia3)
    model/                      a dense run's trained weights (ffn, full)
    merged/                     the merged model (finetune --merged)
    steps.csv                   one row per optimizer step: training loss, gradient norm, learning rate
    checkpoint.pt               while it runs (removed when it finishes)
    eval/, eval/base/           scores of the run and of its base model (evaluate)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .errors import FinetuneError, RecordError
from .limits import BeyondLimits, load_json
from .provenance import (
    CorpusInfo,
    LanguageInfo,
    MaskSource,
    ModelInfo,
    Record,
    SelectionInfo,
    VersionedRecord,
    now,
    tool_version,
)

RUN_CONFIG_FILE = "neuronreg_delta.json"
DELTA_FILE = "delta.safetensors"
CHECKPOINT_FILE = "checkpoint.pt"
STEPS_FILE = "steps.csv"
FULL_MODEL_DIR = "model"  # dense runs (ffn, full) save their trained weights here
MERGED_DIR = "merged"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # PEFT's file names: PeftModel.from_pretrained reads them
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)
ADAPTER_DIR = "adapter"  # where a released repo keeps the adapter when the merged model takes its root
EVAL_DIR = "eval"  # eval/<task>.json (the run), eval/base/<task>.json (its base model)
BASE_DIR = "base"
HELDOUT_FILE = "heldout.json"  # eval/heldout.json: held-out perplexity per language
# A merge (or a save of float32 master weights) that loses more than this is warned about.
MERGE_LOST_SHARE_LIMIT, MERGE_RELATIVE_ERROR_LIMIT = 0.01, 1e-3


@dataclass(kw_only=True)
class MaskRef(Record):
    """Which mask a run trained: where it came from and how it was selected."""

    model: str
    language: str
    source: MaskSource | None = None  # what the mask is (never where it lay)
    selection: SelectionInfo | None = None
    model_revision: str | None = None  # the revision of the model the mask was computed on
    sha256: str | None = None  # of the neuron set (NeuronMask.sha256): the same neurons, the same hash


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
    # What was recomputed in the backward pass ("none", "full", "mlp" or a budget in GiB); None: a run of
    # a version that recorded only gradient_checkpointing.
    checkpointing: str | None = None
    options: dict = field(default_factory=dict)  # the method's own options that decide the result (LoRA's r ...)
    quantize: str | None = None  # "4bit": the frozen base was stored in NF4 while training


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
class ComposedPart(Record):
    """One run a composed run was made of: its folder's name, what it trained, a content hash of its weight
    file(s), and its own training record."""

    run: str
    subset: str
    language: LanguageInfo
    sha256: str
    trainable_parameters: int
    mask: MaskRef | None = None
    training: TrainingInfo | None = None


@dataclass(kw_only=True)
class CompositionInfo(Record):
    """How a composed run was made (``neuronreg compose``): the rule for a weight several parts change
    (``sum``, ``mean`` or ``first``), the parts in order, and per layer how many neurons more than one part
    trained (row-sparse runs) and how many weights more than one part changed."""

    rule: str
    parts: list[ComposedPart]
    collisions: list[int] | None = None  # per layer: neurons two or more parts trained
    # Weights two or more parts changed; None for LoRA, whose every adapted weight each part changes.
    collided_weights: int | None = 0
    languages: list[LanguageInfo] = field(default_factory=list)


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
    steps_log: str | None = None  # the file of the per-step log (steps.csv); None in runs that kept none
    # A run made by composing others (neuronreg compose): its parts and rule; its language, training and
    # validation are its first part's (every part's are in the composition).
    composition: CompositionInfo | None = None

    def check(self, where: str) -> None:
        if not self.subset or not isinstance(self.subset, str):
            raise RecordError(f"{where}: subset must name a fine-tuning method.")
        if not (math.isfinite(self.trainable_share) and 0 <= self.trainable_share <= 1):
            raise RecordError(f"{where}: trainable_share {self.trainable_share!r} is not a share.")
        if not 0 <= self.trainable_parameters <= (self.base_model.num_parameters or 1 << 62):
            raise RecordError(f"{where}: trainable_parameters {self.trainable_parameters!r} is out of range.")

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

    def languages(self) -> list[LanguageInfo]:
        """The languages the run trained: a composed run's parts', else its one language."""
        return list(self.composition.languages) if self.composition and self.composition.languages \
            else [self.language]

    def public(self) -> dict:
        """The config as published: no local paths."""
        data = self.to_dict()
        data.pop("base_path", None)
        return data

    def to_json(self, public: bool = False) -> str:
        return json.dumps(self.public() if public else self.to_dict(), indent=1, sort_keys=True) + "\n"


def read_run_json(folder: str | Path) -> tuple[Path, object]:
    """A finished run's config file and its JSON as it is (not yet validated)."""
    path = Path(folder) / RUN_CONFIG_FILE
    if not path.is_file():
        raise FinetuneError(f"{folder} holds no {RUN_CONFIG_FILE}, so it is not a finished fine-tuning run.",
                            fix="run_folder")
    try:
        data = load_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        why = exc if isinstance(exc, BeyondLimits) else type(exc).__name__
        raise FinetuneError(f"{path} is not readable JSON ({why}); the run folder is damaged.") from exc
    return path, data


def read_run_config(folder: str | Path) -> RunConfig:
    """A finished run's config, typed, validated and migrated (runs of every neuronreg version read)."""
    path, data = read_run_json(folder)
    return RunConfig.from_dict(data, str(path))


def results_folder(run_folder: str | Path, *, base: bool = False) -> Path:
    """Where a run keeps its scores (``eval/``), and its base model's (``eval/base/``)."""
    folder = Path(run_folder) / EVAL_DIR
    return folder / BASE_DIR if base else folder


def run_labels(folders, reserved: str = "base") -> list[str]:
    """Each run's name in a table: its folder's name, or where two runs share it (``sw/lape-s0`` and
    ``yo/lape-s0``) the fewest trailing path parts that tell them apart; never ``reserved`` (the base
    model's row)."""
    parts = [Path(folder).resolve().parts for folder in folders]
    labels = []
    for mine in parts:
        for k in range(1, len(mine) + 1):
            label = "/".join(mine[-k:])
            if label != reserved and sum(1 for other in parts if "/".join(other[-k:]) == label) == 1:
                break
        labels.append(label)
    return labels
