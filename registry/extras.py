"""The optional parts of neuronreg and the packages they need: one table, one way to ask for them.

``pip install neuronreg`` runs the main job (compute, select, ls, show, fetch, import, export, ablate,
finetune of the neurons, evaluate); each extra adds what one feature needs. A feature imports its package
through :func:`require` inside the function that uses it, never at the top of a module, so a missing
extra costs nothing until that feature runs, and then is one line saying what to install.
pyproject.toml's ``[project.optional-dependencies]`` must name the same packages (a test checks).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from .errors import MissingExtra


@dataclass(frozen=True)
class Extra:
    name: str  # pip install 'neuronreg[<name>]'
    modules: tuple[str, ...]  # what it makes importable, for neuronreg's use
    packages: tuple[str, ...]  # the distributions pyproject.toml lists for it (without versions)
    feature: str  # what it is for, as the README says


EXTRAS = {extra.name: extra for extra in [
    Extra("plots", ("matplotlib", "PIL"), ("matplotlib", "pillow"),
          "figures: ablate/overlap/report/analyze/steer-eval PNGs (skipped without it), publish's card plots"),
    Extra("steer", ("py3langid",), ("py3langid",), "steer-eval's language identifier"),
    Extra("peft", ("peft",), ("peft",), "finetune --subset lora and ia3 (and loading, merging, releasing them)"),
    Extra("eval", ("lm_eval", "sacrebleu"), ("lm_eval", "sacrebleu"),
          "evaluate --tasks (lm-evaluation-harness benchmarks)"),
    Extra("quantize", ("bitsandbytes",), ("bitsandbytes",), "finetune --quantize 4bit (a 4-bit frozen base)"),
    Extra("gpu", ("accelerate", "triton"), ("accelerate", "triton"),
          "--device-map auto (accelerate) and the fused CUDA counting kernel (Triton)"),
]}


def require(module: str, extra: str, needs: str) -> ModuleType:
    """The module ``module``, imported; MissingExtra when it cannot be: ``needs`` says what wanted it
    ("LoRA and IA3 need peft").

    Any ImportError counts, not only the module's own absence: a package whose own dependency is
    missing is fixed by the same install (the cause stays chained for NEURONREG_DEBUG)."""
    if extra not in EXTRAS:
        raise KeyError(f"{extra!r} is not one of neuronreg's extras ({', '.join(EXTRAS)})")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{needs}, which is not installed: pip install 'neuronreg[{extra}]'.") from exc
