"""Row-sparse deltas on a language's neurons: train, save, load and merge only that subnetwork; the
methods ``lape`` (the language's LAPE neurons) and ``random`` (as many per layer, drawn: the control).

For neuron ``j`` of layer ``l`` the trainable weights are row ``j`` of the MLP's first projection(s)
(``gate_proj`` and ``up_proj``; rows ``j`` and ``I + j`` of a fused ``gate_up_proj``; ``c_fc``/``fc1``/
``dense_h_to_4h`` of plain MLPs, with its bias entry) and column ``j`` of the second projection
(``down_proj``, ``c_proj``, ``fc2``, ``dense_4h_to_h``). They are never materialised as full matrices:
each projection is wrapped so that its output gets the delta's contribution added,

    first:  y = base(x), then y[..., idx] += x @ delta.T (+ bias_delta)      (index_add on the last dim)
    second: y = base(h) + h[..., idx] @ delta.T

so gradients and optimizer state exist only for ``[k_l, hidden]`` blocks, and the gradient of a
delta equals the gradient of the dense weight restricted to those rows/columns. Merging writes
``base + delta`` (computed in float32, rounded once into the weights' dtype) into the selected
rows/columns only, and measures what the rounding lost (:mod:`.merging`).

Deltas are float32 (a small master copy) whatever the model's dtype; they are cast to the
activations' dtype in the forward pass.

File format (``delta.safetensors``), per layer with at least one neuron, keyed by the MLP module's
path in the model (``model.layers.{l}.mlp`` for Llama):
``{mlp}.neurons [k]`` int64, gated: ``{mlp}.gate_delta [k, H]``, ``{mlp}.up_delta [k, H]``,
``{mlp}.down_delta [H, k]``; plain: ``{mlp}.in_delta [k, H]``, ``{mlp}.in_bias_delta [k]`` (when the
first projection has a bias), ``{mlp}.down_delta [H, k]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import FinetuneError, MaskError
from ..files import atomic_path
from ..layouts import BY_NAME as LAYOUTS
from ..models import MLPSite, find_mlp_sites
from ..runs import DELTA_FILE, MERGED_DIR, MergeInfo, NeuronCounts
from .merging import MergeTally, cast_model, save_pretrained
from .method import CardText, FinetuneMethod, Trained, register_method


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) stores its weight as [in, out], the transpose of nn.Linear."""
    return not isinstance(module, nn.Linear) and hasattr(module, "nf")


class _Wrapped(nn.Module):
    """A projection wrapped with a delta still answers to what code reads off projections
    (``models._out_features``, ``mask.check``): its base's weight and width."""

    base: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def nf(self) -> int:
        return self.base.out_features if isinstance(self.base, nn.Linear) else int(self.base.nf)


