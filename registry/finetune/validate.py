"""Checks of a run's weight files, shared by loading a run and releasing it: what one refuses, the other
never sends (a NaN, an infinity, an absurd value, a neuron index out of range or repeated, a block of the
wrong shape, a pickle)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import FinetuneError

# No trained weight or change comes near this; a value beyond it is a damaged or hostile file.
VALUE_LIMIT = 1e6
BLOCKS_GATED = ("gate_delta", "up_delta", "down_delta")
BLOCKS_PLAIN = ("in_delta", "down_delta")


def _damaged(path: Path, what: str) -> FinetuneError:
    return FinetuneError(f"{path} {what}; the run is damaged.", fix="run_folder")


def check_values(name: str, tensor: torch.Tensor, path: Path) -> None:
    """A floating tensor must be finite and below ``VALUE_LIMIT`` in magnitude."""
    if not tensor.is_floating_point():
        return
    values = tensor.float()
    if not bool(torch.isfinite(values).all()):
        raise _damaged(path, f"holds a value that is not finite in {name}")
    if values.numel() and float(values.abs().max()) > VALUE_LIMIT:
        raise _damaged(path, f"holds a value beyond {VALUE_LIMIT:g} in {name}")


def check_finite_safetensors(path: Path) -> None:
    """Every floating tensor of a safetensors file finite and bounded (read one tensor at a time)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                check_values(name, f.get_tensor(name), path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, f"cannot be read ({type(exc).__name__})") from exc


def _layer_of(prefix: str) -> int | None:
    numbers = [int(part) for part in prefix.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


def read_delta(path: Path, config) -> dict[str, torch.Tensor]:
    """The tensors of a run's ``delta.safetensors``, checked against its run config: per layer a sorted,
    unique int64 neuron list inside the MLP's width (as many neurons per layer as the config says), blocks
    of ``[k, hidden]`` (gate/up or in rows) and ``[hidden, k]`` (down columns), every value finite and
    bounded. FinetuneError otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FinetuneError(f"{path.parent} has no {path.name}; the run did not finish.", fix="run_folder")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _damaged(path, f"cannot be read ({type(exc).__name__})") from exc
    base = config.base_model
    hidden, width, layers = base.hidden_size, base.intermediate_size, base.num_layers
    prefixes = {name[: -len(".neurons")] for name in tensors if name.endswith(".neurons")}
    counts = [0] * layers
    for prefix in sorted(prefixes):
        neurons = tensors[f"{prefix}.neurons"]
        layer = _layer_of(prefix)
        if layer is None or not 0 <= layer < layers:
            raise _damaged(path, f"names {prefix}, not a layer of a {layers}-layer model")
        if neurons.dim() != 1 or neurons.is_floating_point() or neurons.dtype == torch.bool:
            raise _damaged(path, f"holds {prefix}.neurons that are not a list of integers")
        ids = neurons.long()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
            raise _damaged(path, f"holds a neuron of {prefix} outside 0..{width - 1}")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise _damaged(path, f"holds neurons of {prefix} that are repeated or not sorted")
        counts[layer] += ids.numel()
        k = ids.numel()
        blocks = [n for n in (*BLOCKS_GATED, *BLOCKS_PLAIN, "in_bias_delta") if f"{prefix}.{n}" in tensors]
        if not ({"gate_delta", "up_delta", "down_delta"} <= set(blocks) or {"in_delta", "down_delta"} <= set(blocks)):
            raise _damaged(path, f"lacks the delta blocks of {prefix}")
        for block in blocks:
            tensor = tensors[f"{prefix}.{block}"]
            want = {"down_delta": (hidden, k), "in_bias_delta": (k,)}.get(block, (k, hidden))
            if hidden is not None and tuple(tensor.shape) != want or hidden is None and tensor.dim() != len(want):
                raise _damaged(path, f"holds {prefix}.{block} of shape {tuple(tensor.shape)}, not {want}")
            check_values(f"{prefix}.{block}", tensor, path)
    stray = [n for n in tensors if re.sub(r"\.[a-z_]+$", "", n) not in prefixes]
    if stray:
        raise _damaged(path, f"holds {stray[0]}, which belongs to no layer's neurons")
    if config.neurons is not None and counts != list(config.neurons.per_layer):
        raise _damaged(path, "holds other neurons per layer than its run config says")
    return tensors
