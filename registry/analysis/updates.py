"""Weight updates of fine-tuning runs, per layer and MLP projection, for every kind of run alike.

Every update is read as ``dW``, a float32 matrix of the projection's shape in ``nn.Linear`` orientation
``[out, in]`` (GPT-2's Conv1D weights are transposed into it), so that row ``j`` of a first projection
and column ``j`` of the second belong to neuron ``j``. Projections are named by their role: ``gate``,
``up``, ``down`` for gated MLPs (Phi-3's fused ``gate_up_proj`` split into its gate rows ``0..I-1`` and
up rows ``I..2I-1``), ``in`` and ``down`` for plain MLPs. Biases are not analysed.

The three forms of ``dW``:

* :class:`RowSparseUpdate` (``delta.safetensors`` of a lape/random run): zero but for the trained
  neurons' rows of ``gate``/``up`` (``in``) and their columns of ``down``.
* :class:`LowRankUpdate` (a LoRA adapter): ``dW = B @ A * scale`` with ``A [r, in]``, ``B [out, r]`` and
  scale = alpha / r (alpha / sqrt(r) with rsLoRA). PEFT keeps A and B in these shapes also with
  ``fan_in_fan_out`` (a base weight stored ``[in, out]``, as GPT-2's): only the base weight is stored
  transposed, and :func:`mlp_weights` reads it in ``[out, in]`` order, so ``B @ A * scale`` is ``dW`` in
  both cases.
* :class:`DenseUpdate` (a full or FFN run): ``dW = tuned - base``, each in float32.

What :func:`analyse_update` computes, with ``W`` the base weight (sums in float64):

* per layer and projection: ``update_norm`` = ||dW||_F, ``base_norm`` = ||W||_F, ``relative`` = their ratio;
* per neuron ``j`` of a layer: its squared update norm x_j = ||dW_gate[j, :]||^2 + ||dW_up[j, :]||^2 +
  ||dW_down[:, j]||^2 (plain MLPs: the ``in`` row and the ``down`` column); :class:`NeuronSpread` of the
  x_j, per layer and over all neurons of all layers:

  * ``touched``: neurons with x_j > 0;
  * ``top_share``: the share of sum(x) held by the ceil(``top`` * n) neurons with the largest x_j
    (``top`` = 0.01: the top 1%, about as many neurons as LAPE selects);
  * ``effective_neurons`` = exp(H) with H = -sum p_j ln p_j, p_j = x_j / sum(x) (0 ln 0 = 0): as many
    neurons as, sharing the update equally, would give the same entropy; ``entropy`` = H / ln n, from 0
    (one neuron holds all) to 1 (all neurons hold the same);
  * ``gini`` = sum_i sum_k |x_i - x_k| / (2 n sum(x)) (Gini coefficient), from 0 (all equal) to
    1 - 1/n (one neuron holds all).

  With no update at all (sum(x) = 0) the shares, entropy and gini are None.

:func:`mask_share` then asks how much of the update falls on a mask's neurons (a language's LAPE
neurons): ``share`` = sum of x_j over the mask / sum of all x_j, against random neurons of the same
count per layer (k_l of the layer's n_l, uniformly without replacement, layers independent):

* exact expectation: E[share] = sum_l (k_l / n_l) S_l / S with S_l the layer's sum of x and S the total;
* exact standard deviation: Var[share] = sum_l k_l (n_l - k_l) / (n_l - 1) * sigma_l^2 / S^2, sigma_l^2
  = the population variance (1/n_l) sum_j (x_j - mean_l)^2 (the variance of a sum drawn without
  replacement);
* an empirical distribution of ``draws`` random masks (``torch.Generator`` seeded with ``seed``; per
  draw and layer, the first k_l of a random permutation): its mean, sample sd, min and max, and
  ``p_random`` = (1 + draws with share >= the mask's) / (1 + draws).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import MaskError, SettingsError
from ..layouts import BY_NAME as LAYOUTS
from ..models import MLPSite, find_mlp_sites

GATED = ("gate", "up", "down")
PLAIN = ("in", "down")
SECOND = "down"  # the projection whose columns are neurons
TOP = 0.01


# -- the base weights --------------------------------------------------------------------------------------
def _unwrapped(module: nn.Module) -> nn.Module:
    """The projection under neuronreg's delta wrapper or a PEFT layer."""
    while True:
        get_base = getattr(module, "get_base_layer", None)
        if callable(get_base) and get_base() is not module:
            module = get_base()
        elif isinstance(getattr(module, "base", None), nn.Module) and hasattr(module, "delta"):
            module = module.base
        else:
            return module


