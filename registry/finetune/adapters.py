"""The PEFT baselines of the seed paper: LoRA and IA3 on the MLP projections, as standard PEFT adapters.

``lora``: :class:`peft.LoraConfig` (r 32, alpha 64, dropout 0.1 by default) on the MLP projections of
the model's layout (gate, up and down for gated MLPs, the fused gate_up and down for Phi-3, the two
projections of plain MLPs), as the seed paper's baseline trained them. ``ia3``: :class:`peft.IA3Config`
on the same projections, the second projection as IA3's feed-forward module (its input, the
intermediate activations, is scaled; the others' outputs are). Other target modules may be named;
each must match a linear projection of the model (PEFT's rule: a module name equal to the target or
ending in ``.`` + the target).

Adapter weights are float32 whatever the model's dtype (PEFT's ``autocast_adapter_dtype``; checked),
so the optimizer updates float32 weights; the forward pass computes the adapter in float32 and casts
its contribution to the activations' dtype. A run folder holds the adapter as PEFT writes it
(``adapter_config.json``, ``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained(base,
folder)`` loads it without neuronreg.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..errors import FinetuneError
from ..extras import require
from ..files import atomic_folder
from ..hubcalls import first_line
from ..layouts import BY_NAME as LAYOUTS
from ..limits import load_json
from ..models import MLPSite
from ..runs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS_FILE,
    MERGED_DIR,
    AdapterInfo,
    MergeInfo,
)
from .deltas import module_paths
from .merging import MergeTally, cast_model, save_pretrained
from .method import CardText, FinetuneMethod, Trained, register_method


def _is_projection(module: nn.Module) -> bool:
    """A module PEFT's LoRA and IA3 adapt as a linear map: nn.Linear, or transformers' Conv1D (GPT-2)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _relative(path: str) -> str:
    """A module's path below its decoder layer (``model.layers.3.mlp`` -> ``mlp``; OPT's layer itself -> '')."""
    parts = path.split(".")
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[numeric[-1] + 1:]) if numeric else path


def mlp_targets(model: nn.Module, sites: list[MLPSite]) -> tuple[list[str], list[str]]:
    """The MLP projections of the model's layout as PEFT target names (``mlp.gate_proj`` ...), and which of
    them are second projections (IA3's feed-forward modules)."""
    layout = LAYOUTS[sites[0].layout]
    firsts = ["gate_proj", "up_proj"] if layout.name == "gated" else [layout.first]
    prefix = _relative(module_paths(model)[id(sites[0].mlp)])

    def name(attribute: str) -> str:
        return f"{prefix}.{attribute}" if prefix else attribute

    return [name(a) for a in [*firsts, layout.second]], [name(layout.second)]


def _matches(names: list[str], target: str) -> list[str]:
    return [n for n in names if n == target or n.endswith("." + target)]


def resolve_targets(model: nn.Module, sites: list[MLPSite], targets: list[str] | None
                    ) -> tuple[list[str], list[str], bool]:
    """Target modules, feed-forward modules (the targets that are all second projections of MLPs), and
    whether they are Conv1D (PEFT's ``fan_in_fan_out``); FinetuneError for a target the model lacks."""
    default, second = mlp_targets(model, sites)
    if targets is None:
        targets = default
    modules = dict(model.named_modules())
    names = list(modules)
    seconds = {id(getattr(site.mlp, LAYOUTS[site.layout].second)) for site in sites}
    feedforward, conv1d = [], []
    for target in targets:
        found = _matches(names, target)
        if not found:
            raise FinetuneError(f"Unknown target module {target!r}: {type(model).__name__} has no module of that "
                                f"name. Its MLP projections are {', '.join(default)}.", fix="target_modules")
        wrong = [n for n in found if not _is_projection(modules[n])]
        if wrong:
            raise FinetuneError(f"Target module {target!r} names {wrong[0]}, a {type(modules[wrong[0]]).__name__}, "
                                "not a linear projection; LoRA and IA3 adapt linear projections.",
                                fix="target_modules")
        if all(id(modules[n]) in seconds for n in found):
            feedforward.append(target)
        conv1d.extend(not isinstance(modules[n], nn.Linear) for n in found)
    if any(conv1d) and not all(conv1d):
        raise FinetuneError("The target modules mix Conv1D and Linear projections, which one adapter cannot "
                            "adapt together.", fix="target_modules")
    return list(targets), feedforward, all(conv1d)


