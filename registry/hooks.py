"""Forward hooks on the MLP activations, alive only inside a ``with`` block.

Every hook neuronreg puts on a model lives here or goes through :func:`site_hooks`: it registers one
hook per layer's activation module (the module whose output LAPE counts: ``act_fn(gate_proj(x))`` of
gated MLPs, ``act(fc1(x))`` of plain ones) and removes every one of them in ``finally``, also when the
block raises. The weights are never modified.

:func:`zeroed_neurons` switches a mask's neurons off (ablation); :func:`steered_neurons` sets chosen
neurons to given values or adds values to them (steering, :mod:`neuronreg.steering`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import MaskError
from .models import MLPSite


@contextmanager
def site_hooks(sites: list[MLPSite], make_hook: Callable[[MLPSite], Callable | None]) -> Iterator[None]:
    """Register ``make_hook(site)`` (when not None) as a forward hook on every site's activation."""
    handles = []
    try:
        for site in sites:
            hook = make_hook(site)
            if hook is not None:
                handles.append(site.activation.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def zeroed_neurons(sites: list[MLPSite], mask) -> Iterator[None]:
    """Inside the block, the :class:`~neuronreg.mask.NeuronMask`'s neurons output 0 on every forward
    pass (for a gated MLP, the neuron's ``act * up`` product and its down column then add nothing)."""
    mask.check_sites(sites)
    per_layer = mask.per_layer()

    def make_hook(site: MLPSite):
        indices = per_layer[site.layer]
        if not indices.numel():
            return None
        indices = indices.to(next(site.projection.parameters()).device)

        def hook(module, inputs, output):
            return output.index_fill(-1, indices, 0.0)

        return hook

    with site_hooks(sites, make_hook):
        yield


@dataclass
class NeuronEdit:
    """What one layer's neurons output inside :func:`steered_neurons`: neuron ``index[k]`` outputs
    ``value[k]`` in place of its activation, or (``additive``) its activation plus ``value[k]``."""

    index: torch.Tensor  # int64 [k], unique
    value: torch.Tensor  # float [k]
    additive: bool = False


@contextmanager
def steered_neurons(sites: list[MLPSite], edits: dict[int, NeuronEdit]) -> Iterator[None]:
    """Inside the block, every forward pass (plain calls and each step of ``generate`` alike) gives the
    edited neurons of each layer in ``edits`` their set value, or adds it, at every position.

    The values are cast to the activation's dtype and device when the hook runs, so one set of edits
    serves a model in any dtype, on CPU or CUDA, or spread over several devices.
    """
    by_layer = {site.layer: site for site in sites}
    for layer, edit in edits.items():
        site = by_layer.get(layer)
        if site is None:
            raise MaskError(f"The model has no layer {layer} to steer (it has {len(sites)}).", fix="mask_model")
        index = edit.index
        if index.dim() != 1 or index.shape != edit.value.shape:
            raise MaskError(f"Layer {layer}: the neurons and values to steer must be two vectors of one length.")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= site.intermediate_size
                              or index.unique().numel() != index.numel()):
            raise MaskError(f"Layer {layer}: the neurons to steer must be distinct and below "
                            f"{site.intermediate_size}.", fix="mask_model")

    def make_hook(site: MLPSite):
        edit = edits.get(site.layer)
        if edit is None or not edit.index.numel():
            return None
        device = next(site.projection.parameters()).device
        index = edit.index.to(device=device, dtype=torch.long)
        values: dict[torch.dtype, torch.Tensor] = {}

        def hook(module, inputs, output):
            value = values.get(output.dtype)
            if value is None or value.device != output.device:
                value = values[output.dtype] = edit.value.to(device=output.device, dtype=output.dtype)
            where = index if index.device == output.device else index.to(output.device)
            source = value.expand(*output.shape[:-1], value.numel())
            if edit.additive:
                return output.index_add(-1, where, source)
            return output.index_copy(-1, where, source)

        return hook

    with site_hooks(sites, make_hook):
        yield