def _linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` (a view; Conv1D's ``[in, out]`` transposed)."""
    module = _unwrapped(module)
    weight = module.weight
    return weight.T if type(module).__name__ == "Conv1D" else weight


def _projection_modules(site: MLPSite) -> dict[str, str]:
    """Role -> attribute on the MLP module."""
    layout = LAYOUTS[site.layout]
    if site.layout == "gated":
        return {"gate": "gate_proj", "up": "up_proj", "down": layout.second}
    if site.layout == "fused-gated":
        return {"gate_up": layout.first, "down": layout.second}
    return {"in": layout.first, "down": layout.second}


def mlp_weights(model: nn.Module, sites: list[MLPSite] | None = None) -> list[dict[str, torch.Tensor]]:
    """Per decoder layer, its MLP's base weights by role (``gate``/``up``/``down`` or ``in``/``down``), each
    ``[out, in]``: views of the model's weights (no copy), under any delta or adapter wrapper."""
    out = []
    for site in sites or find_mlp_sites(model):
        weights = {}
        for role, attribute in _projection_modules(site).items():
            weight = _linear_weight(getattr(site.mlp, attribute))
            if role == "gate_up":
                weights["gate"], weights["up"] = weight[:site.intermediate_size], weight[site.intermediate_size:]
            else:
                weights[role] = weight
        out.append(weights)
    return out


def _projection_paths(model: nn.Module, sites: list[MLPSite]) -> dict[str, tuple[int, str]]:
    """Module path of every MLP projection -> (layer, role; ``gate_up`` for a fused one)."""
    paths = {id(module): name for name, module in model.named_modules()}
    out = {}
    for site in sites:
        for role, attribute in _projection_modules(site).items():
            out[f"{paths[id(site.mlp)]}.{attribute}"] = (site.layer, role)
    return out


# -- the three forms ---------------------------------------------------------------------------------------
@dataclass
class RowSparseLayer:
    """One layer's trained neurons: ``rows[role]`` ``[k, hidden]`` (gate, up or in) and ``down`` ``[hidden, k]``."""

    neurons: torch.Tensor  # int64 [k]
    rows: dict[str, torch.Tensor]
    down: torch.Tensor


@dataclass
class RowSparseUpdate:
    """A row-sparse update (see the module's definitions): the layers that have neurons."""

    layers: dict[int, RowSparseLayer]
    kind: str = "row-sparse"

    def delta(self, layer: int, role: str, shape: torch.Size) -> torch.Tensor | None:
        found = self.layers.get(layer)
        if found is None:
            return None
        out = torch.zeros(shape, dtype=torch.float32)
        if role == SECOND:
            out[:, found.neurons] = found.down.float()
        elif role in found.rows:
            out[found.neurons] = found.rows[role].float()
        else:
            return None
        return out


def row_sparse_update(tensors: Mapping[str, torch.Tensor], model: nn.Module) -> RowSparseUpdate:
    """The update a ``delta.safetensors`` holds (its tensors, keyed by the base ``model``'s MLP paths)."""
    sites = find_mlp_sites(model)
    paths = {id(module): name for name, module in model.named_modules()}
    by_prefix = {paths[id(site.mlp)]: site for site in sites}
    layers = {}
    for name in tensors:
        if not name.endswith(".neurons"):
            continue
        prefix = name[: -len(".neurons")]
        site = by_prefix.get(prefix)
        if site is None:
            raise MaskError(f"The delta holds {prefix}, which this model does not have; it is for another model.")
        roles = ("gate", "up") if site.layout in ("gated", "fused-gated") else ("in",)
        try:
            rows = {role: tensors[f"{prefix}.{role}_delta"] for role in roles}
            down = tensors[f"{prefix}.down_delta"]
        except KeyError as exc:
            raise MaskError(f"The delta file lacks {exc.args[0]}; it is damaged or from another layout.") from None
        layers[site.layer] = RowSparseLayer(tensors[name].to(torch.long), rows, down)
    return RowSparseUpdate(layers)


@dataclass
class LowRankUpdate:
    """A low-rank update: ``factors[(layer, role)] = (A [r, in], B [out, r], scale)``, dW = B @ A * scale."""

    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]
    kind: str = "low-rank"
    skipped: list[str] = field(default_factory=list)  # adapted modules that are not MLP projections

    def delta(self, layer: int, role: str, shape: torch.Size) -> torch.Tensor | None:
        found = self.factors.get((layer, role))
        if found is None:
            return None
        a, b, scale = found
        out = (b.float() @ a.float()) * scale
        if tuple(out.shape) != tuple(shape):
            raise SettingsError(f"The low-rank update of layer {layer} {role} has shape {tuple(out.shape)}, the "
                                f"weight {tuple(shape)}; it is for another model.")
        return out


def low_rank_update(tensors: Mapping[str, torch.Tensor], config: Mapping, model: nn.Module) -> LowRankUpdate:
    """The update a PEFT LoRA adapter holds: its ``adapter_model.safetensors`` tensors and its
    ``adapter_config.json`` (as a dict), on the base ``model`` (not wrapped). Adapted modules that are
    not MLP projections are listed in ``skipped``. SettingsError for what is not plain LoRA (DoRA,
    per-module ranks or alphas)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise SettingsError(f"The adapter is {config.get('peft_type')}, not LoRA; its update is not B @ A.")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise SettingsError(f"The adapter sets {key}; only plain LoRA updates (B @ A * alpha / r) are read.")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    sites = find_mlp_sites(model)
    projections = _projection_paths(model, sites)
    sizes = {site.layer: site.intermediate_size for site in sites}
    factors, skipped = {}, []
    for name in sorted(tensors):
        if not name.endswith(".lora_A.weight"):
            continue
        module = name[: -len(".lora_A.weight")]
        path = module.removeprefix("base_model.model.")
        a, b = tensors[name], tensors.get(f"{module}.lora_B.weight")
        if b is None:
            raise SettingsError(f"The adapter has {name} but no lora_B; it is damaged.")
        if a.shape[0] != r:
            raise SettingsError(f"{name} has rank {a.shape[0]}, the adapter config says r={r}.")
        if path not in projections:
            skipped.append(path)
            continue
        layer, role = projections[path]
        if role == "gate_up":
            size = sizes[layer]
            factors[(layer, "gate")], factors[(layer, "up")] = (a, b[:size], scale), (a, b[size:], scale)
        else:
            factors[(layer, role)] = (a, b, scale)
    return LowRankUpdate(factors, skipped=skipped)


@dataclass
class DenseUpdate:
    """A dense update: dW = ``tuned[layer][role]`` - ``base[layer][role]``, each in float32."""

    base: Sequence[Mapping[str, torch.Tensor]]
    tuned: Sequence[Mapping[str, torch.Tensor]]
    kind: str = "dense"

    def delta(self, layer: int, role: str, shape: torch.Size) -> torch.Tensor | None:
        tuned, base = self.tuned[layer][role], self.base[layer][role]
        if tuple(tuned.shape) != tuple(shape) or tuple(base.shape) != tuple(shape):
            raise SettingsError(f"Layer {layer} {role}: the tuned weight is {tuple(tuned.shape)}, the base "
                                f"{tuple(base.shape)}; they are not one model's.")
        return tuned.detach().float().cpu() - base.detach().float().cpu()


# -- what the analysis gives ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectionNorm:
    """||dW||_F, ||W||_F and their ratio for one projection of one layer."""

    layer: int
    projection: str
    update_norm: float
    base_norm: float
    relative: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NeuronSpread:
    """How the squared update norm spreads over neurons: one layer's, or all layers' (``layer`` None)."""

    layer: int | None
    neurons: int
    touched: int
    squared_norm: float  # sum of x_j
    top_fraction: float
    top_neurons: int  # ceil(top_fraction * neurons)
    top_share: float | None
    effective_neurons: float | None
    entropy: float | None
    gini: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def neuron_spread(squares: torch.Tensor, layer: int | None = None, top: float = TOP) -> NeuronSpread:
    """:class:`NeuronSpread` of per-neuron squared norms ``squares`` (see the module's definitions)."""
    if not 0 < top <= 1:
        raise SettingsError(f"top must be in (0, 1], not {top}.")
    x = squares.double().flatten()
    n = x.numel()
    total = float(x.sum())
    top_neurons = max(1, math.ceil(top * n))
    touched = int((x > 0).sum())
    if total == 0.0:
        return NeuronSpread(layer, n, touched, 0.0, top, top_neurons, None, None, None, None)
    top_share = float(x.topk(top_neurons).values.sum()) / total
    p = x[x > 0] / total
    entropy_nats = float(-(p * p.log()).sum())
    ordered = x.sort().values
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    gini = float(2.0 * (ranks * ordered).sum() / (n * total) - (n + 1) / n)
    return NeuronSpread(layer, n, touched, total, top, top_neurons, top_share, math.exp(entropy_nats),
                        entropy_nats / math.log(n) if n > 1 else 0.0, gini)


@dataclass
class UpdateAnalysis:
    """One update against its base: per projection norms, per layer and overall neuron spread, and the
    per-neuron squared norms (``neuron_squares[l]``, float64 ``[n_l]``) for :func:`mask_share`."""

    kind: str
    projections: list[ProjectionNorm]
    layers: list[NeuronSpread]
    overall: NeuronSpread
    update_norm: float  # over every analysed weight: sqrt(sum of ||dW||_F^2)
    base_norm: float
    neuron_squares: list[torch.Tensor] = field(repr=False, default_factory=list)

    @property
    def relative(self) -> float:
        return self.update_norm / self.base_norm

    def to_dict(self) -> dict:
        return {"kind": self.kind, "update_norm": self.update_norm, "base_norm": self.base_norm,
                "relative": self.relative, "overall": self.overall.to_dict(),
                "layers": [s.to_dict() for s in self.layers], "projections": [p.to_dict() for p in self.projections]}


def analyse_update(base: Sequence[Mapping[str, torch.Tensor]], update, top: float = TOP) -> UpdateAnalysis:
    """Norms and spread of ``update`` (a :class:`RowSparseUpdate`, :class:`LowRankUpdate` or
    :class:`DenseUpdate`) on ``base`` (:func:`mlp_weights`), one layer at a time (see the module's
    definitions). A projection the update does not touch counts as dW = 0."""
    projections, spreads, squares = [], [], []
    update_total, base_total = 0.0, 0.0
    for layer, weights in enumerate(base):
        neurons = weights[SECOND].shape[1]
        per_neuron = torch.zeros(neurons, dtype=torch.float64)
        for role, weight in weights.items():
            w = weight.detach().cpu().double()
            d = update.delta(layer, role, weight.shape)
            d = torch.zeros_like(w) if d is None else d.double()
            d2 = d * d
            per_neuron += d2.sum(0) if role == SECOND else d2.sum(1)
            update_sq, base_sq = float(d2.sum()), float((w * w).sum())
            update_total, base_total = update_total + update_sq, base_total + base_sq
            projections.append(ProjectionNorm(layer, role, math.sqrt(update_sq), math.sqrt(base_sq),
                                              math.sqrt(update_sq) / math.sqrt(base_sq) if base_sq else math.nan))
        squares.append(per_neuron)
        spreads.append(neuron_spread(per_neuron, layer, top))
    overall = neuron_spread(torch.cat(squares), None, top)
    return UpdateAnalysis(update.kind, projections, spreads, overall, math.sqrt(update_total), math.sqrt(base_total),
                          squares)


# -- the share on a mask ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShare:
    """One layer: the mask's k neurons of n, their share of the layer's squared update norm, and k / n
    (what random neurons get on average)."""

    layer: int
    neurons: int
    share: float | None  # None when the layer has no update
    expected: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MaskShare:
    """The share of the squared update norm on a mask's neurons against random neurons of the same
    count per layer (see the module's definitions)."""

    neurons: int
    share: float
    expected: float
    random_sd: float
    draws: int
    seed: int
    empirical_mean: float | None
    empirical_sd: float | None
    empirical_min: float | None
    empirical_max: float | None
    p_random: float | None
    layers: list[LayerShare]

    @property
    def ratio(self) -> float:
        """share / expected: how many times what random neurons get."""
        return self.share / self.expected if self.expected else math.nan

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ratio"] = self.ratio
        return out


def _mask_indices(mask: Sequence, squares: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if len(mask) != len(squares):
        raise MaskError(f"The mask has {len(mask)} layers, the update {len(squares)}.")
    out = []
    for layer, (ids, x) in enumerate(zip(mask, squares)):
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= x.numel()):
            raise MaskError(f"Layer {layer} of the mask has neuron ids outside 0..{x.numel() - 1}.")
        if ids.unique().numel() != ids.numel():
            raise MaskError(f"Layer {layer} of the mask lists a neuron twice.")
        out.append(ids)
    return out


def mask_share(neuron_squares: Sequence[torch.Tensor], mask: Sequence, *, draws: int = 1000, seed: int = 0
               ) -> MaskShare:
    """The share of the update on ``mask``'s neurons (``mask[l]``: layer l's neuron ids, e.g.
    ``NeuronMask.per_layer()``) from ``neuron_squares`` (:attr:`UpdateAnalysis.neuron_squares`), its exact
    random expectation and sd, and ``draws`` seeded random masks (0: none)."""
    if draws < 0:
        raise SettingsError(f"draws must be 0 or more, not {draws}.")
    squares = [x.double().flatten() for x in neuron_squares]
    ids = _mask_indices(mask, squares)
    total = float(sum(float(x.sum()) for x in squares))
    if total == 0.0:
        raise SettingsError("The update is zero everywhere; no share of it can fall on any neuron.")
    layers, on_mask, expected, variance = [], 0.0, 0.0, 0.0
    for layer, (x, chosen) in enumerate(zip(squares, ids)):
        n, k, layer_total = x.numel(), chosen.numel(), float(x.sum())
        picked = float(x[chosen].sum())
        on_mask += picked
        expected += k / n * layer_total
        if n > 1:
            variance += k * (n - k) / (n - 1) * float(((x - x.mean()) ** 2).mean())
        layers.append(LayerShare(layer, k, picked / layer_total if layer_total else None, k / n))
    share = on_mask / total
    stats = [None] * 5
    if draws:
        generator = torch.Generator().manual_seed(seed)
        sums = torch.zeros(draws, dtype=torch.float64)
        for x, chosen in zip(squares, ids):
            k = chosen.numel()
            if k:
                picks = torch.rand(draws, x.numel(), generator=generator).argsort(dim=1)[:, :k]
                sums += x[picks].sum(1)
        random_shares = sums / total
        above = int((random_shares >= share).sum())
        stats = [float(random_shares.mean()), float(random_shares.std()) if draws > 1 else None,
                 float(random_shares.min()), float(random_shares.max()), (1 + above) / (1 + draws)]
    return MaskShare(int(sum(c.numel() for c in ids)), share, expected / total, math.sqrt(variance) / total, draws,
                     seed, *stats, layers)
