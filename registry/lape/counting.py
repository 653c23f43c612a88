"""Counting, per layer and neuron, the token positions where the MLP activation is > 0.

The counts come from forward hooks on each layer's activation module, so what is counted is the
model's own ``act_fn(gate_proj(x))`` (or ``act(fc1(x))``), exactly as ``lape.md`` section 1 says.
Hooks exist only inside :func:`activation_hooks`. The forward pass runs the transformer body
only: the LM head, the largest matrix of a small model, is never computed.
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
from ..progress import progress

log = logging.getLogger("neuronreg")


@dataclass
class ActivationCounts:
    """``over_zero[layer, neuron]``: positions where the activation was > 0, out of ``tokens``."""

    over_zero: torch.Tensor  # int64, [num_layers, intermediate_size]
    tokens: int

    @property
    def probabilities(self) -> torch.Tensor:
        return self.over_zero.double() / max(self.tokens, 1)


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


def add_positive_counts(flat: torch.Tensor, into: torch.Tensor) -> None:
    """``into += positive_counts(flat)``: on CUDA in one fused pass (:mod:`neuronreg.lape.kernels`, the
    same counts bit for bit), elsewhere with the torch path above."""
    global _FUSED_FAILED
    if flat.is_cuda and not _FUSED_FAILED:
        from . import kernels

        if kernels.fused_counting_enabled(flat):
            try:
                kernels.add_positive_counts(flat, into)
                return
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:  # a Triton that cannot compile here: the torch path counts the same
                _FUSED_FAILED = True
                log.warning("The fused counting kernel failed (%s: %s); counting uses the torch path.",
                            type(exc).__name__, exc)
    into += positive_counts(flat).to(into.device)


@contextmanager
def activation_hooks(sites: list[MLPSite], device: torch.device | str) -> Iterator[torch.Tensor]:
    """Yields an int64 ``[layers, intermediate]`` tensor that every forward pass adds its counts to."""
    if len({site.intermediate_size for site in sites}) != 1:
        raise ValueError("layers of different intermediate sizes are not supported")
    counts = torch.zeros(len(sites), sites[0].intermediate_size, dtype=torch.int64, device=device)

    def make_hook(site: MLPSite):
        def hook(module, inputs, output):
            # Every position of the [batch, seq, I] output is a real token: rows are never padded.
            # With a model split over devices (device_map), a layer's counts travel to one place.
            add_positive_counts(output.reshape(-1, output.shape[-1]), counts[site.layer])

        return hook

    with site_hooks(sites, make_hook):
        yield counts


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


@dataclass
class Checkpoint:
    """Counts so far for one language, saved atomically so an interrupted run resumes.

    A checkpoint is used only when everything about it checks out (the settings' fingerprint, the
    shape and dtype of the counts, counts between 0 and the tokens, rows no more than tokens);
    anything else is discarded with a warning, so a damaged file costs the work since the last
    checkpoint, never a wrong count.
    """

    path: Path
    fingerprint: str  # the settings; a checkpoint made with other settings is ignored

    def load(self, shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, int, int] | None:
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
        if set(tensors) != {"over_zero"} or over_zero.dtype != torch.int64 or over_zero.dim() != 2:
            return self._discard("it does not hold one int64 count matrix")
        if shape is not None and tuple(over_zero.shape) != tuple(shape):
            return self._discard(f"its counts are {tuple(over_zero.shape)}, the model has {tuple(shape)}")
        if rows <= 0 or tokens < rows:
            return self._discard(f"it claims {tokens} tokens in {rows} rows")
        if over_zero.numel() and (int(over_zero.min()) < 0 or int(over_zero.max()) > tokens):
            return self._discard("it holds counts outside [0, tokens]")
        return over_zero, tokens, rows

    def _discard(self, why: str) -> None:
        log.warning("Discarding the checkpoint %s: %s. Counting starts again for this language.", self.path.name, why)
        self.path.unlink(missing_ok=True)
        return None

    def save(self, over_zero: torch.Tensor, tokens: int, rows: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            save_file({"over_zero": over_zero.cpu().contiguous()}, str(tmp),
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
    quiet: bool = False,
) -> ActivationCounts:
    """Run ``rows`` through the model body and count positive activations per layer and neuron."""
    shape = (len(sites), sites[0].intermediate_size)
    start = checkpoint.load(shape) if checkpoint else None
    done_tokens, done_rows = (start[1], start[2]) if start else (0, 0)
    loaded_rows = done_rows
    rows = itertools.islice(iter(rows), done_rows, None)  # rows are deterministic: skip the counted ones
    forward = body(model)
    bar = progress(total_tokens, desc, quiet=quiet, initial=done_tokens)
    since_save = 0
    total = None
    try:
        with torch.inference_mode(), activation_hooks(sites, device) as step:
            total = torch.zeros_like(step)
            if start:
                total += start[0].to(device)
            for batch in batches(rows, batch_size):
                step.zero_()
                forward(input_ids=batch.to(device), use_cache=False)
                # Added only once the whole forward is done, so an interrupt never leaves a half batch.
                total += step
                done_tokens += batch.numel()
                done_rows += batch.shape[0]
                since_save += batch.numel()
                bar.update(batch.numel())
                if checkpoint and since_save >= checkpoint_tokens:
                    checkpoint.save(total, done_tokens, done_rows)
                    since_save = 0
            if checkpoint and since_save:
                # Kept until the caller has stored the result: under torchrun, another rank may
                # still fail, and this rank's finished share must then not be counted again.
                checkpoint.save(total, done_tokens, done_rows)
            result = total.cpu()
    except BaseException:
        # Interrupted (Ctrl-C, out of memory, a killed job): keep what whole batches counted. Only
        # when this run counted something: ``total`` then holds the checkpoint plus those batches.
        if checkpoint and total is not None and done_rows > loaded_rows:
            checkpoint.save(total, done_tokens, done_rows)
        raise
    finally:
        bar.close()
    return ActivationCounts(result, done_tokens)


def fingerprint(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)
