"""Counting, per layer and neuron, the token positions where the MLP activation is > 0.

The counts come from forward hooks on each layer's activation module, so what is counted is the
model's own ``act_fn(gate_proj(x))`` (or ``act(fc1(x))``), exactly as ``lape.md`` section 1 says.
Hooks exist only inside :func:`activation_hooks`. The forward pass runs the transformer body
only: the LM head, the largest matrix of a small model, is never computed.

The same hooks also add up, in float64, every neuron's activation over all positions and over the
positive ones (:func:`add_activation_sums`): the mean activations that steering sets neurons to
(``activation_sum / tokens`` and ``positive_sum / over_zero``). NaN activations add 0 and
infinite ones the largest finite value of their dtype (``torch.nan_to_num``), so the sums are
always finite; a NaN is never counted as positive, so ``positive_sum`` is 0 wherever the count is.

With a row start (:func:`neuronreg.corpus.row_start`: the BOS a Gemma or Llama 3 tokenizer puts
before every text), each row is fed as ``[BOS] + row`` and position 0 is counted nowhere (not in the
counts, the sums or ``tokens``): the model sees text as it was trained to, and what is counted is
still exactly the text's tokens.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..files import atomic_path
from ..hooks import site_hooks
from ..models import MLPSite, body
from ..progress import input_ended, progress

log = logging.getLogger("neuronreg")


@dataclass
class ActivationCounts:
    """``over_zero[layer, neuron]``: positions where the activation was > 0, out of ``tokens``; with
    statistics, the float64 sums of the activations over all those positions and over the positive ones."""

    over_zero: torch.Tensor  # int64, [num_layers, intermediate_size]
    tokens: int
    activation_sum: torch.Tensor | None = None  # float64, [num_layers, intermediate_size]
    positive_sum: torch.Tensor | None = None  # float64, the same, over the positions where it was > 0

    @property
    def probabilities(self) -> torch.Tensor:
        return self.over_zero.double() / max(self.tokens, 1)

    @property
    def has_statistics(self) -> bool:
        return self.activation_sum is not None and self.positive_sum is not None

    @property
    def mean_activation(self) -> torch.Tensor:
        """The mean activation over every counted position (float64)."""
        return self.activation_sum / max(self.tokens, 1)

    @property
    def mean_positive_activation(self) -> torch.Tensor:
        """The mean activation over the positions where it was > 0 (0 where it never was)."""
        return self.positive_sum / self.over_zero.clamp(min=1).double()


# Float sums of 0.0/1.0 are exact while every partial sum stays below 2**24.
EXACT_FLOAT_ROWS = 1 << 24


_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """One reused buffer per shape: a fresh multi-MB tensor per layer costs page faults on CPU."""
    key = (tuple(like.shape), like.dtype, like.device)
    if key not in _SCRATCH:
        _SCRATCH.clear()  # keep one shape only (the final, shorter batch replaces it)
        _SCRATCH[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
    return _SCRATCH[key]


def positive_counts(flat: torch.Tensor) -> torch.Tensor:
    """For ``[positions, I]`` activations, how many positions of each neuron are > 0 (int64 ``[I]``).

    ``sign(max(x, 0))`` is 1.0 exactly where ``x > 0`` (NaN mapped to 0, as ``NaN > 0`` is false),
    and summing it as float32 is about twice as fast as summing a boolean tensor as integers, which
    keeps the counting pass cheaper than the LM head it skips.
    """
    fired = torch.clamp(flat, min=0, out=_scratch(flat)).sign_().nan_to_num_(0.0)
    total = torch.zeros(flat.shape[-1], dtype=torch.int64, device=flat.device)
    for chunk in fired.split(EXACT_FLOAT_ROWS):
        total += chunk.sum(0, dtype=torch.float32).to(torch.int64)
    return total


_FUSED_FAILED = False


def add_positive_counts(flat: torch.Tensor, into: torch.Tensor,
                        sums: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """``into += positive_counts(flat)``, and with ``sums`` (two float64 ``[I]`` tensors) the activation
    sums of :func:`add_activation_sums`: on CUDA in one fused pass (:mod:`neuronreg.lape.kernels`, the
    same counts bit for bit, the same sums to float64 rounding), elsewhere with the torch path."""
    global _FUSED_FAILED
    if flat.is_cuda and not _FUSED_FAILED:
        from . import kernels

        if kernels.fused_counting_enabled(flat):
            try:
                kernels.add_positive_counts(flat, into, sums)
                return
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # a Triton that cannot compile here: the torch path counts the same
                _FUSED_FAILED = True
                log.warning("The fused counting kernel failed (%s: %s); counting uses the torch path.",
                            type(exc).__name__, exc)
    if sums is not None:  # before counting: the torch counting path reuses the same scratch buffer
        add_activation_sums(flat, *sums)
    into += positive_counts(flat).to(into.device)


# At most this many bytes of float64 at once while summing (a chunk of rows, converted).
SUM_CHUNK_BYTES = 1 << 25


def add_activation_sums(flat: torch.Tensor, activation_sum: torch.Tensor, positive_sum: torch.Tensor) -> None:
    """Add each neuron's activations over the ``[positions, I]`` rows, and over its positive ones, to the
    float64 ``[I]`` sums (on any device: CPU, or CUDA beside the fused count kernel)."""
    finite = torch.nan_to_num(flat, out=_scratch(flat))  # NaN -> 0, +-inf -> the largest finite value
    rows = max(1, SUM_CHUNK_BYTES // (8 * max(flat.shape[-1], 1)))
    for chunk in finite.split(rows):
        activation_sum += chunk.sum(0, dtype=torch.float64).to(activation_sum.device)
    finite.clamp_(min=0)  # exactly the positive entries stay; NaN already became 0, as NaN > 0 is false
    for chunk in finite.split(rows):
        positive_sum += chunk.sum(0, dtype=torch.float64).to(positive_sum.device)


@dataclass
class FedRows:
    """For hooks that leave each fed row's first position (a row-start BOS) out: the length of the rows
    fed now, set before every forward (OPT flattens its activations to ``[batch * length, I]``, so the
    rows cannot be told apart from the activation's shape alone)."""

    length: int = 0


@contextmanager
def activation_hooks(sites: list[MLPSite], device: torch.device | str, *, statistics: bool = True,
                     skip_first: FedRows | None = None) -> Iterator[ActivationCounts]:
    """Yields :class:`ActivationCounts` (``tokens`` 0) whose int64 ``[layers, intermediate]`` counts, and
    with ``statistics`` float64 activation sums, every forward pass adds to, in the same hook. With
    ``skip_first``, the first position of every fed row is left out."""
    if len({site.intermediate_size for site in sites}) != 1:
        raise ValueError("layers of different intermediate sizes are not supported")
    shape = (len(sites), sites[0].intermediate_size)
    step = ActivationCounts(torch.zeros(shape, dtype=torch.int64, device=device), 0)
    if statistics:
        step.activation_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        step.positive_sum = torch.zeros(shape, dtype=torch.float64, device=device)

    def make_hook(site: MLPSite):
        def hook(module, inputs, output):
            # Every position of the [batch, seq, I] output is a real token: rows are never padded.
            # With a model split over devices (device_map), a layer's counts travel to one place.
            sums = (step.activation_sum[site.layer], step.positive_sum[site.layer]) if statistics else None
            if skip_first is not None:  # row by row: a row's positions after the first are contiguous, not copied
                for row in output.reshape(-1, skip_first.length, output.shape[-1]):
                    add_positive_counts(row[1:], step.over_zero[site.layer], sums)
            else:
                add_positive_counts(output.reshape(-1, output.shape[-1]), step.over_zero[site.layer], sums)

        return hook

    with site_hooks(sites, make_hook):
        yield step


def batches(rows: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Stacks rows of equal length; a shorter (final) row goes alone, so nothing is padded."""
    pending: list[torch.Tensor] = []
    for row in rows:
        if pending and row.numel() != pending[0].numel():
            yield torch.stack(pending)
            pending = []
        pending.append(row)
        if len(pending) == batch_size:
            yield torch.stack(pending)
            pending = []
    if pending:
        yield torch.stack(pending)


STATISTICS = ("activation_sum", "positive_sum")


@dataclass
class Checkpoint:
    """Counts (and activation sums) so far for one language, saved atomically so an interrupted run resumes.

    A checkpoint is used only when everything about it checks out, each stored number against the
    others: the settings' fingerprint; one int64 count matrix of the model's shape (and two float64 sums
    of it); ``rows`` > 0 and ``tokens`` what ``rows`` rows hold (every row ``seq_len`` tokens but the
    last, which holds 1 to ``seq_len``); ``tokens`` within the budget; counts between 0 and ``tokens``;
    finite sums, positive sums >= 0, 0 wherever the count is 0, and never below the sum of all
    activations (which adds the same values and the negative ones, in the same order). Anything else
    is discarded with a warning, so a damaged file costs the work since the last checkpoint, never a
    wrong count or mean.
    """

    path: Path
    fingerprint: str  # the settings; a checkpoint made with other settings is ignored
    seq_len: int | None = None  # the length of every row but the last (None: not checked)
    max_tokens: int | None = None  # the most tokens this checkpoint's share of the text can hold

    def load(self, shape: tuple[int, int] | None = None, *, statistics: bool = False
             ) -> tuple[torch.Tensor, int, int, dict[str, torch.Tensor] | None] | None:
        """``(over_zero, tokens, rows, sums)``; ``sums`` maps ``activation_sum``/``positive_sum`` to float64
        tensors, or is None for a checkpoint without them (discarded when ``statistics`` are wanted)."""
        if not self.path.exists():
            return None
        try:
            from safetensors import safe_open

            tensors = load_file(str(self.path))
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises several types for a damaged file
            return self._discard(f"it cannot be read ({type(exc).__name__})")
        if meta.get("fingerprint") != self.fingerprint:
            return self._discard("it was made with other settings")
        over_zero = tensors.get("over_zero")
        try:
            tokens, rows = int(meta["tokens"]), int(meta["rows"])
        except (KeyError, ValueError):
            return self._discard("its token and row totals are missing")
        if set(tensors) not in ({"over_zero"}, {"over_zero", *STATISTICS}) or over_zero.dtype != torch.int64 \
                or over_zero.dim() != 2:
            return self._discard("it does not hold one int64 count matrix (and two float64 sums)")
        if shape is not None and tuple(over_zero.shape) != tuple(shape):
            return self._discard(f"its counts are {tuple(over_zero.shape)}, the model has {tuple(shape)}")
        problem = self._totals_problem(tokens, rows)
        if problem:
            return self._discard(problem)
        if over_zero.numel() and (int(over_zero.min()) < 0 or int(over_zero.max()) > tokens):
            return self._discard("it holds counts outside [0, tokens]")
        sums = {key: tensors[key] for key in STATISTICS if key in tensors} or None
        if sums is not None:
            if any(t.dtype != torch.float64 or t.shape != over_zero.shape for t in sums.values()):
                return self._discard("its activation sums are not float64 of the counts' shape")
            total, positive = sums["activation_sum"], sums["positive_sum"]
            if not (bool(torch.isfinite(total).all()) and bool(torch.isfinite(positive).all())) \
                    or bool((positive < 0).any()):
                return self._discard("its activation sums are not finite, or a positive sum is negative")
            if bool((positive[over_zero == 0] != 0).any()):
                return self._discard("it holds a positive sum for a neuron that was never positive")
            if bool((total > positive).any()):
                return self._discard("a sum of all activations exceeds the sum of the positive ones")
        elif statistics:
            return self._discard("it holds no activation sums (an older neuronreg made it)")
        return over_zero, tokens, rows, sums

    def _totals_problem(self, tokens: int, rows: int) -> str | None:
        if rows <= 0 or tokens < rows:
            return f"it claims {tokens} tokens in {rows} rows"
        if self.seq_len is not None and not (rows - 1) * self.seq_len < tokens <= rows * self.seq_len:
            return (f"it claims {tokens} tokens in {rows} rows of {self.seq_len} (every row holds {self.seq_len} "
                    "tokens but the last)")
        if self.max_tokens is not None and tokens > self.max_tokens:
            return f"it claims {tokens} tokens, more than the {self.max_tokens} its share of the text holds"
        return None

    def _discard(self, why: str) -> None:
        log.warning("Discarding the checkpoint %s: %s. Counting starts again for this language.", self.path.name, why)
        self.path.unlink(missing_ok=True)
        return None

    def save(self, over_zero: torch.Tensor, tokens: int, rows: int,
             sums: dict[str, torch.Tensor] | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"over_zero": over_zero.cpu().contiguous()}
        for key, value in (sums or {}).items():
            tensors[key] = value.cpu().contiguous()
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp),
                      metadata={"fingerprint": self.fingerprint, "tokens": str(tokens), "rows": str(rows)})

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def count_activations(
    model: torch.nn.Module,
    sites: list[MLPSite],
    rows: Iterable[torch.Tensor],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    checkpoint: Checkpoint | None = None,
    checkpoint_tokens: int = 1_000_000,
    total_tokens: int | None = None,
    desc: str = "counting",
    statistics: bool = True,
    show: bool = True,
    row_start: int | None = None,
) -> ActivationCounts:
    """Run ``rows`` through the model body and count positive activations per layer and neuron; with
    ``statistics``, also sum the activations in float64 (over all positions and the positive ones).
    ``show=False`` draws no progress bar (a process other than rank 0).

    With ``row_start`` (a token id, :func:`neuronreg.corpus.row_start`), every row is fed after that
    token, whose position is counted nowhere; ``tokens`` stays the rows' own tokens."""
    shape = (len(sites), sites[0].intermediate_size)
    start = checkpoint.load(shape, statistics=statistics) if checkpoint else None
    done_tokens, done_rows = (start[1], start[2]) if start else (0, 0)
    loaded_rows = done_rows
    rows = itertools.islice(iter(rows), done_rows, None)  # rows are deterministic: skip the counted ones
    forward = body(model)
    bar = progress(total_tokens, desc, initial=done_tokens, show=show)
    since_save = 0
    total = sums = None

    def save() -> None:
        checkpoint.save(total, done_tokens, done_rows, sums)

    try:
        fed = None if row_start is None else FedRows()
        with torch.inference_mode(), activation_hooks(sites, device, statistics=statistics, skip_first=fed) as step:
            total = torch.zeros_like(step.over_zero)
            sums = {key: torch.zeros_like(getattr(step, key)) for key in STATISTICS} if statistics else None
            if start:
                total += start[0].to(device)
                for key in sums or {}:
                    sums[key] += start[3][key].to(device)
            for batch in batches(rows, batch_size):
                step.over_zero.zero_()
                for key in sums or {}:
                    getattr(step, key).zero_()
                ids = batch
                if fed is not None:
                    ids = torch.cat([torch.full((batch.shape[0], 1), row_start, dtype=batch.dtype), batch], dim=1)
                    fed.length = ids.shape[1]
                forward(input_ids=ids.to(device), use_cache=False)
                # Added only once the whole forward is done, so an interrupt never leaves a half batch.
                total += step.over_zero
                for key in sums or {}:
                    sums[key] += getattr(step, key)
                done_tokens += batch.numel()
                done_rows += batch.shape[0]
                since_save += batch.numel()
                bar.update(batch.numel())
                if checkpoint and since_save >= checkpoint_tokens:
                    save()
                    since_save = 0
            input_ended(bar)
            if checkpoint and since_save:
                # Kept until the caller has stored the result: under torchrun, another rank may
                # still fail, and this rank's finished share must then not be counted again.
                save()
            result = ActivationCounts(total.cpu(), done_tokens)
            if sums is not None:
                result.activation_sum, result.positive_sum = (sums[key].cpu() for key in STATISTICS)
    except BaseException:
        # Interrupted (Ctrl-C, out of memory, a killed job): keep what whole batches counted. Only
        # when this run counted something: ``total`` then holds the checkpoint plus those batches.
        if checkpoint and total is not None and done_rows > loaded_rows:
            save()
        raise
    finally:
        bar.close()
    return result


def fingerprint(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)
