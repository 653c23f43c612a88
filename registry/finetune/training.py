"""Fine-tuning one language: the seed paper's sparse training of its neurons, and the baselines.

``finetune`` trains, on a language's text, what its method (``settings.subset``, a registered
:class:`~neuronreg.finetune.method.FinetuneMethod`) makes trainable: the language's LAPE neurons as
row-sparse deltas (``lape``), as many random neurons per layer (``random``), PEFT adapters (``lora``,
``ia3``) or the dense weights (``ffn``, ``full``). This loop is the same for every method; it asks the
method to attach itself, and around each step what it needs (``Trained.after_backward``,
``after_update``), and to save the result. The optimizer always updates float32 weights.

Text is packed as ``compute`` packs it (``pack_rows``); the last 2% of the rows (or ``eval_data``)
are the validation split, evaluated before training, every ``eval_every`` steps and at the end; the
weights of the best evaluation are what the run keeps. Batches follow a fixed order that depends only
on the seed and the step: ``seed`` decides the order of the rows (a seeded permutation per epoch), the
neurons of ``random`` and the dropout of ``lora``; a ``lape`` run that reads every row once differs
between seeds only in the order. Checkpoints (written to a temporary file, then renamed) hold the
trainable weights, the AdamW and schedule state, the RNG state and the log, so an interrupted run
resumes to exactly the result of an uninterrupted one. A loss that stops being finite ends the run
with an error; the last checkpoint stays.

Every optimizer step is logged (``steps.csv`` in the run folder: training loss, gradient norm before
clipping, learning rate, predicted tokens; the validation loss where one was measured), for the
training-dynamics plots of ``neuronreg analyze``.

The loss is :func:`neuronreg.evaluation.heldout.token_nll`; ``settings.chunked_loss`` picks its chunked
linear cross-entropy (None: by the size of the logits), which never holds the full-vocabulary logits.

More than one GPU:

* ``device_map="auto"`` (in the LoadOptions): accelerate spreads the frozen base over the machine's
  GPUs; each delta lives on its layer's device. A model that does not fit on the GPUs (weights left on
  the CPU or disk) is refused: a delta cannot live on a weight that is not there.
* data-parallel under ``torchrun`` (any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR): each
  process holds the whole model and trains on a disjoint share of every global batch; torch DDP
  reduces the trainable weights' gradients only. A global micro-batch is ``batch_size x world`` rows,
  the one a single process with ``batch_size x world`` would take, and the loss is normalised by that
  global batch's predicted tokens, so the result equals one process's up to float rounding.
  Validation is split over the processes and summed. Rank 0 writes checkpoints and results; a
  checkpoint holds every rank's RNG state and resumes only with the same number of processes.
"""

from __future__ import annotations

import csv
import io
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
from ..files import atomic_path, atomic_write_text
from ..manifest import Manifest, load_manifest
from ..mask import NeuronMask
from ..models import load_model
from ..options import LoadOptions, load_options
from ..progress import progress
from ..provenance import LanguageInfo
from ..resolve import language, resolve_model
from ..runs import CHECKPOINT_FILE, RUN_CONFIG_FILE, STEPS_FILE, MaskRef, RunConfig, TrainingInfo
from ..store.local import LocalRegistry
from .config import FinetuneSettings
from .merging import save_dtype_of

log = logging.getLogger("neuronreg")


@dataclass
class FinetuneResult:
    out: Path
    config: RunConfig
    curve: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    is_main: bool = True  # False on the ranks other than 0 of a data-parallel run: rank 0 reports


# -- what to train ------------------------------------------------------------------------------------
def find_mask(model, language_name: str, *, registry: LocalRegistry | None, file: Path | None,
              selection, manifest: Manifest) -> NeuronMask:
    """The language's mask from a LOCAL registry (one of its selections) or a mask file (any format
    ``fetch -o`` writes), never the Hub: training is where published neurons are most wanted, so the
    error for a missing one says how to use them."""
    from ..store.masks import find_masks

    try:
        return find_masks(model, [language_name], selection=selection, registry=registry, file=file,
                          manifest=manifest).one()
    except RegistryError as exc:
        if exc.fix != "compute":
            raise
        raise RegistryError(exc.message, fix="compute_or_fetch",
                            advice="Compute them, or fetch published ones "
                                   "(neuronreg.load_mask(model, language).save('mask.parquet')) and pass that file "
                                   "as the mask.") from exc