def require_peft():
    """The ``peft`` module, or MissingExtra saying how to install it."""
    return require("peft", "peft", "LoRA and IA3 adapters need peft")


def attach_adapter(model: nn.Module, method: AdapterMethod, options, sites: list[MLPSite]):
    """Wrap ``model`` (in place: its projections get the adapter's layers) in a trainable PeftModel with
    float32 adapter weights; everything else frozen. Returns the PeftModel and the record."""
    get_peft_model = require_peft().get_peft_model

    targets, feedforward, fan_in_fan_out = resolve_targets(model, sites, options.target_modules)
    config, info = method.peft_config(options, targets, feedforward, fan_in_fan_out)
    try:
        with _quiet_peft():
            wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    except (ValueError, TypeError) as exc:  # PEFT's word for a target it cannot adapt
        raise FinetuneError(f"PEFT cannot put a {method.name} adapter on {', '.join(info.target_modules)}: "
                            f"{first_line(exc)}", fix="target_modules") from exc
    _float32_adapter(wrapped)
    return wrapped, info


@contextmanager
def _quiet_peft():
    """PEFT asks transformers 5 for a renamed attribute, which warns on every call: nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _float32_adapter(wrapped) -> None:
    """The trainable (adapter) weights in float32: the optimizer's master weights."""
    for p in wrapped.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def trainable_weights(wrapped) -> dict[str, nn.Parameter]:
    return {n: p for n, p in wrapped.named_parameters() if p.requires_grad}


def save_adapter(wrapped, folder: Path) -> None:
    """The adapter as PEFT saves it (``adapter_config.json``, ``adapter_model.safetensors``), in ``folder``.

    PEFT writes into a complete temporary folder first (``atomic_folder``); its two files are then
    renamed into ``folder`` (each rename atomic), before the run config that marks a run finished."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / ".adapter-staging"
    with atomic_folder(staging) as tmp:
        wrapped.save_pretrained(str(tmp), safe_serialization=True)
        missing = [name for name in ADAPTER_FILES if not (tmp / name).is_file()]
        if missing:
            raise FinetuneError(f"PEFT wrote no {', '.join(missing)}; the adapter was not saved.")
    try:
        for name in ADAPTER_FILES:
            os.replace(staging / name, folder / name)
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)


def adapter_folder(folder: Path) -> Path:
    """Where a run folder (or a released repo) keeps its adapter: its root, or ``adapter/`` when a merged
    model takes the root."""
    folder = Path(folder)
    for candidate in (folder, folder / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG_FILE).is_file():
            return candidate
    raise FinetuneError(f"{folder} has no {ADAPTER_CONFIG_FILE}; the run did not finish.", fix="run_folder")


def load_adapter(model: nn.Module, folder: Path):
    """``model`` (changed in place) with the run's adapter attached, frozen: a PeftModel."""
    PeftModel = require_peft().PeftModel

    where = adapter_folder(folder)
    check_adapter_files(where)
    try:
        with _quiet_peft():
            wrapped = PeftModel.from_pretrained(model, str(where), is_trainable=False, autocast_adapter_dtype=True)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise FinetuneError(f"The adapter in {where} does not load on this model: "
                            f"{first_line(exc)}") from exc
    _float32_adapter(wrapped)
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped


def check_adapter_files(where: Path) -> None:
    """The adapter's weights must be safetensors (PEFT would unpickle an ``adapter_model.bin``), finite and
    bounded; FinetuneError otherwise."""
    from .validate import check_finite_safetensors

    pickled = [name for name in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
               if (where / name).exists()]
    if pickled:
        raise FinetuneError(f"{where} holds its adapter as {pickled[0]}, a pickle neuronreg does not load (it can run "
                            "code); only adapter_model.safetensors is read.", fix="run_folder")
    weights = where / ADAPTER_WEIGHTS_FILE
    if not weights.is_file():
        raise FinetuneError(f"{where} has no {ADAPTER_WEIGHTS_FILE}; the run did not finish.", fix="run_folder")
    check_finite_safetensors(weights)


