"""The dense baselines of the seed paper: ``ffn`` (every MLP weight) and ``full`` (every weight).

The optimizer always updates float32 weights: for a model in a lower precision it holds float32 master
copies of the trainable weights (:class:`MasterWeights`); the gradients of the model's weights are handed
to them after the backward pass, and after each step the masters are copied (rounded) into the model for
the next forward pass, so an update smaller than the model dtype's rounding step accumulates instead of
vanishing. The run folder holds the trained model (``model/``), saved in the merge dtype (default: the
model's), with what that rounding lost recorded in the run config.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import FinetuneError
from ..layouts import BY_NAME as LAYOUTS
from ..runs import FULL_MODEL_DIR
from .merging import MergeTally, cast_model, exact, save_dtype_of, save_pretrained
from .method import CardText, FinetuneMethod, Trained, register_method


class MasterWeights:
    """float32 master copies of a dense run's trainable weights when the model computes in a lower
    precision (weights already float32 are their own masters).

    The optimizer, clipping, weight decay and checkpoints see only the masters (``named``). The model's
    own weights keep ``requires_grad`` (so backward, and DDP's reduction, work as ever);
    :meth:`take_grads` hands their gradients to the masters in float32 and :meth:`to_model` copies the
    masters back into the model, rounded to its dtype, for the next forward pass."""

    def __init__(self, named: dict[str, torch.nn.Parameter]):
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        self.named: dict[str, torch.nn.Parameter] = {}
        self.model_weights = named
        for name, p in named.items():
            if p.dtype == torch.float32:
                self.named[name] = p
            else:
                master = torch.nn.Parameter(p.detach().float().clone())
                self.pairs.append((p, master))
                self.named[name] = master

    def take_grads(self) -> None:
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    def to_model(self) -> None:
        with torch.no_grad():
            for p, master in self.pairs:
                p.copy_(master)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The model's trainable weights as they are now, on the CPU (in the model's dtype)."""
        return {name: p.detach().cpu().clone() for name, p in self.model_weights.items()}


class _DenseTrained(Trained):
    find_unused = True  # a dense run's weights may get no gradient in a step (DDP must not wait for them)

    def __init__(self, masters: MasterWeights, save_dtype: torch.dtype):
        self.masters = masters
        # The trained weights are saved in save_dtype: what that rounding loses is measured against the
        # weights the run started from (kept on the CPU only when there is rounding to measure).
        self.initial = masters.snapshot() if save_dtype != torch.float32 else None

    @property
    def named(self) -> dict:
        return self.masters.named

    def after_backward(self) -> None:
        self.masters.take_grads()

    def after_update(self) -> None:
        self.masters.to_model()

    def save(self, out: Path, loaded, config, settings, save_dtype):
        info = _store(loaded.model, self.masters, self.initial, save_dtype)
        save_pretrained(loaded.model, loaded.tokenizer, out / FULL_MODEL_DIR)
        return info


def _store(model, masters: MasterWeights, initial: dict | None, dtype: torch.dtype):
    """The trained weights (the float32 masters) stored in ``dtype`` in the model, and what that rounding
    lost against the weights the run started from."""
    # Weights that are their own masters (a float32 model) are cast with the model: keep their values.
    trained = {name: m.detach().clone() if m is masters.model_weights[name] and m.dtype != dtype else m
               for name, m in masters.named.items()}
    cast_model(model, dtype)
    tally = MergeTally(dtype, operation="save")
    with torch.no_grad():
        for name, weight in masters.model_weights.items():
            master = trained[name]
            weight.copy_(master)
            if initial is not None:
                tally.add(initial[name], weight.detach().cpu(), target=master.detach().cpu())
    return tally.info() if initial is not None else exact(dtype)


@register_method
class FfnMethod(FinetuneMethod):
    """Every weight of every MLP (dense ``requires_grad``), as float32 masters."""

    name = "ffn"
    kind = "dense"
    trains = "every MLP weight (a baseline)"
    run_files = (FULL_MODEL_DIR,)

    def trainable(self, model, sites) -> dict[str, torch.nn.Parameter]:
        wanted = set()
        for site in sites:
            modules = [site.projection, getattr(site.mlp, LAYOUTS[site.layout].second)]
            if site.layout == "gated":
                modules.append(site.mlp.up_proj)
            for module in modules:
                wanted.update(id(p) for p in module.parameters())
        return {n: p for n, p in model.named_parameters() if id(p) in wanted}

    def attach(self, loaded, settings, mask, options) -> Trained:
        named = self.trainable(loaded.model, loaded.sites)
        for n, p in loaded.model.named_parameters():
            p.requires_grad_(n in named)
        return _DenseTrained(MasterWeights(named), save_dtype_of(settings, loaded))

    def tuned_model(self, folder: Path, config, load, *, base=None, allow_other_base: bool = False):
        from ..models import load_model
        from ..resolve import ModelRef

        weights = folder / FULL_MODEL_DIR if (folder / FULL_MODEL_DIR).is_dir() else folder
        ref = ModelRef(config.base_model.name, str(weights.resolve()), None, True)
        load = load.but(dtype=load.dtype or config.training.dtype, device_map=None)
        return load_model(ref, load, tokenizer=False).model

    def on_base(self, model, folder: Path, config, load):
        del model  # the run's own weights are the model: the base in memory is not needed
        return self.tuned_model(folder, config, load)

    def apply(self, model, folder: Path, config):
        raise FinetuneError(f"{folder} is a {config.subset} run: its trained weights are the model, not a change "
                            "to put on a base.", fix="dense_run",
                            advice="Load it with neuronreg.load_sparse_model(run), which loads its weights.")

    def merge(self, model, folder: Path, config, dtype):
        raise FinetuneError(f"{folder} is a {config.subset} run: its trained weights are the model; there is "
                            "nothing to merge.", fix="dense_run")

    def check_run(self, folder: Path, config) -> None:
        weights = folder / FULL_MODEL_DIR
        if not weights.is_dir() or not (weights / "config.json").is_file():
            raise FinetuneError(f"{folder} has no {FULL_MODEL_DIR}/ folder; the run did not finish.", fix="run_folder")
        files = [p for p in weights.iterdir() if p.suffix == ".safetensors"]
        if not files or any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in weights.iterdir()):
            raise FinetuneError(f"{weights} must hold its weights as safetensors only.", fix="run_folder")
        from .validate import check_finite_safetensors

        for path in files:
            check_finite_safetensors(path)

    def release_files(self, folder: Path, config, staging: Path, merged: bool) -> dict[str, Path]:
        weights = folder / FULL_MODEL_DIR
        if not weights.is_dir():
            raise FinetuneError(f"{folder} has no {FULL_MODEL_DIR}/ folder; the run did not finish.", fix="run_folder")
        return {path.name: path for path in sorted(weights.iterdir())
                if path.is_file() and not path.is_symlink() and path.name not in ("README.md",)}

    def card(self, config, merged: bool) -> CardText:
        return CardText("dense", self.trains, library="transformers", relation="finetune")

    def updates(self, folder: Path, config, model):
        """tuned - base for every weight of the MLPs (``model`` is the base)."""
        from ..analysis.updates import DenseUpdate, mlp_weights

        tuned = self.tuned_model(folder, config, _cpu(config))
        return DenseUpdate(mlp_weights(model), mlp_weights(tuned))


@register_method
class FullMethod(FfnMethod):
    """Every weight of the model."""

    name = "full"
    trains = "every weight (a baseline)"

    def trainable(self, model, sites) -> dict[str, torch.nn.Parameter]:
        return dict(model.named_parameters())


def _cpu(config):
    from ..options import LoadOptions

    return LoadOptions(device="cpu", dtype=config.training.dtype)
