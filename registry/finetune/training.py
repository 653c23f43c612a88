"""Sparse fine-tuning of one language's neurons (the seed paper's method), and its baselines.

``finetune`` trains, on a language's text, only what ``subset`` names:

* ``lape`` (default): the language's LAPE neurons from a registry, as row-sparse deltas
  (:mod:`neuronreg.finetune.deltas`): optimizer state and gradients scale with the neurons;
* ``random``: the same number of neurons in every layer, drawn with the seed (the paper's control);
* ``ffn``: every weight of every MLP (dense ``requires_grad``); ``full``: every weight;
* ``lora`` / ``ia3``: a PEFT adapter on the MLP projections (:mod:`neuronreg.finetune.adapters`).

The optimizer always updates float32 weights, whatever the model's dtype: the deltas and the PEFT
adapters are float32 parameters; for ``ffn`` and ``full`` in a lower precision the optimizer holds
float32 master copies of the trainable weights (:class:`MasterWeights`): the gradients of the model's
weights are handed to them after the backward pass, and after each step the masters are copied
(rounded) into the model for the next forward pass. So an update smaller than the model dtype's
rounding step accumulates instead of vanishing.

Text is packed as ``compute`` packs it (``pack_rows``); the last 2% of the rows (or ``eval_data``)
are the validation split, evaluated before training, every ``eval_every`` steps and at the end; the
deltas (or weights) of the best evaluation are what the run keeps. Batches follow a fixed order that
depends only on the seed and the step, and checkpoints (written to a temporary file, then renamed)
hold the trainable weights, the AdamW and schedule state and the RNG state, so an interrupted run
resumes to exactly the result of an uninterrupted one. A loss that stops being finite ends the run
with an error; the last checkpoint stays.

The loss is :func:`neuronreg.evaluation.heldout.token_nll`; ``chunked_loss`` picks its chunked linear
cross-entropy (None: by the size of the logits, see ``use_chunked_loss``), which never holds the
full-vocabulary logits.

More than one GPU:

* ``device_map="auto"``: accelerate spreads the frozen base over the machine's GPUs; each delta lives
  on its layer's device. A model that does not fit on the GPUs (weights left on the CPU or disk) is
  refused: a delta cannot live on a weight that is not there.
* data-parallel under ``torchrun`` (any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR): each
  process holds the whole model and trains on a disjoint share of every global batch; torch DDP
  reduces the trainable weights' gradients only (the deltas, for ``lape`` and ``random``). A global
  micro-batch is ``batch_size x world`` rows (``batch_size`` per process), the one a single process
  with ``batch_size x world`` would take, and the loss is normalised by that global batch's
  predicted tokens, so the result equals one process's up to float rounding. Validation is split
  over the processes and summed. Rank 0 writes checkpoints and results; a checkpoint holds every
  rank's RNG state and resumes only with the same number of processes. One process is exactly the
  single-process code path (no process group, no DDP).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..corpus import iter_documents, pack_rows, resolve_corpus, row_start
from ..distributed import Ranks
from ..errors import CorpusError, FinetuneError, MaskError, RegistryError
from ..evaluation.heldout import IGNORE, token_nll
from ..files import atomic_folder, atomic_path, atomic_write_text
from ..layouts import BY_NAME as LAYOUTS
from ..manifest import Manifest
from ..mask import NeuronMask
from ..models import DTYPES, load_model
from ..progress import progress
from ..provenance import LanguageInfo
from ..resolve import language_code, resolve_model
from ..store.local import LocalRegistry
from .adapters import attach_adapter, merge_adapter, save_adapter, trainable_weights
from .config import (
    ADAPTER_FILES,
    ADAPTERS,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    DELTA_FILE,
    FULL_MODEL_DIR,
    MERGED_DIR,
    FinetuneSettings,
    MaskRef,
    NeuronCounts,
    RunConfig,
    TrainingInfo,
)
from .deltas import LayerDelta, attach_deltas, merge_deltas, save_delta
from .merging import MergeTally, cast_model, exact, parse_merge_dtype

log = logging.getLogger("neuronreg")


@dataclass
class FinetuneResult:
    out: Path
    config: RunConfig
    curve: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    is_main: bool = True  # False on the ranks other than 0 of a data-parallel run: rank 0 reports


# -- what to train ------------------------------------------------------------------------------------
def read_mask(source: LocalRegistry | Path, model: str, language: str, manifest: Manifest, *,
              selection: str | None = None, top_rate: float | None = None) -> NeuronMask:
    """The language's mask from a LOCAL registry folder (one of its selections: by name, by top rate,
    or the model's default) or a mask file (any format ``fetch -o`` writes), never the Hub; or one
    error saying what is there."""
    if isinstance(source, Path):
        return NeuronMask.load(source, model=model, language=language)
    try:
        entry = source.selection(model, selection, top_rate)
    except RegistryError as exc:
        if exc.fix != "compute":
            raise
        # Training is where published neurons are most wanted: say how to use them, not only how to count.
        raise RegistryError(exc.message, fix="compute_or_fetch",
                            advice="Compute them, or fetch published ones "
                                   "(neuronreg.load_mask(model, language).save('mask.parquet')) and pass that file "
                                   "as the mask.") from exc
    code = language_code(language, manifest, entry.languages)
    return source.read_mask(model, code, entry.name)


# -- data ---------------------------------------------------------------------------------------------
def read_rows(source, tokenizer, seq_len: int, tokens: int) -> list[torch.Tensor]:
    """Packed rows, kept as int32 (half the memory of the int64 ids; 100M tokens take 400 MB). Where the
    tokenizer puts BOS before every text (:func:`~neuronreg.corpus.row_start`), each row starts with
    that BOS: context the model expects, itself never predicted, so every text token is."""
    dtype = torch.int32 if len(tokenizer) < 2**31 else torch.long
    start = row_start(tokenizer)
    prefix = [] if start is None else [torch.tensor([start], dtype=dtype)]
    return [torch.cat([*prefix, row.to(dtype)]) for row in pack_rows(iter_documents(source), tokenizer, seq_len,
                                                                     tokens)]


def batch_tensors(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels; a short row is padded on the right and its pads get no loss,
    nor does a row's first token (a row-start BOS, or a token without context: nothing predicts it)."""
    length = max(r.numel() for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : row.numel()] = row
        attention[i, : row.numel()] = 1
    labels = ids.masked_fill(attention == 0, IGNORE)
    labels[:, 0] = IGNORE
    return ids, attention, labels


