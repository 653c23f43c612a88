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
from contextlib import contextmanager
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


# Float64 values held at once while streaming over the neurons: the [L, I, K] probabilities of an 8B
# model at 130 languages are 477 MB, and the entropy's temporaries several times that. A block of 512 KiB
# stays in the cache; on such blocks, splitting each operation over threads costs more than it gains
# (measured on 32 x 14,336 x 32 counts: 0.28 s of CPU on one thread against 0.81 s for the whole tensor
# at once, and 1.6 to 3.4 s with blocks on two threads), so the blocks run on one thread.
CHUNK_VALUES = 1 << 16
SAMPLE_VALUES = 1 << 16  # probabilities sampled (at most 1 in 16) to bracket a quantile before the exact pass


def select_neurons(
    over_zero: torch.Tensor, tokens: torch.Tensor, languages: list[str], params: SelectionParams = SelectionParams(),
    model: str = "", chunk_values: int = CHUNK_VALUES,
) -> Selection:
    """Select language-specific neurons from ``over_zero [L, I, K]`` (any integer type) and ``tokens [K]``.

    The probabilities are never all held at once: they are computed (elementwise, so bit for bit the same
    numbers) a block of neurons at a time, ``chunk_values`` at most, and each quantile is the exact k-th
    value, found among the probabilities inside a bracket that a sample of them gives.
    """
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
    counts = over_zero.reshape(num_layers * inter, num_langs)
    if counts.numel() and (bool((counts.amin(0) < 0).any()) or bool((counts.amax(0) > tokens.view(-1)).any())):
        raise SelectionError("Counts outside [0, tokens]: the stored counts are damaged; recompute them.")

    denominator = tokens.double().view(1, -1)
    step = max(1, chunk_values // num_langs)
    blocks = [(start, min(start + step, counts.shape[0])) for start in range(0, counts.shape[0], step)]

    def probabilities(start: int, stop: int) -> torch.Tensor:
        return counts[start:stop].double() / denominator  # elementwise: the same numbers in any block

    entropy = torch.empty(counts.shape[0], dtype=torch.float64)
    highest = torch.empty(counts.shape[0], dtype=torch.float64)
    quantiles = _Quantiles(counts, denominator, {params.filter_rate, params.activation_bar_ratio})
    with one_thread():
        for start, stop in blocks:
            probs = probabilities(start, stop)
            entropy[start:stop] = lape_entropy(probs)
            highest[start:stop] = probs.amax(-1)
            quantiles.add(probs)
        while not quantiles.done():  # a bracket the sample got wrong: another pass, with it opened
            for start, stop in blocks:
                quantiles.add(probabilities(start, stop))
    threshold, bar = quantiles.found[params.filter_rate], quantiles.found[params.activation_bar_ratio]
    entropy[highest <= threshold] = math.inf  # no language's probability above the threshold
    del highest

    chosen = smallest(entropy, round(num_layers * inter * params.top_rate))
    layer, neuron = chosen // inter, chosen % inter
    chosen_probs = counts[chosen].double() / denominator  # [n, K]
    chosen_entropy = entropy[chosen]
    selection = Selection(list(languages), params, num_layers, inter, threshold, bar, int(chosen.numel()))
    for k, lang in enumerate(languages):
        keep = chosen_probs[:, k] > bar
        selection.neurons[lang] = NeuronMask(model, lang, num_layers, inter, layer[keep], neuron[keep],
                                             chosen_entropy[keep], chosen_probs[keep, k])
    return selection


@contextmanager
def one_thread():
    """torch's intra-op threads set to one for the block, and set back after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Quantiles:
    """``_kth(all probabilities, rate)`` for each rate, exactly, from the probabilities given a block at a time.

    A strided sample of the probabilities brackets each quantile; a pass counts the values below the
    bracket and keeps those inside it, and the k-th value is the (k - below)-th of those. When the
    bracket missed (a sample unlike the whole), :meth:`done` opens it on the side that missed, up to
    the whole range, and asks for another pass: the answer is exact in every case.
    """

    def __init__(self, counts: torch.Tensor, denominator: torch.Tensor, rates):
        total = counts.numel()
        self.wanted = {rate: min(max(round(total * rate), 1), total) for rate in rates}
        picked = torch.arange(0, total, max(16, total // SAMPLE_VALUES))  # every n-th flat probability
        sample = (counts.flatten()[picked].double() / denominator.flatten()[picked % counts.shape[1]]).sort().values
        margin = 8 * math.sqrt(0.25 / sample.numel()) + 2 / sample.numel()  # 8 standard errors, at worst
        self.brackets = {}
        for rate, k in self.wanted.items():
            q = k / total
            low = float(sample[int((q - margin) * sample.numel())]) if q - margin > 0 else -math.inf
            high = float(sample[min(int((q + margin) * sample.numel()), sample.numel() - 1)]) \
                if q + margin < 1 else math.inf
            self.brackets[rate] = (low, high)
        self.found: dict[float, float] = {}
        self._reset()

    def _reset(self) -> None:
        self.below = {rate: 0 for rate in self.wanted if rate not in self.found}
        self.inside = {rate: [] for rate in self.below}

    def add(self, probs: torch.Tensor) -> None:
        for rate in self.below:
            low, high = self.brackets[rate]
            keep = probs >= low
            self.below[rate] += keep.numel() - int(keep.sum())
            keep &= probs <= high
            self.inside[rate].append(probs[keep])

    def done(self) -> bool:
        for rate in list(self.below):
            low, high = self.brackets[rate]
            values = torch.cat(self.inside[rate])
            k = self.wanted[rate] - self.below[rate]
            if k < 1:
                self.brackets[rate] = (-math.inf, high)
            elif k > values.numel():
                self.brackets[rate] = (low, math.inf)
            else:
                self.found[rate] = float(torch.kthvalue(values, k).values)
        self._reset()
        return not self.below