def merge_adapter(wrapped, dtype: torch.dtype | None = None) -> tuple[nn.Module, MergeInfo]:
    """Merge the adapter into the base weights and take the adapter layers out: a plain model again.

    Each adapted projection's weight (and bias) is upcast to float32, PEFT merges the adapter into it
    there, and the result is rounded once into ``dtype`` (None: the model's); the tally measures what
    that rounding lost against the float32 merge. The rest of the model is then cast to ``dtype``."""
    require_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = wrapped.get_base_model()
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    dtype = dtype or layers[0].get_base_layer().weight.dtype
    tally = MergeTally(dtype)
    with torch.no_grad():
        for layer in layers:
            base = layer.get_base_layer()
            # Cloned: PEFT may merge in place, and .float() of a float32 weight is that very tensor.
            before = {name: p.data.clone() for name, p in base.named_parameters(recurse=False)}
            for name, p in base.named_parameters(recurse=False):
                p.data = p.data.float()
            layer.merge()
            for name, p in base.named_parameters(recurse=False):
                stored = p.data.to(dtype)
                tally.add(before[name], stored, target=p.data)
                p.data = stored
    plain = wrapped.unload()  # the adapters are merged: take their layers out without merging again
    cast_model(plain, dtype)
    return plain, tally.info()


def public_adapter_config(folder: Path, base_id: str | None, revision: str | None) -> str:
    """The adapter config as published: the base model's Hub id (or nothing) instead of a local path."""
    data = load_json((adapter_folder(folder) / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base_id
    data["revision"] = revision
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# -- the methods --------------------------------------------------------------------------------------
def _targets(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not value or not all(isinstance(t, str) and t.strip() and t == t.strip()
                                                      for t in value):
        raise FinetuneError(f"target_modules must be a non-empty list of module names, got {value!r}.",
                            fix="target_modules")
    return tuple(value)


@dataclass(frozen=True)
class LoraOptions:
    """LoRA's options, the seed paper's values by default; ``target_modules`` None: the MLP projections of
    the model's layout."""

    r: int = 32
    alpha: float = 64.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _targets(self.target_modules))
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise FinetuneError(f"lora_r must be a positive integer, got {self.r!r}.")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) \
                or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise FinetuneError(f"lora_alpha must be a finite positive number, got {self.alpha!r}.")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not math.isfinite(self.dropout) or not 0 <= self.dropout < 1:
            raise FinetuneError(f"lora_dropout must be in [0, 1), got {self.dropout!r}.")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))


@dataclass(frozen=True)
class IA3Options:
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", _targets(self.target_modules))


class _AdapterTrained(Trained):
    def __init__(self, wrapped, info: AdapterInfo):
        self.wrapped = wrapped  # the model itself now holds the adapter layers
        self.info = info
        self._named = trainable_weights(wrapped)

    @property
    def named(self) -> dict:
        return self._named

    def record(self) -> dict:
        return {"adapter": self.info}

    def save(self, out: Path, loaded, config, settings, save_dtype):
        save_adapter(self.wrapped, out)
        if not settings.merged:
            return None
        model, info = merge_adapter(self.wrapped, save_dtype)
        save_pretrained(model, loaded.tokenizer, out / MERGED_DIR)
        return info