def sample_order(step: int, micro: int, settings: FinetuneSettings, num_rows: int, world: int = 1) -> list[int]:
    """Row indices of one (global) micro-batch: a seeded permutation per epoch, a function of the step
    alone. With ``world`` processes it is ``batch_size x world`` rows, the one a single process with
    that batch size takes; process ``r`` trains on the ``r``-th ``batch_size`` of them."""
    size = settings.batch_size * world
    start = (step * settings.grad_accum + micro) * size
    picks = []
    cache: dict[int, torch.Tensor] = {}
    for position in range(start, start + size):
        epoch, offset = divmod(position, num_rows)
        if epoch not in cache:
            generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
            cache[epoch] = torch.randperm(num_rows, generator=generator)
        picks.append(int(cache[epoch][offset]))
    return picks


def evaluate(model, rows: list[torch.Tensor], batch_size: int, pad_id: int, device, *,
             chunked: bool | None = None, ranks: Ranks | None = None) -> float:
    """Mean next-token loss (nats) over the validation rows (with ``ranks``, each takes every
    ``world``-th row and the totals are summed)."""
    world = ranks.world if ranks is not None else 1
    if world > 1:
        rows = rows[ranks.rank::world]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, attention, labels = (t.to(device) for t in batch_tensors(rows[start:start + batch_size], pad_id))
            loss, n = token_nll(model, ids, attention, labels, chunked=chunked)
            total, count = total + float(loss), count + n
    model.train(was_training)
    if world > 1:
        total, count = ranks.sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
    return total / max(count, 1)


