"""Composing several languages' runs of one base into one run (``neuronreg compose``).

LAPE neurons of different languages overlap little, and a neuronreg run is a change of those neurons
only, so runs trained one language at a time compose into one model cheaply. What composes:

* **row-sparse runs** (``lape`` with ``lape``, ``random`` with ``random``): the composed delta holds, per
  layer, the union of the parts' neurons; a neuron only one part trained keeps that part's rows and
  column exactly; a neuron several parts trained (a *collision*, counted per layer) gets, by ``rule``,
  the **sum** of their changes (composable sparse fine-tuning's convention: each part's change added to
  the base), their **mean**, or the **first** part's (in the order given). The result is a row-sparse
  run like any other;
* **LoRA runs** on the same modules: the composed adapter concatenates the parts' factors (rank r1 + r2
  + ...), each ``B`` scaled by its part's ``alpha / r`` (``mean``: also by 1/n) and the new adapter's
  scale 1, so its ``B @ A`` is exactly the sum (or mean) of the parts' updates. Every adapted weight is
  shared, so ``first`` has no meaning and is refused;
* **dense runs** (``ffn``, ``full``): task arithmetic, ``base + sum(tuned_i - base)`` (or the mean),
  computed in float32 and stored in the parts' dtype; ``first`` is refused for the same reason.

Refused, with the reason: runs of another base; runs of different kinds (a delta with an adapter or a
dense run: one kind of change per composed run; merge the others into a base first); ``lape`` with
``random`` (a treatment with its control); IA3 (its scales multiply; a sum is not what either part
learnt); DoRA and LoRA on different modules or with per-module ranks.

The composed folder is a run folder (its ``neuronreg_delta.json`` lists the parts in ``composition``), so
``evaluate``, ``analyze``, ``report``, ``release`` and ``load_sparse_model`` take it as they take any run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FinetuneError
from ..files import atomic_folder
from ..runs import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    DELTA_FILE,
    FULL_MODEL_DIR,
    RUN_CONFIG_FILE,
    AdapterInfo,
    ComposedPart,
    CompositionInfo,
    NeuronCounts,
    RunConfig,
)
from .method import read_run

log = logging.getLogger("neuronreg")
RULES = ("sum", "mean", "first")


@dataclass
class ComposeResult:
    out: Path
    config: RunConfig
    collisions: list[int] | None  # per layer (row-sparse runs)


def compose(folders, out: str | Path, *, rule: str = "sum", overwrite: bool = False) -> ComposeResult:
    """Compose the runs in ``folders`` (two or more, of one base) into the run folder ``out`` (see the
    module's rules). Everything is read and checked before anything is written; ``out`` appears whole or
    not at all."""
    if rule not in RULES:
        raise FinetuneError(f"Unknown rule {rule!r}; use one of {', '.join(RULES)}.", fix="compose_rule")
    folders = [Path(folder) for folder in folders]
    if len(folders) < 2:
        raise FinetuneError("Composing needs two runs or more.", fix="compose")
    runs = [(folder, *read_run(folder)) for folder in folders]
    out = Path(out)
    if (out / RUN_CONFIG_FILE).exists() and not overwrite:
        raise FinetuneError(f"{out} already holds a run.", fix="overwrite",
                            advice="Use another output folder, or overwrite=True to replace it.")
    if any(out.resolve() == folder.resolve() for folder in folders):
        raise FinetuneError(f"{out} is one of the runs being composed; write the composition elsewhere.",
                            fix="out")
    _same_base(runs)
    kinds = {method.kind for _, _, method in runs}
    subsets = {config.subset for _, config, _ in runs}
    if len(kinds) > 1:
        raise FinetuneError(f"The runs are of different kinds ({', '.join(sorted(subsets))}): a composed run is one "
                            "kind of change (row-sparse deltas, LoRA adapters or dense weights).", fix="compose",
                            advice="Compose runs of one kind; merge the others into a base first.")
    kind = kinds.pop()
    if subsets == {"lape", "random"}:
        raise FinetuneError("lape and random runs are a treatment and its control; composing them measures "
                            "neither.", fix="compose", advice="Compose lape runs, or random runs.")
    _warn_nested_random(runs)
    if kind == "adapter":
        compose_one = _compose_lora
    elif kind == "dense":
        compose_one = _compose_dense
    else:
        compose_one = _compose_deltas
    if rule == "first" and kind != "delta":
        raise FinetuneError(f"Rule 'first' keeps one part's change where several change a weight; every weight of "
                            f"{kind} runs is changed by every part, so only the first would remain.",
                            fix="compose_rule", advice="Use rule 'sum' or 'mean'.")
    with atomic_folder(out) as tmp:
        config, collisions = compose_one(runs, tmp, rule)
        (tmp / RUN_CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    return ComposeResult(out, config, collisions)


def _warn_nested_random(runs) -> None:
    """Random masks drawn with one seed are prefixes of the same permutation in every layer
    (:meth:`NeuronMask.random`), so random runs of different languages trained with one --seed share far
    more neurons than chance, and their composition collides where independent controls would not
    (measured on Gemma: 462 colliding neurons against 67 with distinct seeds)."""
    seeds: dict[int, list[str]] = {}
    for folder, config, _ in runs:
        if config.subset == "random":  # its neurons: the language mask's counts, drawn with the run's seed
            seeds.setdefault(config.training.seed, []).append(str(folder))
    shared = {seed: names for seed, names in seeds.items() if len(names) > 1}
    for seed, names in shared.items():
        log.warning("%s drew their random neurons with the same seed (%d): such masks are nested, not independent, "
                    "so they collide far more than chance. Train each language's random run with its own seed.",
                    " and ".join(names), seed)


def _same_base(runs) -> None:
    first = runs[0][1].base_model
    for folder, config, _ in runs[1:]:
        other = config.base_model
        if (other.name, other.revision) != (first.name, first.revision):
            raise FinetuneError(f"{folder} was trained on {other.name} ({other.revision}), {runs[0][0]} on "
                                f"{first.name} ({first.revision}): only runs of one base compose.", fix="compose")


def _sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _part(folder: Path, config: RunConfig, files: list[Path]) -> ComposedPart:
    return ComposedPart(run=folder.name, subset=config.subset, language=config.language, sha256=_sha256(files),
                        trainable_parameters=config.trainable_parameters, mask=config.mask, training=config.training)


def _config(runs, *, rule: str, parts: list[ComposedPart], trainable: int, collisions=None,
            collided: int | None = 0, **changes) -> RunConfig:
    """The composed run's config: its first part's, with what composing changed (no mask, no validation)."""
    first = runs[0][1]
    data = first.to_dict()
    data.update(mask=None, best_step=None, best_val_loss=None, validation_curve=[], merge=None, steps_log=None)
    config = RunConfig.from_dict(data, "the composed run")
    config.trainable_parameters = trainable
    config.trainable_share = trainable / config.base_model.num_parameters
    languages = list({part.language.code: part.language for part in parts}.values())
    config.composition = CompositionInfo(rule=rule, parts=parts, collisions=collisions, collided_weights=collided,
                                         languages=languages)
    for key, value in changes.items():
        setattr(config, key, value)
    return config


# -- row-sparse deltas --------------------------------------------------------------------------------------
def _compose_deltas(runs, tmp: Path, rule: str):
    from safetensors.torch import save_file

    from .deltas import read_run_delta

    loaded = [read_run_delta(folder, config) for folder, config, _ in runs]
    layers = runs[0][1].base_model.num_layers
    prefixes = sorted({name[: -len(".neurons")] for tensors in loaded for name in tensors
                       if name.endswith(".neurons")}, key=_layer_key)
    composed: dict[str, torch.Tensor] = {}
    per_layer, collisions, trainable, collided = [0] * layers, [0] * layers, 0, 0
    for prefix in prefixes:
        holders = [t for t in loaded if f"{prefix}.neurons" in t]
        union = torch.unique(torch.cat([t[f"{prefix}.neurons"].long() for t in holders]))  # sorted
        counts = torch.zeros(union.numel(), dtype=torch.long)
        positions = []
        for tensors in holders:
            position = torch.searchsorted(union, tensors[f"{prefix}.neurons"].long())
            counts[position] += 1
            positions.append(position)
        composed[f"{prefix}.neurons"] = union
        blocks = [name.rsplit(".", 1)[1] for name in holders[0] if name.startswith(prefix + ".")
                  and not name.endswith(".neurons")]
        for block in blocks:
            column = block == "down_delta"
            sample = holders[0][f"{prefix}.{block}"]
            shape = (sample.shape[0], union.numel()) if column else (union.numel(), *sample.shape[1:])
            total = torch.zeros(shape, dtype=torch.float32)
            taken = torch.zeros(union.numel(), dtype=torch.bool)
            for tensors, position in zip(holders, positions):
                value = tensors[f"{prefix}.{block}"].float()
                if rule == "first":
                    fresh = ~taken[position]
                    if column:
                        total[:, position[fresh]] = value[:, fresh]
                    else:
                        total[position[fresh]] = value[fresh]
                    taken[position] = True
                elif column:
                    total.index_add_(1, position, value)
                else:
                    total.index_add_(0, position, value)
            if rule == "mean":
                divisor = counts.float()
                total = total / (divisor if column else divisor.view(-1, *([1] * (total.dim() - 1))))
            composed[f"{prefix}.{block}"] = total.contiguous()
            trainable += total.numel()
        layer = _layer_key(prefix)
        per_layer[layer] += union.numel()
        collisions[layer] += int((counts > 1).sum())
        collided += int((counts > 1).sum()) * sum(composed[f"{prefix}.{b}"].numel() // union.numel() for b in blocks)
    first = runs[0][1]
    save_file(composed, str(tmp / DELTA_FILE), metadata={"neuronreg": json.dumps({
        "base_model": first.base_model.id or "", "revision": first.base_model.revision or "", "composed": rule})})
    parts = [_part(folder, config, [folder / DELTA_FILE]) for folder, config, _ in runs]
    config = _config(runs, rule=rule, parts=parts, trainable=trainable, collisions=collisions, collided=collided,
                     neurons=NeuronCounts(total=sum(per_layer), per_layer=per_layer))
    return config, collisions


def _layer_key(prefix: str) -> int:
    numbers = [int(part) for part in prefix.split(".") if part.isdigit()]
    return numbers[-1] if numbers else 0


# -- LoRA adapters ------------------------------------------------------------------------------------------
def _compose_lora(runs, tmp: Path, rule: str):
    import math

    from safetensors.torch import load_file, save_file

    from .adapters import adapter_folder, check_adapter_files

    settings, weights, scales = [], [], []
    for folder, config, method in runs:
        if getattr(method, "peft_type", "") != "LORA":
            raise FinetuneError(f"{folder} is an {config.subset} run: its adapter scales activations, and a sum of "
                                "scales is not what either run learnt.", fix="compose",
                                advice="Compose row-sparse, LoRA or dense runs.")
        where = adapter_folder(folder)
        check_adapter_files(where)
        data = json.loads((where / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
        if data.get("use_dora") or data.get("rank_pattern") or data.get("alpha_pattern"):
            raise FinetuneError(f"{folder}'s adapter is not plain LoRA (DoRA, or per-module ranks): its update is not "
                                "B @ A alone.", fix="compose")
        settings.append(data)
        weights.append(load_file(str(where / ADAPTER_WEIGHTS_FILE)))
        r, alpha = int(data["r"]), float(data["lora_alpha"])
        scales.append(alpha / math.sqrt(r) if data.get("use_rslora") else alpha / r)
    targets = {json.dumps(sorted(s.get("target_modules") or []), default=str) for s in settings}
    if len(targets) > 1 or {tuple(sorted(w)) for w in weights}.__len__() > 1:
        raise FinetuneError("The LoRA runs adapt different modules; only adapters on the same modules compose "
                            "into one.", fix="compose")
    n = len(runs)
    composed = {}
    for name in sorted(weights[0]):
        if name.endswith(".lora_A.weight"):
            composed[name] = torch.cat([w[name].float() for w in weights], dim=0).contiguous()
        elif name.endswith(".lora_B.weight"):
            factor = [s / n if rule == "mean" else s for s in scales]
            composed[name] = torch.cat([w[name].float() * f for w, f in zip(weights, factor)], dim=1).contiguous()
        else:
            raise FinetuneError(f"The adapter holds {name}, which plain LoRA does not; it cannot be composed.",
                                fix="compose")
    rank = sum(int(s["r"]) for s in settings)
    adapter = dict(settings[0], r=rank, lora_alpha=rank, use_rslora=False, lora_dropout=0.0)  # scale 1
    save_file(composed, str(tmp / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    parts = [_part(folder, config, [adapter_folder(folder) / ADAPTER_WEIGHTS_FILE]) for folder, config, _ in runs]
    trainable = sum(t.numel() for t in composed.values())
    info = runs[0][1].adapter
    record = AdapterInfo(method=runs[0][1].subset, target_modules=list(info.target_modules), r=rank,
                         alpha=float(rank), dropout=0.0, fan_in_fan_out=info.fan_in_fan_out,
                         peft_version=info.peft_version)
    config = _config(runs, rule=rule, parts=parts, trainable=trainable, adapter=record, collided=None)
    return config, None


# -- dense weights -------------------------------------------------------------------------------------------
def _compose_dense(runs, tmp: Path, rule: str):
    from ..models import DTYPES, load_model
    from ..options import LoadOptions
    from ..resolve import ModelRef
    from .base import load_base_model
    from .merging import save_pretrained

    first = runs[0][1]
    cpu = LoadOptions(device="cpu", dtype="float32")
    base = load_base_model(runs[0][0], cpu, tokenizer=True)
    base_state = {name: p.detach().clone() for name, p in base.model.state_dict().items()}
    total = {name: torch.zeros_like(t, dtype=torch.float32) for name, t in base_state.items() if t.is_floating_point()}
    changers = {name: torch.zeros_like(t, dtype=torch.uint8) for name, t in total.items()}
    for folder, config, _ in runs:
        weights = folder / FULL_MODEL_DIR
        tuned = load_model(ModelRef(config.base_model.name, str(weights.resolve()), None, True), cpu,
                           tokenizer=False).model.state_dict()
        for name in total:
            difference = tuned[name].float() - base_state[name].float()
            total[name] += difference
            changers[name] += (difference != 0).to(torch.uint8)
        del tuned
    n = len(runs)
    changed = sum(int((c > 0).sum()) for c in changers.values())
    collided = sum(int((c > 1).sum()) for c in changers.values())
    with torch.no_grad():
        for name, p in base.model.state_dict().items():
            if name in total:
                delta = total[name] / n if rule == "mean" else total[name]
                p.copy_(base_state[name].float() + delta)
    saved = first.merge.dtype if first.merge else first.training.dtype
    base.model.to(DTYPES[saved])
    save_pretrained(base.model, base.tokenizer, tmp / FULL_MODEL_DIR)
    parts = [_part(folder, config, sorted((folder / FULL_MODEL_DIR).glob("*.safetensors")))
             for folder, config, _ in runs]
    subset = first.subset if len({c.subset for _, c, _ in runs}) == 1 else "full"
    config = _config(runs, rule=rule, parts=parts, trainable=changed, collided=collided, subset=subset)
    return config, None