class AdapterMethod(FinetuneMethod):
    """A PEFT adapter on the MLP projections (or the modules named), saved as a standard PEFT adapter."""

    kind = "adapter"
    run_files = ADAPTER_FILES
    peft_type: ClassVar[str] = ""  # PEFT's name of the adapter type (adapter_config.json's peft_type)

    def result_settings(self, options) -> dict:
        values = super().result_settings(options)
        values["target_modules"] = None if options.target_modules is None else list(options.target_modules)
        return values

    def peft_config(self, options, targets: list[str], feedforward: list[str], fan_in_fan_out: bool):
        """The PEFT config and the record of it."""
        raise NotImplementedError

    def require_packages(self) -> None:
        require_peft()

    def attach(self, loaded, settings, mask, options) -> Trained:
        return _AdapterTrained(*attach_adapter(loaded.model, self, options, loaded.sites))

    def check_config(self, config, where: str) -> None:
        from ..errors import RecordError

        if config.adapter is None or config.adapter.method != self.name:
            raise RecordError(f"{where}: subset {self.name!r} needs adapter settings of a {self.name} adapter.")

    def apply(self, model, folder: Path, config):
        return load_adapter(model, Path(folder))

    def merge(self, model, folder: Path, config, dtype):
        return merge_adapter(load_adapter(model, Path(folder)), dtype)

    def check_run(self, folder: Path, config) -> None:
        where = adapter_folder(folder)
        check_adapter_files(where)
        try:
            data = json.loads((where / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise FinetuneError(f"{where / ADAPTER_CONFIG_FILE} is not readable JSON; the run is damaged.",
                                fix="run_folder") from exc
        if not isinstance(data, dict) or str(data.get("peft_type", "")).upper() != self.peft_type:
            raise FinetuneError(f"{where / ADAPTER_CONFIG_FILE} is not a {self.peft_type} adapter config; the run is "
                                "damaged.", fix="run_folder")

    def release_files(self, folder: Path, config, staging: Path, merged: bool, *, base_id: str | None = None
                      ) -> dict[str, Path]:
        where = adapter_folder(folder)
        prefix = f"{ADAPTER_DIR}/" if merged else ""
        public = staging / ADAPTER_CONFIG_FILE
        revision = config.base_model.revision if base_id and not (config.base_model.revision or "").startswith(
            "local-") else None
        public.write_text(public_adapter_config(where, base_id, revision), encoding="utf-8")
        return {prefix + ADAPTER_CONFIG_FILE: public, prefix + ADAPTER_WEIGHTS_FILE: where / ADAPTER_WEIGHTS_FILE}

    def card(self, config, merged: bool) -> CardText:
        adapter = config.adapter
        details = ", ".join(adapter.target_modules) + (
            f"; r {adapter.r}, alpha {adapter.alpha:g}, dropout {adapter.dropout:g}" if adapter.r is not None
            else f"; feed-forward {', '.join(adapter.feedforward_modules or [])}") if adapter else ""
        return CardText("adapter", self.trains, library="transformers" if merged else "peft",
                        relation="merge" if merged else "adapter", details=details)

    def updates(self, folder: Path, config, model):
        """Each adapted MLP projection's change: merged into a float32 copy of the base ``model``, minus the
        base (exact for any adapter; LoRA overrides it with its low-rank form)."""
        import copy

        from ..analysis.updates import DenseUpdate, mlp_weights

        tuned, _ = self.merge(copy.deepcopy(model).float(), Path(folder), config, torch.float32)
        return DenseUpdate(mlp_weights(model), mlp_weights(tuned))


@register_method
class LoraMethod(AdapterMethod):
    name = "lora"
    trains = "a LoRA adapter (a baseline)"
    options_class = LoraOptions
    peft_type = "LORA"

    def peft_config(self, options, targets, feedforward, fan_in_fan_out):
        peft = require_peft()

        config = peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                                 target_modules=targets, fan_in_fan_out=fan_in_fan_out, bias="none",
                                 task_type="CAUSAL_LM")
        return config, AdapterInfo(method=self.name, target_modules=targets, r=options.r, alpha=options.alpha,
                                   dropout=options.dropout, fan_in_fan_out=fan_in_fan_out,
                                   peft_version=peft.__version__)

    def updates(self, folder: Path, config, model):
        """``B @ A * alpha / r`` of each adapted MLP projection, from the adapter's files."""
        from safetensors.torch import load_file

        from ..analysis.updates import low_rank_update

        where = adapter_folder(folder)
        check_adapter_files(where)
        settings = json.loads((where / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        return low_rank_update(load_file(str(where / ADAPTER_WEIGHTS_FILE)), settings, model)


@register_method
class IA3Method(AdapterMethod):
    name = "ia3"
    trains = "an IA3 adapter (a baseline)"
    options_class = IA3Options
    peft_type = "IA3"

    def peft_config(self, options, targets, feedforward, fan_in_fan_out):
        peft = require_peft()

        config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward,
                                fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
        return config, AdapterInfo(method=self.name, target_modules=targets, feedforward_modules=feedforward,
                                   fan_in_fan_out=fan_in_fan_out, peft_version=peft.__version__)