def schedule_factor(step: int, settings: FinetuneSettings) -> float:
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    progress_ = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    if settings.schedule == "linear":
        return max(0.0, 1.0 - progress_)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))


# -- the job ------------------------------------------------------------------------------------------
def finetune(
    model_spec: str,
    language: str,
    *,
    manifest: Manifest,
    registry: LocalRegistry | Path,
    settings: FinetuneSettings,
    name: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
    token: str | None = None,
    device_map: str | None = None,
    chunked_loss: bool | None = None,
    on_step=None,  # called with the finished step number; tests use it to interrupt a run
    selection: str | None = None,
    top_rate: float | None = None,
) -> FinetuneResult:
    """Train the language's subnetwork (or a baseline) and write the run folder.

    ``registry`` is where the mask comes from: a local registry, or the Path of one mask file.
    ``device_map="auto"`` spreads the base model over the GPUs (accelerate); under ``torchrun`` every
    process trains on its share of each batch (see the module's docstring). ``chunked_loss``: see
    :func:`neuronreg.evaluation.heldout.use_chunked_loss` (None: chosen by the size of the logits).
    """
    settings.check()
    if device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError("A model spread over the GPUs (device_map) cannot also be trained data-parallel "
                            "by several processes; start one process.")
    ranks = Ranks.from_env(None if device_map else settings.device)
    try:
        return _finetune(model_spec, language, manifest=manifest, registry=registry, settings=settings, name=name,
                         overwrite=overwrite, quiet=quiet or not ranks.is_main, trust_remote_code=trust_remote_code,
                         token=token, device_map=device_map, chunked_loss=chunked_loss, on_step=on_step, ranks=ranks,
                         selection=selection, top_rate=top_rate)
    finally:
        ranks.close()