# -- data ---------------------------------------------------------------------------------------------
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
def finetune(model: str, language_name: str, settings: FinetuneSettings, *, load: LoadOptions | None = None,
             registry: LocalRegistry | str | Path | None = None, mask: str | Path | NeuronMask | None = None,
             selection=None, manifest: Manifest | None = None, name: str | None = None, overwrite: bool = False,
             on_step=None) -> FinetuneResult:
    """Train the language's subnetwork (or a baseline) and write the run folder ``settings.out``.

    ``model``: anything the resolver accepts; ``language_name``: any of its codes or its name. The neurons
    (for ``lape`` and ``random``) come from ``mask`` (a mask file, or a NeuronMask) when given, else from
    the local ``registry`` (None: the default one), of its ``selection`` (a name or a top rate; None: the
    model's default). ``load``: how the model is loaded (dtype, device, device_map, token, remote code).
    ``on_step`` is called with each finished step's number (tests use it to interrupt a run).
    """
    settings.check()
    load = load_options(load)
    if load.device_map is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError("A model spread over the GPUs (device_map) cannot also be trained data-parallel "
                            "by several processes; start one process.")
    ranks = Ranks.from_env(None if load.device_map else load.device)
    try:
        job = _Job(settings, load, ranks, manifest or load_manifest(), on_step)
        job.prepare(model, language_name, registry=registry, mask=mask, selection=selection, name=name,
                    overwrite=overwrite)
        return job.run()
    finally:
        ranks.close()


