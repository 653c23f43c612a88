"""Fine-tuning methods as objects, registered by name (as PEFT registers its tuners).

A method knows everything that differs between ways of fine-tuning; the training loop, loading,
evaluation, release and the analyses ask it instead of branching on a name:

* its options (a dataclass, checked) and which of them decide the result;
* ``attach``: make a loaded model trainable its way, giving a :class:`Trained` (the weights the
  optimizer updates, what happens around each step, how the result is saved);
* for a finished run folder: ``apply`` (put the run on a base model, unmerged), ``merge`` (into the
  weights), ``tuned_model`` (the model to evaluate), ``check_run`` (validate before release),
  ``release_files`` and ``card`` (what a Hub repo gets), ``updates`` (the weight change, for analysis).

The built-in methods: row-sparse deltas (``lape``, ``random``: :mod:`.deltas`), PEFT adapters (``lora``,
``ia3``: :mod:`.adapters`) and dense training (``ffn``, ``full``: :mod:`.dense`). Adding one is one class
in one module, decorated with :func:`register_method` (see the README's development section).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from importlib import import_module
from pathlib import Path
from typing import ClassVar

from ..errors import FinetuneError

# The modules that define the built-in methods; imported on first use so that `import neuronreg` stays cheap.
BUILTIN_MODULES = ("deltas", "adapters", "dense")
_METHODS: dict[str, type[FinetuneMethod]] = {}


def register_method(cls: type[FinetuneMethod]) -> type[FinetuneMethod]:
    """Class decorator: make ``cls`` available under ``cls.name`` (a name may be registered once)."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__name__} has no name")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"A fine-tuning method named {cls.name!r} is registered already")
    _METHODS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        import_module(f"{__package__}.{module}")


def method_names() -> list[str]:
    _load_builtins()
    return list(_METHODS)


def get_method(name: str) -> FinetuneMethod:
    """The method registered as ``name`` (FinetuneError naming the others)."""
    _load_builtins()
    if name not in _METHODS:
        raise FinetuneError(f"Unknown subset {name!r}; use one of {', '.join(_METHODS)}.", fix="subset")
    return _METHODS[name]()


def read_run(folder) -> tuple:
    """A finished run's config (typed, migrated) and its method, the config checked by the method too
    (an adapter run must say which adapter ...); RecordError or FinetuneError otherwise."""
    from ..runs import RUN_CONFIG_FILE, read_run_config

    config = read_run_config(folder)
    method = get_method(config.subset)
    method.check_config(config, str(Path(folder) / RUN_CONFIG_FILE))
    return config, method


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


@dataclass
class CardText:
    """What a model card says of a run's method."""

    kind: str  # "delta", "adapter" or "dense"
    trains: str  # what it trained, in words
    library: str | None = None  # the Hub's library_name of the repo as released (unmerged)
    relation: str | None = None  # the Hub's base_model_relation of the repo as released (unmerged)
    details: str = ""  # e.g. the adapter's target modules and rank


class Trained:
    """A model made trainable by a method: what the training loop needs from it."""

    # DDP must look for parameters without gradients (dense runs train some weights only in some steps).
    find_unused: bool = False

    @property
    def named(self) -> dict:
        """The weights the optimizer updates (float32), by a stable name (checkpoints are keyed by it)."""
        raise NotImplementedError

    def after_backward(self) -> None:
        """Called after each step's backward passes, before clipping and the optimizer step."""

    def after_update(self) -> None:
        """Called after each optimizer step, and after weights were loaded into ``named`` (resume, best)."""

    def record(self) -> dict:
        """What the run config records of it: ``neurons`` (NeuronCounts) and/or ``adapter`` (AdapterInfo)."""
        return {}

    def save(self, out: Path, loaded, config, settings, save_dtype) -> object:
        """Write the run's files (not the run config) into ``out``; returns a MergeInfo when weights were
        stored in a lower precision or merged (else None)."""
        raise NotImplementedError