def _finetune(model_spec: str, language: str, *, manifest: Manifest, registry: LocalRegistry | Path,
              settings: FinetuneSettings, name, overwrite, quiet, trust_remote_code, token, device_map, chunked_loss,
              on_step, ranks: Ranks, selection: str | None, top_rate: float | None) -> FinetuneResult:
    lang = manifest.language(language)
    out = Path(settings.out)
    error = None
    if ranks.is_main:  # one process clears a folder for overwrite; the others must not see it half done
        try:
            _check_out(out, overwrite)
        except Exception as exc:  # raised on every rank by ranks.check
            error = exc
    ranks.check(error)

    ref = resolve_model(model_spec, manifest, name=name,
                        registry=registry if isinstance(registry, LocalRegistry) else None)
    mask = None
    if settings.subset in ("lape", "random"):
        mask = read_mask(registry, ref.name, lang.code, manifest, selection=selection, top_rate=top_rate)
        if len(mask) == 0:
            raise MaskError(f"The {lang.code} mask of {ref.name} in {_where(registry)} has no neurons, so there is "
                            "nothing to train.", fix="empty_mask",
                            advice="Select with a higher top_rate, or train subset='ffn'.")
    source = resolve_corpus(settings.data, lang, manifest, settings.text_field)
    eval_source = (resolve_corpus(settings.eval_data, lang, manifest, settings.text_field) if settings.eval_data
                   else None)

    loaded = load_model(ref, dtype=settings.dtype, device=ranks.device(settings.device),
                        trust_remote_code=trust_remote_code, token=token, quiet=quiet, device_map=device_map)
    model, device = loaded.model, loaded.device
    if device_map:
        _check_on_devices(model)
    info = loaded.info()
    if mask is not None:
        mask.check_sites(loaded.sites)
        mask_revision = mask.provenance.model.revision if mask.provenance else None
        if mask_revision and mask_revision != loaded.revision and ranks.is_main:
            log.warning("The mask was computed on revision %s of %s; this model is %s.", mask_revision, ref.name,
                        loaded.revision)

    train_rows, eval_rows = _split_rows(source, eval_source, loaded.tokenizer, settings, lang.code)
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = pad_id if isinstance(pad_id, int) else 0

    # What is trainable.
    torch.manual_seed(settings.seed)
    layers: list[LayerDelta] = []
    per_layer = None
    adapter = adapter_info = None
    masters = None
    if settings.subset == "lape":
        per_layer = mask.per_layer()
    elif settings.subset == "random":
        per_layer = mask.random_like(settings.seed).per_layer()
    if per_layer is not None:
        layers = attach_deltas(model, per_layer, loaded.sites)
        named = {f"{layer.prefix}.{i}": p for layer in layers for i, p in enumerate(layer.parameters())}
    elif settings.subset in ADAPTERS:
        adapter, adapter_info = attach_adapter(model, settings, loaded.sites)
        named = trainable_weights(adapter)  # the model itself now holds the adapter layers
    else:
        masters = MasterWeights(_dense_trainable(model, settings.subset, loaded.sites))
        named = masters.named
    params = list(named.values())
    trainable = sum(p.numel() for p in params)
    save_dtype = parse_merge_dtype(settings.merge_dtype, DTYPES[loaded.dtype])
    # A dense run's trained weights are saved in save_dtype: what that rounding loses is measured
    # against the weights it started from (kept on the CPU only when there is rounding to measure).
    initial = masters.snapshot() if masters is not None and save_dtype != torch.float32 else None

    model.train()
    if settings.gradient_checkpointing:
        model.config.use_cache = False
        # transformers 5 renamed it; older versions (>= 4.46, the floor) only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule_factor(step, settings))

    # Resume.
    state = {"step": 0, "curve": [], "best": None, "best_step": None, "best_loss": math.inf}
    checkpoint = out / CHECKPOINT_FILE
    resumed_from = 0
    if checkpoint.is_file():
        saved = _load_checkpoint(checkpoint, named)
        if saved["settings"] != settings.result_settings() or saved["model_revision"] != loaded.revision:
            raise FinetuneError(f"{out} holds an unfinished run with other settings or another model.",
                                fix="overwrite", advice="Use another output folder, or overwrite=True.")
        if saved.get("world", 1) != ranks.world:
            raise FinetuneError(f"{out} holds an unfinished run of {saved.get('world', 1)} process(es); this run "
                                f"has {ranks.world}. Resume it with as many.", fix="overwrite",
                                advice="Use another output folder, or overwrite=True.")
        with torch.no_grad():
            for key, p in named.items():
                p.copy_(saved["trainable"][key])
        if masters is not None:
            masters.to_model()
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ranks.world > 1:
            cpu_rng, cuda_rng = saved["rng_per_rank"][ranks.rank]
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None and torch.device(device).type == "cuda":
                torch.cuda.set_rng_state(cuda_rng, device)
        else:
            torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
        state = {k: saved[k] for k in state}
        resumed_from = state["step"]
        if ranks.is_main:
            log.info("Resuming %s from step %d.", out, resumed_from)

    step_loss = _loss_step(model, chunked_loss, ranks, device, find_unused=masters is not None)
    world, share = ranks.world, slice(ranks.rank * settings.batch_size, (ranks.rank + 1) * settings.batch_size)
    eval_every = settings.eval_every
    checkpoint_every = settings.checkpoint_every or eval_every

    def validate() -> float:
        return evaluate(model, eval_rows, settings.batch_size, pad_id, device, chunked=chunked_loss, ranks=ranks)

    if state["step"] == 0 and not state["curve"]:
        state["curve"].append({"step": 0, "val_loss": validate()})
    bar = progress(settings.steps, f"finetune {lang.code} ({settings.subset})", unit="step", quiet=quiet,
                   initial=state["step"])
    started = time.perf_counter()
    try:
        while state["step"] < settings.steps:
            step = state["step"]
            picks = [sample_order(step, micro, settings, len(train_rows), world)
                     for micro in range(settings.grad_accum)]
            # Predicted tokens of the whole (global) step: every position after a row's first.
            denominator = sum(max(train_rows[i].numel() - 1, 0) for rows in picks for i in rows)
            train_loss = 0.0
            for micro, rows in enumerate(picks):
                ids, attention, labels = batch_tensors([train_rows[i] for i in rows[share]], pad_id)
                last = micro == len(picks) - 1
                with step_loss.no_sync() if world > 1 and not last else nullcontext():
                    loss, _ = step_loss(ids.to(device), attention.to(device), labels.to(device))
                    # DDP averages the ranks' gradients: times world, they add up to the global batch's.
                    (loss * world / denominator).backward()
                train_loss += float(loss.detach()) / denominator
            if world > 1:
                train_loss = float(ranks.sum(torch.tensor([train_loss], dtype=torch.float64)))
            if not math.isfinite(train_loss):
                raise FinetuneError(f"The training loss became {train_loss} at step {step + 1}; the run stopped. "
                                    f"Its last checkpoint (step {_checkpoint_step(checkpoint)}) is kept.",
                                    fix="diverged", advice="Lower lr, or clip gradients (clip=1.0).")
            if masters is not None:
                masters.take_grads()
            if settings.clip:
                torch.nn.utils.clip_grad_norm_(params, settings.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if masters is not None:
                masters.to_model()
            state["step"] = step = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
            if step % eval_every == 0 or step == settings.steps:
                val = validate()
                if not math.isfinite(val):
                    raise FinetuneError(f"The validation loss became {val} at step {step}; the run stopped. Its "
                                        f"last checkpoint (step {_checkpoint_step(checkpoint)}) is kept.",
                                        fix="diverged", advice="Lower lr, or clip gradients (clip=1.0).")
                state["curve"].append({"step": step, "train_loss": train_loss, "val_loss": val})
                if val < state["best_loss"]:
                    state["best_loss"], state["best_step"] = val, step
                    state["best"] = {k: p.detach().cpu().clone() for k, p in named.items()}
            if step % checkpoint_every == 0 and step < settings.steps:
                rng_per_rank = _gather_rng(ranks, device)
                if ranks.is_main:
                    _save_checkpoint(checkpoint, state, named, optimizer, scheduler, settings, loaded.revision,
                                     world=world, rng_per_rank=rng_per_rank)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
    seconds = time.perf_counter() - started

    # Keep the best evaluation's weights.
    if state["best"] is None:
        raise FinetuneError("The run ended without a finite validation loss; nothing was written.", fix="diverged")
    with torch.no_grad():
        for key, p in named.items():
            p.copy_(state["best"][key])
    if masters is not None:
        masters.to_model()
    if settings.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval()

    training = TrainingInfo(**{k: getattr(settings, k) for k in settings.RESULT_KEYS}, dtype=loaded.dtype,
                            device=str(device), data=source.describe(),
                            eval_data=eval_source.describe() if eval_source else None,
                            train_rows=len(train_rows), eval_rows=len(eval_rows),
                            seconds_this_session=round(seconds, 3), resumed_from_step=resumed_from,
                            master_dtype="float32", world_size=ranks.world, device_map=device_map,
                            chunked_loss=chunked_loss)
    config = RunConfig(
        base_model=info, base_path=ref.source if ref.local else None, language=LanguageInfo.of(lang),
        subset=settings.subset,
        mask=None if mask is None else MaskRef(model=mask.model, language=mask.language, source=mask.source,
                                               selection=mask.provenance.selection if mask.provenance else None,
                                               model_revision=mask.provenance.model.revision
                                               if mask.provenance else None),
        neurons=None if per_layer is None else NeuronCounts(total=int(sum(t.numel() for t in per_layer)),
                                                            per_layer=[int(t.numel()) for t in per_layer]),
        trainable_parameters=trainable, trainable_share=trainable / info.num_parameters, training=training,
        best_step=state["best_step"], best_val_loss=state["best_loss"], validation_curve=state["curve"],
        adapter=adapter_info,
    )
    error = None
    if ranks.is_main:
        try:
            _write_outputs(out, model, loaded, layers, config, settings, adapter=adapter, masters=masters,
                           initial=initial, save_dtype=save_dtype)
            checkpoint.unlink(missing_ok=True)
        except Exception as exc:  # every rank hears of it (and none waits for rank 0 forever)
            error = exc
    ranks.check(error)
    return FinetuneResult(out, config, state["curve"], resumed_from, is_main=ranks.is_main)


class MasterWeights:
    """float32 master copies of a dense baseline's trainable weights when the model computes in a lower
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


class _TrainingLoss(torch.nn.Module):
    """The training loss as a module: DDP prepares its gradient reduction in its own forward, so the
    loss must run inside it."""

    def __init__(self, model: torch.nn.Module, chunked: bool | None):
        super().__init__()
        self.model = model
        self.chunked = chunked

    def forward(self, ids, attention, labels):
        return token_nll(self.model, ids, attention, labels, chunked=self.chunked)


def _loss_step(model, chunked: bool | None, ranks: Ranks, device, find_unused: bool):
    """What one micro-batch's loss is computed by: the loss itself in one process; under torchrun the
    same loss wrapped in DDP, which reduces the trainable weights' gradients only."""
    loss = _TrainingLoss(model, chunked)
    if ranks.world == 1:
        return loss
    from torch.nn.parallel import DistributedDataParallel

    # The frozen base is identical on every rank and gets no gradient: DDP neither syncs nor reduces it.
    ignored = [n for n, p in loss.named_parameters() if not p.requires_grad] + [n for n, _ in loss.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss, ignored)
    device = torch.device(device)
    return DistributedDataParallel(loss, device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False, gradient_as_bucket_view=True,
                                   find_unused_parameters=find_unused)


def _check_on_devices(model) -> None:
    """With device_map, every weight must be on an accelerator or the CPU, not offloaded (meta)."""
    offloaded = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise FinetuneError(f"The model does not fit on this machine's devices: {len(offloaded)} of its weights "
                            f"were offloaded (e.g. {offloaded[0]}), and training needs every weight in memory.",
                            fix="memory", advice="Use a smaller dtype, or a machine with more GPU memory.")


def _gather_rng(ranks: Ranks, device) -> list | None:
    """Every rank's (CPU, CUDA or None) RNG states, in rank order, for a checkpoint of a data-parallel run."""
    if ranks.world == 1:
        return None
    import torch.distributed as dist

    device = torch.device(device)
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
    states: list = [None] * ranks.world
    dist.all_gather_object(states, mine)
    return states


def _where(registry) -> str:
    return str(registry) if isinstance(registry, Path) else str(registry.root)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"The output {out} is a file; give a folder.")
    if overwrite and out.is_dir():
        for name in (CHECKPOINT_FILE, CONFIG_FILE, DELTA_FILE, *ADAPTER_FILES):
            (out / name).unlink(missing_ok=True)
    elif (out / CONFIG_FILE).is_file():
        raise FinetuneError(f"{out} already holds a finished run.", fix="overwrite",
                            advice="Use another output folder, or overwrite=True to replace it.")


