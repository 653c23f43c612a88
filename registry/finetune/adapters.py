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
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import FinetuneError
from ..files import atomic_folder
from ..layouts import BY_NAME as LAYOUTS
from ..limits import load_json
from ..models import MLPSite
from .config import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    ADAPTER_FILES,
    ADAPTER_WEIGHTS_FILE,
    AdapterInfo,
    FinetuneSettings,
    MergeInfo,
)
from .deltas import module_paths
from .merging import MergeTally, cast_model


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


def peft_config(settings: FinetuneSettings, model: nn.Module, sites: list[MLPSite]):
    """The PEFT config of a lora / ia3 run, and the record of it."""
    import peft

    targets, feedforward, fan_in_fan_out = resolve_targets(model, sites, settings.target_modules)
    if settings.subset == "lora":
        r, alpha, dropout = settings.lora()
        config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                 fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
        info = AdapterInfo(method="lora", target_modules=targets, r=r, alpha=alpha, dropout=dropout,
                           fan_in_fan_out=fan_in_fan_out, peft_version=peft.__version__)
    elif settings.subset == "ia3":
        config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward,
                                fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
        info = AdapterInfo(method="ia3", target_modules=targets, feedforward_modules=feedforward,
                           fan_in_fan_out=fan_in_fan_out, peft_version=peft.__version__)
    else:
        raise FinetuneError(f"Subset {settings.subset!r} is not a PEFT adapter.")
    return config, info


def attach_adapter(model: nn.Module, settings: FinetuneSettings, sites: list[MLPSite]):
    """Wrap ``model`` (in place: its projections get the adapter's layers) in a trainable PeftModel with
    float32 adapter weights; everything else frozen. Returns the PeftModel and the record."""
    from peft import get_peft_model

    config, info = peft_config(settings, model, sites)
    try:
        with _quiet_peft():
            wrapped = get_peft_model(model, config, autocast_adapter_dtype=True)
    except (ValueError, TypeError) as exc:  # PEFT's word for a target it cannot adapt
        raise FinetuneError(f"PEFT cannot put a {settings.subset} adapter on {', '.join(info.target_modules)}: "
                            f"{str(exc).splitlines()[0][:300]}", fix="target_modules") from exc
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
    from peft import PeftModel

    where = adapter_folder(folder)
    if not (where / ADAPTER_WEIGHTS_FILE).is_file():  # PEFT would fall back to a pickle (adapter_model.bin)
        raise FinetuneError(f"{where} holds no {ADAPTER_WEIGHTS_FILE}; neuronreg loads adapters only as safetensors, "
                            "never a pickle such as adapter_model.bin.", fix="run_folder")
    try:
        with _quiet_peft():
            wrapped = PeftModel.from_pretrained(model, str(where), is_trainable=False, autocast_adapter_dtype=True)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise FinetuneError(f"The adapter in {where} does not load on this model: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from exc
    _float32_adapter(wrapped)
    for p in wrapped.parameters():
        p.requires_grad_(False)
    return wrapped


def merge_adapter(wrapped, dtype: torch.dtype | None = None) -> tuple[nn.Module, MergeInfo]:
    """Merge the adapter into the base weights and take the adapter layers out: a plain model again.

    Each adapted projection's weight (and bias) is upcast to float32, PEFT merges the adapter into it
    there, and the result is rounded once into ``dtype`` (None: the model's); the tally measures what
    that rounding lost against the float32 merge. The rest of the model is then cast to ``dtype``."""
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
    data["revision"] = revision if base_id else None
    return json.dumps(data, indent=2, sort_keys=True) + "\n"
