"""neuronreg: language-specific neurons (LAPE) as infrastructure: compute, store, share, fine-tune.

Layers, lowest first (a module imports only from its own layer or lower ones):

* root modules: ``errors``, ``files``, ``layouts``, ``manifest``, ``resolve``, ``provenance``, ``mask``,
  ``progress``, ``hubcalls``, ``overlap``, ``plots`` (no torch), then ``models``, ``hooks``, ``corpus``,
  ``distributed`` (processes under torchrun);
* ``store``: the local registry, the Hub registry, the authors' file format and cards;
* ``lape``: counting, selection and the compute job;
* ``steering``: steering plans, steered generation and its evaluation;
* ``evaluation``: held-out loss (the one measurement), ablation, benchmarks, the report across runs;
* ``finetune``: settings and run config, row-sparse deltas, training, loading, evaluation, release;
* ``cli``: thin Click commands over all of the above.

The public names below are imported on first use, so ``import neuronreg`` stays cheap.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuronreg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

_EXPORTS = {
    "NeuronregError": "errors",
    "LocalRegistry": "store.local",
    "NeuronMask": "mask",
    "SelectionParams": "lape.selection",
    "select_neurons": "lape.selection",
    "load_manifest": "manifest",
    "load_mask": "store.hub",
    "load_sparse_model": "finetune.loading",
    "resolve_model": "resolve",
    "steer": "steering",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'neuronreg' has no attribute {name!r}")