def _split_rows(source, eval_source, tokenizer, settings: FinetuneSettings, code: str):
    rows = read_rows(source, tokenizer, settings.seq_len, settings.tokens)
    if not rows:
        raise CorpusError(f"The training text for {code} ({source.label}) holds no text.")
    if eval_source is not None:
        eval_rows = read_rows(eval_source, tokenizer, settings.seq_len, settings.tokens)
        if not eval_rows:
            raise CorpusError(f"The validation text for {code} ({eval_source.label}) holds no text.")
        return rows, eval_rows
    if len(rows) < 2:
        raise CorpusError(f"The text for {code} makes only {len(rows)} row of {settings.seq_len} tokens: too little "
                          "to keep a validation split.", fix="more_text",
                          advice="Give more text, a smaller seq_len, or eval_data.")
    held = max(1, int(len(rows) * settings.eval_fraction))
    return rows[:-held], rows[-held:]


def _dense_trainable(model, subset: str, sites) -> dict[str, torch.nn.Parameter]:
    if subset == "full":
        named = dict(model.named_parameters())
    else:
        wanted = set()
        for site in sites:
            modules = [site.projection, getattr(site.mlp, LAYOUTS[site.layout].second)]
            if site.layout == "gated":
                modules.append(site.mlp.up_proj)
            for module in modules:
                wanted.update(id(p) for p in module.parameters())
        named = {n: p for n, p in model.named_parameters() if id(p) in wanted}
    for n, p in model.named_parameters():
        p.requires_grad_(n in named)
    return named