class _Job:
    """One fine-tuning run, in the order it happens: prepare (everything checked before the model loads),
    load and attach, resume, the loop, then the results."""

    def __init__(self, settings: FinetuneSettings, load: LoadOptions, ranks: Ranks, manifest: Manifest, on_step):
        self.settings, self.load, self.ranks, self.manifest, self.on_step = settings, load, ranks, manifest, on_step
        self.method = settings.method
        self.options = settings.method_options()
        self.out = Path(settings.out)
        self.checkpoint = self.out / CHECKPOINT_FILE

    # -- before the model loads ----------------------------------------------------------------------
    def prepare(self, model: str, language_name: str, *, registry, mask, selection, name, overwrite) -> None:
        settings, manifest = self.settings, self.manifest
        local = registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)
        error = None
        if self.ranks.is_main:  # one process clears a folder for overwrite; the others must not see it half done
            try:
                _check_out(self.out, overwrite, self.method)
            except Exception as exc:  # raised on every rank by ranks.check
                error = exc
        self.ranks.check(error)
        self.ref = resolve_model(model, manifest, name=name, registry=local)
        self.mask = None
        if self.method.needs_mask:
            if isinstance(mask, NeuronMask):
                self.mask = mask
            else:
                file = Path(mask) if mask is not None else None
                self.mask = find_mask(self.ref, language_name, registry=local, file=file, selection=selection,
                                      manifest=manifest)
            if len(self.mask) == 0:
                where = self.mask.location or local.root
                raise MaskError(f"The {self.mask.language} mask of {self.ref.name} in {where} has no neurons, so "
                                "there is nothing to train.", fix="empty_mask",
                                advice="Select with a higher top_rate, or train subset='ffn'.")
        known = [self.mask.provenance.language] if self.mask is not None and self.mask.provenance else []
        self.lang = language(self.mask.language if self.mask is not None else language_name, manifest, known)
        self.source = resolve_corpus(settings.data, self.lang, manifest, settings.text_field)
        self.eval_source = (resolve_corpus(settings.eval_data, self.lang, manifest, settings.text_field)
                            if settings.eval_data else None)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> FinetuneResult:
        settings, ranks = self.settings, self.ranks
        self.loaded = load_model(self.ref, self.load.but(device=ranks.device(self.load.device)))
        model, self.device = self.loaded.model, self.loaded.device
        if self.load.device_map:
            _check_on_devices(model)
        self.info = self.loaded.info()
        if self.mask is not None:
            self.mask.check_sites(self.loaded.sites)
            revision = self.mask.provenance.model.revision if self.mask.provenance else None
            if revision and revision != self.loaded.revision and ranks.is_main:
                log.warning("The mask was computed on revision %s of %s; this model is %s.", revision, self.ref.name,
                            self.loaded.revision)
        self.train_rows, self.eval_rows = _split_rows(self.source, self.eval_source, self.loaded.tokenizer, settings,
                                                      self.lang.code)
        pad_id = self.loaded.tokenizer.pad_token_id
        self.pad_id = pad_id if isinstance(pad_id, int) else 0

        torch.manual_seed(settings.seed)
        self.trained = self.method.attach(self.loaded, settings, self.mask, self.options)
        if settings.quantize:
            from .quantize import quantize_frozen_base

            done = quantize_frozen_base(model, self.loaded.sites)
            log.info("Stored %d frozen projections of the base in 4 bits (NF4): %.2f GiB -> %.2f GiB.", done.modules,
                     done.bytes_before / 2**30, done.bytes_after / 2**30)
        self.named = self.trained.named
        self.params = list(self.named.values())
        self.save_dtype = save_dtype_of(settings, self.loaded)
        model.train()
        undo = self._checkpointing(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: schedule_factor(step,
                                                                                                       settings))
        self.state = {"step": 0, "curve": [], "log": [], "best": None, "best_step": None, "best_loss": math.inf}
        self.resumed_from = self._resume()
        self.step_loss = _loss_step(model, settings.chunked_loss, ranks, self.device, self.trained.find_unused)
        started = time.perf_counter()
        self._loop()
        self.seconds = time.perf_counter() - started
        self._keep_best()
        undo()
        model.eval()
        return self._finish()

    def _checkpointing(self, model):
        """Recompute activations in the backward pass as ``settings.checkpointing`` says; returns the undo.
        ``full`` is transformers' own (every decoder layer); ``mlp`` and a budget are :mod:`.checkpointing`'s."""
        from .checkpointing import enable_checkpointing, parse_checkpointing

        mode = parse_checkpointing(self.settings.checkpointing)
        if mode == "none":
            return lambda: None
        model.config.use_cache = False
        if mode != "full":
            rows = max(row.numel() for row in self.train_rows)
            done = enable_checkpointing(model, self.loaded.sites, mode,
                                        batch_size=self.settings.batch_size, seq_len=rows)
            if self.ranks.is_main:
                log.info("Checkpointing: %s.", done.describe())
            return done.undo
        # transformers 5 renamed it; older versions (>= 4.46, the floor) only have the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            return model.activation_checkpointing_disable
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.gradient_checkpointing_disable

    def _resume(self) -> int:
        if not self.checkpoint.is_file():
            return 0
        saved = _load_checkpoint(self.checkpoint, self.named)
        if saved["settings"] != self.settings.result_settings() or saved["model_revision"] != self.loaded.revision:
            raise FinetuneError(f"{self.out} holds an unfinished run with other settings or another model.",
                                fix="overwrite", advice="Use another output folder, or overwrite=True.")
        if saved.get("world", 1) != self.ranks.world:
            raise FinetuneError(f"{self.out} holds an unfinished run of {saved.get('world', 1)} process(es); this "
                                f"run has {self.ranks.world}. Resume it with as many.", fix="overwrite",
                                advice="Use another output folder, or overwrite=True.")
        with torch.no_grad():
            for key, p in self.named.items():
                p.copy_(saved["trainable"][key])
        self.trained.after_update()
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ranks.world > 1:
            cpu_rng, cuda_rng = saved["rng_per_rank"][self.ranks.rank]
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None and torch.device(self.device).type == "cuda":
                torch.cuda.set_rng_state(cuda_rng, self.device)
        else:
            torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(saved["cuda_rng"])
        self.state = {k: saved.get(k, [] if k == "log" else None) for k in self.state}
        if self.ranks.is_main:
            log.info("Resuming %s from step %d.", self.out, self.state["step"])
        return self.state["step"]

    def _validate(self) -> float:
        return evaluate(self.loaded.model, self.eval_rows, self.settings.batch_size, self.pad_id, self.device,
                        chunked=self.settings.chunked_loss, ranks=self.ranks)

    def _diverged(self, what: str, value: float, step: int) -> FinetuneError:
        return FinetuneError(f"The {what} became {value} at step {step}; the run stopped. Its last checkpoint "
                             f"(step {_checkpoint_step(self.checkpoint)}) is kept.", fix="diverged",
                             advice="Lower lr, or clip gradients (clip=1.0).")

    def _loop(self) -> None:
        settings, ranks, state = self.settings, self.ranks, self.state
        world = ranks.world
        share = slice(ranks.rank * settings.batch_size, (ranks.rank + 1) * settings.batch_size)
        checkpoint_every = settings.checkpoint_every or settings.eval_every
        if state["step"] == 0 and not state["curve"]:
            state["curve"].append({"step": 0, "val_loss": self._validate()})
        bar = progress(settings.steps, f"finetune {self.lang.code} ({settings.subset})", unit="step",
                       initial=state["step"], show=ranks.is_main)
        try:
            while state["step"] < settings.steps:
                step = state["step"]
                lr = self.scheduler.get_last_lr()[0]
                picks = [sample_order(step, micro, settings, len(self.train_rows), world)
                         for micro in range(settings.grad_accum)]
                # Predicted tokens of the whole (global) step: every position after a row's first.
                denominator = sum(max(self.train_rows[i].numel() - 1, 0) for rows in picks for i in rows)
                train_loss = 0.0
                for micro, rows in enumerate(picks):
                    ids, attention, labels = batch_tensors([self.train_rows[i] for i in rows[share]], self.pad_id)
                    last = micro == len(picks) - 1
                    with self.step_loss.no_sync() if world > 1 and not last else nullcontext():
                        loss, _ = self.step_loss(ids.to(self.device), attention.to(self.device),
                                                 labels.to(self.device))
                        # DDP averages the ranks' gradients: times world, they add up to the global batch's.
                        (loss * world / denominator).backward()
                    train_loss += float(loss.detach()) / denominator
                if world > 1:
                    train_loss = float(ranks.sum(torch.tensor([train_loss], dtype=torch.float64)))
                if not math.isfinite(train_loss):
                    raise self._diverged("training loss", train_loss, step + 1)
                self.trained.after_backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, settings.clip or math.inf))
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.trained.after_update()
                state["step"] = step = step + 1
                entry = {"step": step, "train_loss": train_loss, "grad_norm": grad_norm, "lr": lr,
                         "tokens": denominator}
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
                if step % settings.eval_every == 0 or step == settings.steps:
                    val = self._validate()
                    if not math.isfinite(val):
                        raise self._diverged("validation loss", val, step)
                    entry["val_loss"] = val
                    state["curve"].append({"step": step, "train_loss": train_loss, "val_loss": val})
                    if val < state["best_loss"]:
                        state["best_loss"], state["best_step"] = val, step
                        state["best"] = {k: p.detach().cpu().clone() for k, p in self.named.items()}
                state["log"].append(entry)
                if step % checkpoint_every == 0 and step < settings.steps:
                    rng_per_rank = _gather_rng(ranks, self.device)
                    if ranks.is_main:
                        _save_checkpoint(self.checkpoint, state, self.named, self.optimizer, self.scheduler, settings,
                                         self.loaded.revision, world=world, rng_per_rank=rng_per_rank)
                if self.on_step is not None:
                    self.on_step(step)
        finally:
            bar.close()

    def _keep_best(self) -> None:
        if self.state["best"] is None:
            raise FinetuneError("The run ended without a finite validation loss; nothing was written.",
                                fix="diverged")
        with torch.no_grad():
            for key, p in self.named.items():
                p.copy_(self.state["best"][key])
        self.trained.after_update()

    def _finish(self) -> FinetuneResult:
        settings, state, ranks, mask, info = self.settings, self.state, self.ranks, self.mask, self.info
        trainable = sum(p.numel() for p in self.params)
        training = TrainingInfo(**{k: getattr(settings, k) for k in settings.RESULT_KEYS},
                                gradient_checkpointing=settings.gradient_checkpointing,
                                checkpointing=settings.checkpointing, dtype=self.loaded.dtype, device=str(self.device),
                                data=self.source.describe(),
                                eval_data=self.eval_source.describe() if self.eval_source else None,
                                train_rows=len(self.train_rows), eval_rows=len(self.eval_rows),
                                seconds_this_session=round(self.seconds, 3), resumed_from_step=self.resumed_from,
                                master_dtype="float32", world_size=ranks.world, device_map=self.load.device_map,
                                chunked_loss=settings.chunked_loss,
                                options=self.method.result_settings(self.options))
        config = RunConfig(
            base_model=info, base_path=self.ref.source if self.ref.local else None,
            language=LanguageInfo.of(self.lang), subset=settings.subset,
            mask=None if mask is None else MaskRef(
                model=mask.model, language=mask.language, source=mask.source,
                selection=mask.provenance.selection if mask.provenance else None,
                model_revision=mask.provenance.model.revision if mask.provenance else None, sha256=mask.sha256()),
            trainable_parameters=trainable, trainable_share=trainable / info.num_parameters, training=training,
            best_step=state["best_step"], best_val_loss=state["best_loss"], validation_curve=state["curve"],
            steps_log=STEPS_FILE, **self.trained.record())
        error = None
        if ranks.is_main:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                config.merge = self.trained.save(self.out, self.loaded, config, settings, self.save_dtype)
                write_steps(self.out / STEPS_FILE, state["log"])
                # The run config last: it marks the run finished.
                atomic_write_text(self.out / RUN_CONFIG_FILE, config.to_json())
                self.checkpoint.unlink(missing_ok=True)
            except Exception as exc:  # every rank hears of it (and none waits for rank 0 forever)
                error = exc
        ranks.check(error)
        return FinetuneResult(self.out, config, state["curve"], self.resumed_from, is_main=ranks.is_main)