class FinetuneMethod:
    """One way of fine-tuning. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "delta", "adapter" or "dense"
    trains: ClassVar[str] = ""  # what it trains, in a few words (cards, --help)
    needs_mask: ClassVar[bool] = False  # trains (or is the control of) a language's neurons from a registry
    options_class: ClassVar[type] = NoOptions
    run_files: ClassVar[tuple[str, ...]] = ()  # what a finished run folder holds besides its config

    # -- options --------------------------------------------------------------------------------------
    def parse_options(self, given: dict | None):
        """The method's options from ``given`` (names of ``options_class``'s fields), checked; FinetuneError
        for a name it does not have."""
        given = dict(given or {})
        known = {f.name for f in fields(self.options_class)}
        unknown = sorted(set(given) - known)
        if unknown:
            owners = [name for name in method_names()
                      if set(unknown) <= {f.name for f in fields(_METHODS[name].options_class)}]
            where = (f"subset{'s' if len(owners) > 1 else ''} {' and '.join(repr(o) for o in owners)} only"
                     if owners else "no subset")
            raise FinetuneError(f"Option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                                f"appl{'y' if len(unknown) > 1 else 'ies'} to {where}, not to subset {self.name!r}.",
                                fix="method_options", advice="Leave them out, or choose the subset they belong to.")
        return self.options_class(**given)

    def result_settings(self, options) -> dict:
        """The options that decide the result (a resumed run must have the same); {} without options."""
        return {f.name: getattr(options, f.name) for f in fields(options)}

    # -- training -------------------------------------------------------------------------------------
    def require_packages(self) -> None:
        """MissingExtra when an optional package this method trains with is not installed (checked before a
        model is loaded)."""

    def attach(self, loaded, settings, mask, options) -> Trained:
        """Make ``loaded.model`` trainable (everything else frozen); ``mask`` is the language's NeuronMask
        when ``needs_mask``."""
        raise NotImplementedError

    # -- a finished run -------------------------------------------------------------------------------
    def check_config(self, config, where: str) -> None:
        """RecordError when the run config lacks what this method's runs record."""

    def apply(self, model, folder: Path, config):
        """Put the run on ``model`` (its base), unmerged and frozen; returns what it attached (a model
        around ``model`` when the method wraps it, such as a PeftModel; else None)."""
        raise NotImplementedError

    def merge(self, model, folder: Path, config, dtype):
        """Put the run into ``model``'s weights, stored in ``dtype``; returns ``(plain model, MergeInfo)``."""
        raise NotImplementedError

    def tuned_model(self, folder: Path, config, load, *, base=None, allow_other_base: bool = False):
        """The model to measure the run with: by default its base with the run applied, unmerged."""
        from .base import load_base_model

        loaded = load_base_model(folder, load, base=base, allow_other_base=allow_other_base)
        wrapped = self.apply(loaded.model, folder, config)
        return wrapped if wrapped is not None else loaded.model

    def on_base(self, model, folder: Path, config, load):
        """The model to measure the run with, made from ``model``, its base already in memory: the run
        applied to it, unmerged (a method whose run is a whole model loads that instead)."""
        wrapped = self.apply(model, folder, config)
        return wrapped if wrapped is not None else model

    def check_run(self, folder: Path, config) -> None:
        """FinetuneError unless the run's files hold what loading it would accept (before a release)."""

    def release_files(self, folder: Path, config, staging: Path, merged: bool, *, base_id: str | None = None
                      ) -> dict[str, Path]:
        """The run's files for a Hub repo, path in the repo -> local file (the config and card are added);
        ``base_id``: the base model's Hub id, where a file names it."""
        raise NotImplementedError

    def card(self, config, merged: bool) -> CardText:
        raise NotImplementedError

    def updates(self, folder: Path, config, model):
        """The weight change the run makes, per layer and projection (for ``analyze``; see
        :mod:`neuronreg.analysis.updates`)."""
        raise NotImplementedError
