"""Forward hooks on the MLP activations, alive only inside a ``with`` block.

Every hook neuronreg puts on a model lives here or goes through :func:`site_hooks`: it registers one
hook per layer's activation module (the module whose output LAPE counts: ``act_fn(gate_proj(x))`` of
gated MLPs, ``act(fc1(x))`` of plain ones) and removes every one of them in ``finally``, also when the
block raises. The weights are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