STEP_COLUMNS = ("step", "train_loss", "val_loss", "grad_norm", "lr", "tokens")


def write_steps(path: Path, entries: list[dict]) -> None:
    """``steps.csv``: one row per optimizer step (the validation loss only where one was measured)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(STEP_COLUMNS)
    for entry in entries:
        writer.writerow(["" if entry.get(key) is None else repr(entry[key]) for key in STEP_COLUMNS])
    atomic_write_text(path, buffer.getvalue())


def read_steps(path: Path) -> list[dict]:
    """The rows of a ``steps.csv`` as dicts of numbers (missing cells left out); [] when there is none."""
    if not Path(path).is_file():
        return []
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for row in csv.DictReader(f):
            entry = {}
            for key, value in row.items():
                if key in STEP_COLUMNS and value not in (None, ""):
                    try:
                        entry[key] = int(value) if key in ("step", "tokens") else float(value)
                    except ValueError:
                        continue
            rows.append(entry)
    return rows


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


def _check_out(out: Path, overwrite: bool, method) -> None:
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"The output {out} is a file; give a folder.")
    if overwrite and out.is_dir():
        for name in (CHECKPOINT_FILE, RUN_CONFIG_FILE, STEPS_FILE, *method.run_files):
            target = out / name
            if target.is_file():
                target.unlink()
    elif (out / RUN_CONFIG_FILE).is_file():
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