def _save_checkpoint(path: Path, state: dict, named: dict, optimizer, scheduler, settings: FinetuneSettings,
                     revision: str, *, world: int = 1, rng_per_rank: list | None = None) -> None:
    payload = {**state, "trainable": {k: p.detach().cpu() for k, p in named.items()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
               "settings": settings.result_settings(), "model_revision": revision}
    if world > 1:  # a one-process checkpoint keeps exactly its old keys
        payload.update(world=world, rng_per_rank=rng_per_rank)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, named: dict) -> dict:
    """A checkpoint's contents (tensors and plain data only), or FinetuneError when it does not fit."""
    try:
        saved = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # pickle, zip and torch errors all mean a damaged file
        raise FinetuneError(f"{path} is damaged ({type(exc).__name__}).", fix="overwrite",
                            advice="Delete it, or pass overwrite=True to start again.") from exc
    keys = {"step", "curve", "best", "best_step", "best_loss", "trainable", "optimizer", "scheduler", "rng",
            "settings", "model_revision"}
    if not isinstance(saved, dict) or not keys <= set(saved) or set(saved["trainable"]) != set(named) \
            or any(saved["trainable"][k].shape != p.shape for k, p in named.items()):
        raise FinetuneError(f"{path} is not a checkpoint of this run.", fix="overwrite",
                            advice="Delete it, or pass overwrite=True to start again.")
    return saved


