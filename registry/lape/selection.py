"""LAPE selection (``lape.md`` section 2) from stored counts.

Everything is computed in float64. Two choices the method leaves open are fixed here:
* ``round`` is Python's (half to even), as in the reference code; each k is then clamped to
  ``[1, N]`` for ``kthvalue`` so that tiny models still get a threshold.
* ties in the entropy at the selection boundary are broken by the flat index, i.e. by layer, then
  by neuron: the lowest-indexed of equally scored neurons are taken. The result therefore does not
  depend on the sort algorithm, and is the same on every machine.
Languages are kept as a list of names, so a language that gets no neuron keeps its (empty) entry:
the reference code's ``split(bincount(...))`` shifts languages in that case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import SelectionError
from ..mask import NeuronMask


@dataclass(frozen=True)
class SelectionParams:
    top_rate: float = 0.01
    filter_rate: float = 0.95
    activation_bar_ratio: float = 0.95

    def __post_init__(self):
        for name in ("top_rate", "filter_rate", "activation_bar_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0
                                               and not math.isnan(value)):
                raise SelectionError(f"{name} must be a number between 0 and 1, got {value!r}.")
        if self.top_rate <= 0:
            raise SelectionError(f"top_rate must be above 0, got {self.top_rate!r}.")


@dataclass
class Selection:
    languages: list[str]
    params: SelectionParams
    num_layers: int
    intermediate_size: int
    filter_threshold: float  # t: kthvalue(p, round(N * filter_rate))
    activation_bar: float  # bar: kthvalue(p, round(N * activation_bar_ratio))
    selected: int  # neurons taken over all layers, before assignment to languages
    neurons: dict[str, NeuronMask] = field(default_factory=dict)  # per language, with entropy and probability
    entry: object = None  # the registry's SelectionEntry, once stored


def _kth(values: torch.Tensor, rate: float) -> float:
    n = values.numel()
    k = min(max(round(n * rate), 1), n)
    return float(torch.kthvalue(values, k).values)


def lape_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``H = -sum_k q log q`` with ``q = p / sum_k p``; 0 where a neuron never fires."""
    total = probs.sum(-1, keepdim=True)
    q = torch.where(total > 0, probs / torch.where(total > 0, total, 1.0), 0.0)
    # 0.0 - x rather than -x: a neuron of one language scores +0.0, not -0.0.
    return 0.0 - (q * torch.where(q > 0, q.log(), 0.0)).sum(-1)


def smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest values, ties broken by lowest index, in ascending index order."""
    n = values.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    if k >= n:
        return torch.arange(n)
    cut = torch.kthvalue(values, k).values
    below = (values < cut).nonzero().squeeze(1)
    at = (values == cut).nonzero().squeeze(1)[: k - below.numel()]
    return torch.cat([below, at]).sort().values


def select_neurons(
    over_zero: torch.Tensor, tokens: torch.Tensor, languages: list[str], params: SelectionParams = SelectionParams(),
    model: str = "",
) -> Selection:
    """Select language-specific neurons from ``over_zero [L, I, K]`` and ``tokens [K]``."""
    if over_zero.dim() != 3:
        raise SelectionError(f"counts must be [layers, neurons, languages], got shape {tuple(over_zero.shape)}.")
    num_layers, inter, num_langs = over_zero.shape
    if num_langs != len(languages) or tokens.numel() != num_langs:
        raise SelectionError(f"{num_langs} count columns, {tokens.numel()} token totals and {len(languages)} "
                             "languages.")
    if num_langs == 0:
        raise SelectionError("No languages to select from; compute counts first.")
    if bool((tokens <= 0).any()):
        empty = [lang for lang, n in zip(languages, tokens.tolist()) if n <= 0]
        raise SelectionError(f"No tokens were counted for {', '.join(empty)}; recompute them.")
    if bool((over_zero < 0).any()) or bool((over_zero > tokens.view(1, 1, -1)).any()):
        raise SelectionError("Counts outside [0, tokens]: the stored counts are damaged; recompute them.")

    probs = over_zero.double() / tokens.double().view(1, 1, -1)
    entropy = lape_entropy(probs)
    flat = probs.flatten()
    threshold = _kth(flat, params.filter_rate)
    entropy[(probs > threshold).sum(-1) == 0] = math.inf
    if params.activation_bar_ratio == params.filter_rate:
        bar = threshold
    else:
        bar = _kth(flat, params.activation_bar_ratio)
    del flat

    chosen = smallest(entropy.flatten(), round(num_layers * inter * params.top_rate))
    layer, neuron = chosen // inter, chosen % inter
    chosen_probs = probs[layer, neuron]  # [n, K]
    chosen_entropy = entropy[layer, neuron]
    selection = Selection(list(languages), params, num_layers, inter, threshold, bar, int(chosen.numel()))
    for k, lang in enumerate(languages):
        keep = chosen_probs[:, k] > bar
        selection.neurons[lang] = NeuronMask(model, lang, num_layers, inter, layer[keep], neuron[keep],
                                             chosen_entropy[keep], chosen_probs[keep, k])
    return selection