class RowDelta(_Wrapped):
    """A first projection whose output rows ``index`` get ``x @ delta.T`` (+ ``bias_delta``) added."""

    def __init__(self, base: nn.Module, index: torch.Tensor, hidden: int, bias: bool):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.register_buffer("index", index.to(device=device, dtype=torch.long), persistent=False)
        self.delta = nn.Parameter(torch.zeros(index.numel(), hidden, device=device, dtype=torch.float32))
        self.bias_delta = nn.Parameter(torch.zeros(index.numel(), device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        extra = x @ self.delta.to(x.dtype).T
        if self.bias_delta is not None:
            extra = extra + self.bias_delta.to(x.dtype)
        # In place: the projection's fresh output is saved by nothing (its weight is frozen), and an
        # out-of-place index_add would copy the whole [tokens, I] output in every forward.
        return y.index_add_(-1, self.index, extra.to(y.dtype))

    def merge_into_base(self, tally: MergeTally | None = None) -> nn.Module:
        if _is_conv1d(self.base):
            _merge_block(self.base.weight, 1, self.index, self.delta.T, tally)
        else:
            _merge_block(self.base.weight, 0, self.index, self.delta, tally)
        if self.bias_delta is not None:
            _merge_block(self.base.bias, 0, self.index, self.bias_delta, tally)
        return self.base


class ColumnDelta(_Wrapped):
    """A second projection whose input columns ``index`` get ``delta [out, k]``: base(h) + h[..., idx] @ delta.T."""

    def __init__(self, base: nn.Module, index: torch.Tensor, hidden: int):
        super().__init__()
        self.base = base
        device = base.weight.device
        self.register_buffer("index", index.to(device=device, dtype=torch.long), persistent=False)
        self.delta = nn.Parameter(torch.zeros(hidden, index.numel(), device=device, dtype=torch.float32))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        return y.add_((h.index_select(-1, self.index) @ self.delta.to(h.dtype).T).to(y.dtype))

    def merge_into_base(self, tally: MergeTally | None = None) -> nn.Module:
        if _is_conv1d(self.base):
            _merge_block(self.base.weight, 0, self.index, self.delta.T, tally)
        else:
            _merge_block(self.base.weight, 1, self.index, self.delta, tally)
        return self.base


def _merge_block(weight: torch.Tensor, dim: int, index: torch.Tensor, delta: torch.Tensor,
                 tally: MergeTally | None) -> None:
    """Rows (``dim`` 0) or columns (1) ``index`` of ``weight`` become base + delta, summed in float32 and
    rounded once into the weight's dtype."""
    with torch.no_grad():
        block = weight.index_select(dim, index)
        delta = delta.detach().to(device=block.device, dtype=torch.float32)
        merged = (block.float() + delta).to(weight.dtype)
        if tally is not None:
            tally.add(block, merged, change=delta)
        weight.index_copy_(dim, index, merged)


@dataclass
class LayerDelta:
    """The wrappers of one layer's MLP and which delta blocks they hold."""

    layer: int
    prefix: str  # the MLP module's path in the model
    mlp: nn.Module  # the module that holds the wrapped projections as attributes
    layout: str
    neurons: torch.Tensor  # int64 [k], sorted
    first: list[tuple[str, RowDelta]]  # (attribute name on the MLP, wrapper)
    second: tuple[str, ColumnDelta]

    def blocks(self) -> dict[str, torch.Tensor]:
        """This layer's tensors in the file format (detached, on CPU)."""
        k = self.neurons.numel()
        out = {f"{self.prefix}.neurons": self.neurons.cpu()}
        if self.layout == "fused-gated":
            delta = self.first[0][1].delta.detach().cpu()
            out[f"{self.prefix}.gate_delta"], out[f"{self.prefix}.up_delta"] = delta[:k], delta[k:]
        elif self.layout == "gated":
            out[f"{self.prefix}.gate_delta"] = self.first[0][1].delta.detach().cpu()
            out[f"{self.prefix}.up_delta"] = self.first[1][1].delta.detach().cpu()
        else:
            wrapper = self.first[0][1]
            out[f"{self.prefix}.in_delta"] = wrapper.delta.detach().cpu()
            if wrapper.bias_delta is not None:
                out[f"{self.prefix}.in_bias_delta"] = wrapper.bias_delta.detach().cpu()
        out[f"{self.prefix}.down_delta"] = self.second[1].delta.detach().cpu()
        return {name: t.contiguous() for name, t in out.items()}

    def load_blocks(self, tensors: dict[str, torch.Tensor]) -> None:
        p = self.prefix
        with torch.no_grad():
            if self.layout == "fused-gated":
                self.first[0][1].delta.copy_(torch.cat([tensors[f"{p}.gate_delta"], tensors[f"{p}.up_delta"]]))
            elif self.layout == "gated":
                self.first[0][1].delta.copy_(tensors[f"{p}.gate_delta"])
                self.first[1][1].delta.copy_(tensors[f"{p}.up_delta"])
            else:
                wrapper = self.first[0][1]
                wrapper.delta.copy_(tensors[f"{p}.in_delta"])
                if wrapper.bias_delta is not None:
                    wrapper.bias_delta.copy_(tensors[f"{p}.in_bias_delta"])
            self.second[1].delta.copy_(tensors[f"{p}.down_delta"])

    def parameters(self) -> list[nn.Parameter]:
        params = []
        for _, wrapper in self.first:
            params.append(wrapper.delta)
            if wrapper.bias_delta is not None:
                params.append(wrapper.bias_delta)
        params.append(self.second[1].delta)
        return params


def module_paths(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def attach_deltas(model: nn.Module, per_layer: list[torch.Tensor], sites: list[MLPSite] | None = None
                  ) -> list[LayerDelta]:
    """Wrap the projections of every layer with neurons in ``per_layer``; freeze everything else.

    Returns one :class:`LayerDelta` per layer that has at least one neuron. The deltas start at zero,
    so the model computes exactly what it computed before.
    """
    sites = sites or find_mlp_sites(model)
    if len(per_layer) != len(sites):
        raise MaskError(f"The neuron lists have {len(per_layer)} layers, but the model has {len(sites)}.")
    for p in model.parameters():
        p.requires_grad_(False)
    paths = module_paths(model)
    layers = []
    for site, neurons in zip(sites, per_layer):
        neurons = torch.as_tensor(neurons, dtype=torch.long).flatten()
        if neurons.numel() == 0:
            continue
        if int(neurons.min()) < 0 or int(neurons.max()) >= site.intermediate_size:
            raise MaskError(f"Layer {site.layer} has neuron ids outside 0..{site.intermediate_size - 1}.")
        if neurons.unique().numel() != neurons.numel():
            raise MaskError(f"Layer {site.layer} lists a neuron twice.")
        neurons = neurons.sort().values
        mlp = site.mlp
        first_name, second_name = LAYOUTS[site.layout].first, LAYOUTS[site.layout].second
        base_first = getattr(mlp, first_name)
        # in_features, not weight.shape[1]: a 4-bit projection (bitsandbytes) stores its weight packed
        hidden = base_first.in_features if isinstance(base_first, nn.Linear) else base_first.weight.shape[0]
        first: list[tuple[str, RowDelta]] = []
        if site.layout == "gated":
            for name in ("gate_proj", "up_proj"):
                first.append((name, RowDelta(getattr(mlp, name), neurons, hidden, bias=False)))
        elif site.layout == "fused-gated":
            index = torch.cat([neurons, neurons + site.intermediate_size])
            first.append((first_name, RowDelta(base_first, index, hidden, bias=False)))
        else:
            first.append((first_name, RowDelta(base_first, neurons, hidden, bias=getattr(base_first, "bias", None)
                                               is not None)))
        second = (second_name, ColumnDelta(getattr(mlp, second_name), neurons, hidden))
        for name, wrapper in [*first, second]:
            setattr(mlp, name, wrapper)
        layers.append(LayerDelta(site.layer, paths[id(mlp)], mlp, site.layout, neurons, first, second))
    return layers


def merge_deltas(layers: list[LayerDelta], dtype: torch.dtype | None = None) -> MergeInfo | None:
    """Add every delta into its base weight and put the plain projections back: a plain model again.

    The wrapped projections' weights are first stored in ``dtype`` (None: as they are); each merged row
    or column is base + delta summed in float32 and rounded once. Returns what the rounding lost (None
    when there was no layer). The rest of the model keeps its dtype: cast it with ``model.to(dtype)``.
    """
    if not layers:
        return None
    wrappers = [w for layer in layers for _, w in [*layer.first, layer.second]]
    dtype = dtype or wrappers[0].base.weight.dtype
    tally = MergeTally(dtype)
    for layer in layers:
        for name, wrapper in [*layer.first, layer.second]:
            with torch.no_grad():
                for p in wrapper.base.parameters():
                    p.data = p.data.to(dtype)
            setattr(layer.mlp, name, wrapper.merge_into_base(tally))
    return tally.info()


def delta_tensors(layers: list[LayerDelta]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        tensors.update(layer.blocks())
    return tensors


def per_layer_from_tensors(tensors: dict[str, torch.Tensor], model: nn.Module, sites: list[MLPSite]
                           ) -> list[torch.Tensor]:
    """The neuron ids per layer that a delta file holds, checked against the model's module paths."""
    paths = module_paths(model)
    prefixes = {paths[id(site.mlp)]: site.layer for site in sites}
    per_layer = [torch.zeros(0, dtype=torch.long) for _ in sites]
    for name, tensor in tensors.items():
        if not name.endswith(".neurons"):
            continue
        prefix = name[: -len(".neurons")]
        if prefix not in prefixes:
            raise MaskError(f"The delta holds {prefix}, which this model does not have; it is for another model.")
        per_layer[prefixes[prefix]] = tensor.to(torch.long)
    return per_layer


def apply_delta_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], merge: bool = False,
                        dtype: torch.dtype | None = None) -> list[LayerDelta] | MergeInfo | None:
    """Put a saved delta on ``model``: as trainable wrappers (returned), or merged into the weights
    (``merge``, stored in ``dtype``; returns what the rounding lost)."""
    sites = find_mlp_sites(model)
    per_layer = per_layer_from_tensors(tensors, model, sites)
    layers = attach_deltas(model, per_layer, sites)
    for layer in layers:
        expected = layer.blocks()
        for name, tensor in expected.items():
            if name not in tensors:
                raise MaskError(f"The delta file lacks {name}; it is damaged or from another layout.")
            if tuple(tensors[name].shape) != tuple(tensor.shape):
                raise MaskError(f"{name} has shape {tuple(tensors[name].shape)}, this model needs "
                                f"{tuple(tensor.shape)}; the delta is for another model.")
        layer.load_blocks(tensors)
    if merge:
        return merge_deltas(layers, dtype)
    return layers


def save_delta(layers: list[LayerDelta], path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(delta_tensors(layers), str(tmp), metadata={"neuronreg": json.dumps(metadata or {})})
    return path


def read_run_delta(folder: Path, config) -> dict[str, torch.Tensor]:
    """A run's delta tensors, validated against its config (:func:`.validate.read_delta`)."""
    from .validate import read_delta

    return read_delta(Path(folder) / DELTA_FILE, config)


# -- the methods --------------------------------------------------------------------------------------
class _DeltaTrained(Trained):
    def __init__(self, layers: list[LayerDelta], per_layer: list[torch.Tensor]):
        self.layers = layers
        self.per_layer = per_layer
        self._named = {f"{layer.prefix}.{i}": p for layer in layers for i, p in enumerate(layer.parameters())}

    @property
    def named(self) -> dict:
        return self._named

    def record(self) -> dict:
        return {"neurons": NeuronCounts(total=int(sum(t.numel() for t in self.per_layer)),
                                        per_layer=[int(t.numel()) for t in self.per_layer])}

    def save(self, out: Path, loaded, config, settings, save_dtype):
        save_delta(self.layers, out / DELTA_FILE, {"base_model": config.base_model.id or "",
                                                   "revision": config.base_model.revision or "",
                                                   "language": config.language.code})
        if not settings.merged:
            return None
        info = merge_deltas(self.layers, save_dtype)
        cast_model(loaded.model, save_dtype)
        save_pretrained(loaded.model, loaded.tokenizer, out / MERGED_DIR)
        return info


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


@register_method
class LapeMethod(FinetuneMethod):
    """The language's LAPE neurons: row-sparse deltas on their gate/up rows and down columns."""

    name = "lape"
    kind = "delta"
    trains = "the gate and up rows and down columns of its LAPE neurons, nothing else"
    needs_mask = True
    run_files = (DELTA_FILE,)

    def neurons(self, mask, settings) -> list[torch.Tensor]:
        return mask.per_layer()

    def attach(self, loaded, settings, mask, options) -> Trained:
        per_layer = self.neurons(mask, settings)
        return _DeltaTrained(attach_deltas(loaded.model, per_layer, loaded.sites), per_layer)

    def check_config(self, config, where: str) -> None:
        from ..errors import RecordError

        if config.neurons is None:
            raise RecordError(f"{where}: subset {self.name!r} needs the neurons it trained (neurons).")

    def apply(self, model, folder: Path, config):
        apply_delta_tensors(model, read_run_delta(folder, config))
        _freeze(model)
        return None

    def merge(self, model, folder: Path, config, dtype):
        info = apply_delta_tensors(model, read_run_delta(folder, config), merge=True, dtype=dtype)
        if dtype is not None:
            cast_model(model, dtype)
        _freeze(model)
        return model, info

    def check_run(self, folder: Path, config) -> None:
        read_run_delta(folder, config)

    def release_files(self, folder: Path, config, staging: Path, merged: bool) -> dict[str, Path]:
        if not (folder / DELTA_FILE).is_file():
            raise FinetuneError(f"{folder} has no {DELTA_FILE}; the run did not finish.", fix="run_folder")
        return {DELTA_FILE: folder / DELTA_FILE}

    def card(self, config, merged: bool) -> CardText:
        return CardText("delta", self.trains, library="transformers" if merged else None,
                        relation="merge" if merged else None)

    def updates(self, folder: Path, config, model):
        """The row-sparse change of every layer with neurons (``model`` is the base, for its module paths)."""
        from ..analysis.updates import row_sparse_update

        return row_sparse_update(read_run_delta(folder, config), model)


@register_method
class RandomMethod(LapeMethod):
    """The seed paper's control: as many neurons in each layer as the language's mask, drawn with the seed."""

    name = "random"
    trains = "a random neuron subset with the LAPE mask's count per layer (a control)"

    def neurons(self, mask, settings) -> list[torch.Tensor]:
        return mask.random_like(settings.seed).per_layer()