def _checkpoint_step(path: Path) -> int:
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, weights_only=True, map_location="cpu")["step"])
    except Exception:  # only for the message
        return 0


def _write_outputs(out: Path, model, loaded, layers: list[LayerDelta], config: RunConfig,
                   settings: FinetuneSettings, *, adapter=None, masters: MasterWeights | None = None,
                   initial: dict | None = None, save_dtype: torch.dtype = torch.float32) -> None:
    """The run's files; the run config last (it marks the run finished). Merged or dense weights are
    stored in ``save_dtype`` and the run config records what that rounding lost (``merge``)."""
    out.mkdir(parents=True, exist_ok=True)
    if layers:
        save_delta(layers, out / DELTA_FILE, {"base_model": config.base_model.id or "",
                                              "revision": config.base_model.revision or "",
                                              "language": config.language.code})
    if adapter is not None:
        save_adapter(adapter, out)
        if settings.merged:
            model, config.merge = merge_adapter(adapter, save_dtype)
            save_pretrained(model, loaded.tokenizer, out / MERGED_DIR)
    elif config.dense:
        config.merge = _store_dense(model, masters, initial, save_dtype)
        save_pretrained(model, loaded.tokenizer, out / FULL_MODEL_DIR)
    elif settings.merged:
        config.merge = merge_deltas(layers, save_dtype)
        cast_model(model, save_dtype)
        save_pretrained(model, loaded.tokenizer, out / MERGED_DIR)
    atomic_write_text(out / CONFIG_FILE, json.dumps(config.to_dict(), indent=1, sort_keys=True) + "\n")


def _store_dense(model, masters: MasterWeights, initial: dict | None, dtype: torch.dtype):
    """A dense baseline's trained weights (its float32 masters) stored in ``dtype`` in the model, and what
    that rounding lost against the weights the run started from."""
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


def save_pretrained(model, tokenizer, folder: Path) -> None:
    """save_pretrained into a temporary folder that replaces ``folder`` only when complete."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

