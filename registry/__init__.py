"""neuronreg: language-specific neurons (LAPE) as infrastructure: compute, store, share, fine-tune."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("neuronreg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from .errors import NeuronregError  # noqa: E402
from .hub import load_mask  # noqa: E402
from .mask import NeuronMask  # noqa: E402
from .sparse import load_sparse_model  # noqa: E402
from .manifest import load_manifest  # noqa: E402
from .selection import SelectionParams, select_neurons  # noqa: E402
from .store import LocalRegistry  # noqa: E402

__all__ = ["__version__", "NeuronregError", "LocalRegistry", "NeuronMask", "SelectionParams", "load_manifest",
           "load_mask", "load_sparse_model", "select_neurons"]
