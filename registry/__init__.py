"""neuronreg: language-specific neurons (LAPE) as infrastructure: compute, store, share, fine-tune.

Layers, lowest first (a module imports only from its own layer or lower ones):

* root modules: ``errors``, ``extras``, ``files``, ``layouts``, ``manifest``, ``resolve``, ``provenance``, ``mask``,
  ``progress``, ``hubcalls``, ``overlap``, ``plots`` (no torch), then ``models``, ``hooks``, ``corpus``,
  ``distributed`` (processes under torchrun);
* ``store``: the local registry, the Hub registry, the authors' file format and cards;
* ``lape``: counting, selection and the compute job;
* ``steering``: steering plans, steered generation and its evaluation;
* ``evaluation``: held-out loss (the one measurement), ablation, benchmarks, the report across runs;
* ``finetune``: the methods (registered by name), settings, training, loading, evaluation, release (a run
  folder's records are ``runs``, at the root);
* ``cli``: thin Click commands over all of the above.

The public names below are imported on first use, so ``import neuronreg`` stays cheap.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("neuronreg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

# The verbs and records the README teaches, top-level (imported on first use: `import neuronreg` stays cheap).
_EXPORTS = {
    # errors and options
    "NeuronregError": "errors",
    "LoadOptions": "options",
    "load_manifest": "manifest",
    "resolve_model": "resolve",
    "disable_progress_bars": "progress",
    "enable_progress_bars": "progress",
    # LAPE: count, select
    "compute": "lape.compute",
    "select": "lape.compute",
    "CountSettings": "lape.compute",
    "SelectionParams": "lape.selection",
    "select_neurons": "lape.selection",
    # masks and the registry
    "NeuronMask": "mask",
    "LocalRegistry": "store.local",
    "SelectionRef": "store.index",
    "find_masks": "store.masks",
    "load_mask": "store.masks",
    "publish": "store.hub",
    # measuring
    "ablate": "evaluation.ablation",
    "AblationSettings": "evaluation.ablation",
    "steer": "steering",
    # fine-tuning
    "finetune": "finetune.training",
    "FinetuneSettings": "finetune.config",
    "get_method": "finetune.method",
    "register_method": "finetune.method",
    "evaluate_runs": "finetune.evaluate",
    "compose": "finetune.compose",
    "analyze": "finetune.analyze",
    "AnalyzeSettings": "finetune.analyze",
    "load_sparse_model": "finetune.loading",
    "release": "finetune.release",
    "read_run_config": "runs",
}

__all__ = [  # the same names as _EXPORTS (a test checks), spelled out for type checkers
    "__version__",
    "NeuronregError", "LoadOptions", "load_manifest", "resolve_model", "disable_progress_bars",
    "enable_progress_bars", "compute", "select", "CountSettings", "SelectionParams", "select_neurons", "NeuronMask",
    "LocalRegistry", "SelectionRef", "find_masks", "load_mask", "publish", "ablate", "AblationSettings", "steer",
    "finetune", "FinetuneSettings", "get_method", "register_method", "evaluate_runs", "compose", "analyze",
    "AnalyzeSettings", "load_sparse_model", "release", "read_run_config",
]

if TYPE_CHECKING:  # what the lazy names are, for IDEs and type checkers
    from .errors import NeuronregError
    from .evaluation.ablation import AblationSettings, ablate
    from .finetune.analyze import AnalyzeSettings, analyze
    from .finetune.compose import compose
    from .finetune.config import FinetuneSettings
    from .finetune.evaluate import evaluate_runs
    from .finetune.loading import load_sparse_model
    from .finetune.method import get_method, register_method
    from .finetune.release import release
    from .finetune.training import finetune
    from .lape.compute import CountSettings, compute, select
    from .lape.selection import SelectionParams, select_neurons
    from .manifest import load_manifest
    from .mask import NeuronMask
    from .options import LoadOptions
    from .progress import disable_progress_bars, enable_progress_bars
    from .resolve import resolve_model
    from .runs import read_run_config
    from .steering import steer
    from .store.hub import publish
    from .store.index import SelectionRef
    from .store.local import LocalRegistry
    from .store.masks import find_masks, load_mask


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'neuronreg' has no attribute {name!r}")
