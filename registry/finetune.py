"""Sparse fine-tuning of one language's neurons (the seed paper's method), and its baselines.

``finetune`` trains, on a language's text, only what ``--subset`` names:

* ``lape`` (default): the language's LAPE neurons from a registry, as row-sparse deltas
  (:mod:`neuronreg.sparse`): optimizer state and gradients scale with the neurons, not the model;
* ``random``: the same number of neurons in every layer, drawn with the seed (the paper's control);
* ``ffn``: every weight of every MLP (dense ``requires_grad``); ``full``: every weight.

Text is packed as ``compute`` packs it (``pack_rows``); the last 2% of the rows (or ``--eval-data``)
are the validation split, evaluated before training, every ``eval_every`` steps and at the end; the
deltas (or weights) of the best evaluation are what the run keeps. Batches follow a fixed order that
depends only on the seed and the step, and checkpoints (written to a temporary file, then renamed)
hold the trainable weights, the AdamW and schedule state and the RNG state, so an interrupted run
resumes to exactly the result of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .corpus import iter_documents, pack_rows, resolve_corpus
from .errors import CorpusError, FinetuneError, MaskError, RegistryError
from .manifest import Manifest
from .mask import NeuronMask
from .models import load_model, resolve_model
from .progress import progress
from .sparse import (
    CONFIG_FILE,
    DELTA_FILE,
    FULL_MODEL_DIR,
    MERGED_DIR,
    SECOND_PROJECTION,
    LayerDelta,
    attach_deltas,
    merge_deltas,
    save_delta,
)
from .store import LocalRegistry, atomic_path

log = logging.getLogger("neuronreg")

SUBSETS = ("lape", "random", "ffn", "full")
SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINT_FILE = "checkpoint.pt"
IGNORE = -100


@dataclass
class FinetuneSettings:
    data: str  # a folder with one <language>.txt/.jsonl/.parquet, like compute's --corpus
    out: str
    subset: str = "lape"
    steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1
    seq_len: int = 512
    tokens: int = 100_000_000  # at most this much training text is read
    lr: float = 1e-4
    weight_decay: float = 0.01
    clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    eval_every: int = 100
    eval_data: str | None = None
    eval_fraction: float = 0.02
    checkpoint_every: int | None = None  # default: eval_every
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    gradient_checkpointing: bool = False
    text_field: str | None = None
    merged: bool = False

    def result_settings(self) -> dict:
        """What decides the result: a resumed run must have the same values."""
        keys = ("subset", "steps", "batch_size", "grad_accum", "seq_len", "tokens", "lr", "weight_decay", "clip",
                "warmup_steps", "schedule", "eval_every", "eval_fraction", "seed", "gradient_checkpointing")
        return {k: getattr(self, k) for k in keys}


@dataclass
class FinetuneResult:
    out: Path
    config: dict
    curve: list[dict] = field(default_factory=list)
    resumed_from: int = 0


# -- what to train ------------------------------------------------------------------------------------
def random_per_layer(counts: list[int], intermediate_size: int, seed: int) -> list[torch.Tensor]:
    """``counts[l]`` distinct neurons of layer ``l``, uniformly drawn with ``seed``, sorted."""
    generator = torch.Generator().manual_seed(seed)
    drawn = []
    for layer, count in enumerate(counts):
        if not 0 <= count <= intermediate_size:
            raise MaskError(f"Cannot draw {count} of {intermediate_size} neurons in layer {layer}.")
        drawn.append(torch.randperm(intermediate_size, generator=generator)[:count].sort().values)
    return drawn


def read_mask(registry: LocalRegistry | Path, model: str, language: str, manifest: Manifest) -> NeuronMask:
    """The language's mask from a LOCAL registry folder or a neuron Parquet file (as ``fetch -o x.parquet``
    writes it), never the Hub; or one error saying what is there."""
    from .hub import load_mask
    from .mask import read_mask_file

    try:
        code = manifest.language(language).code
    except Exception:  # a code the manifest does not know may still be in a registry
        code = language
    if isinstance(registry, Path):
        return read_mask_file(registry, model, code, {"file": str(registry.resolve())})
    if not registry.neuron_path(model, code).is_file():
        have = registry.selected_languages(model)
        if not have:
            raise RegistryError(f"The registry at {registry.root} has no neurons for {model}. Run 'neuronreg compute "
                                f"{model} LANG...' first, or point --mask to the registry that has them.")
        raise RegistryError(f"No {code} neurons for {model} in {registry.root} (available: {', '.join(have)}).")
    return load_mask(model, code, registry=registry, manifest=manifest)


# -- data ---------------------------------------------------------------------------------------------
def read_rows(source, tokenizer, seq_len: int, tokens: int) -> list[torch.Tensor]:
    """Packed rows, kept as int32 (half the memory of the int64 ids; 100M tokens take 400 MB)."""
    dtype = torch.int32 if len(tokenizer) < 2**31 else torch.long
    return [row.to(dtype) for row in pack_rows(iter_documents(source), tokenizer, seq_len, tokens)]


def batch_tensors(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and labels; a short row is padded on the right and its pads get no loss."""
    length = max(r.numel() for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : row.numel()] = row
        attention[i, : row.numel()] = 1
    labels = ids.masked_fill(attention == 0, IGNORE)
    return ids, attention, labels


def sample_order(step: int, micro: int, settings: FinetuneSettings, num_rows: int) -> list[int]:
    """Row indices of one micro-batch: a seeded permutation per epoch, a function of the step alone."""
    start = (step * settings.grad_accum + micro) * settings.batch_size
    picks = []
    cache: dict[int, torch.Tensor] = {}
    for position in range(start, start + settings.batch_size):
        epoch, offset = divmod(position, num_rows)
        if epoch not in cache:
            cache[epoch] = torch.randperm(num_rows, generator=torch.Generator().manual_seed(settings.seed * 100_003
                                                                                            + epoch))
        picks.append(int(cache[epoch][offset]))
    return picks


def token_loss_sum(model, ids, attention, labels) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over real (non-pad) target tokens, and their number."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    target = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((target != IGNORE).sum())


def evaluate(model, rows: list[torch.Tensor], batch_size: int, pad_id: int, device) -> float:
    """Mean next-token loss (nats) over the validation rows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids, attention, labels = (t.to(device) for t in batch_tensors(rows[start:start + batch_size], pad_id))
            loss, n = token_loss_sum(model, ids, attention, labels)
            total, count = total + float(loss), count + n
    model.train(was_training)
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
    on_step=None,  # called with the finished step number; tests use it to interrupt a run
) -> FinetuneResult:
    """Train the language's subnetwork (or a baseline) and write the run folder.

    ``registry`` is where the mask comes from: a local registry, or the Path of one mask file.
    """
    _check_settings(settings)
    lang = manifest.language(language)
    out = Path(settings.out)
    _check_out(out, overwrite)

    ref = resolve_model(model_spec, manifest, name)
    mask = None
    if settings.subset in ("lape", "random"):
        mask = read_mask(registry, ref.name, lang.code, manifest)
        if len(mask) == 0:
            raise MaskError(f"The {lang.code} mask of {ref.name} in {_where(registry)} has no neurons, so there is "
                            "nothing to train. Select with a higher --top-rate, or use --subset ffn.")
    source = resolve_corpus(settings.data, lang, manifest, settings.text_field)
    eval_source = (resolve_corpus(settings.eval_data, lang, manifest, settings.text_field) if settings.eval_data
                   else None)

    loaded = load_model(ref, dtype=settings.dtype, device=settings.device, trust_remote_code=trust_remote_code,
                        token=token, quiet=quiet)
    model, device = loaded.model, loaded.device
    if mask is not None:
        mask.check(model)
        mask_revision = mask.provenance.get("model", {}).get("revision")
        if mask_revision and mask_revision != loaded.revision:
            log.warning("The mask was computed on revision %s of %s; this model is %s.", mask_revision, ref.name,
                        loaded.revision)

    train_rows, eval_rows = _split_rows(source, eval_source, loaded.tokenizer, settings, lang.code)
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = pad_id if isinstance(pad_id, int) else 0

    # What is trainable.
    torch.manual_seed(settings.seed)
    layers: list[LayerDelta] = []
    per_layer = None
    if settings.subset == "lape":
        per_layer = mask.per_layer()
    elif settings.subset == "random":
        per_layer = random_per_layer(mask.counts_per_layer(), mask.intermediate_size, settings.seed)
    if per_layer is not None:
        layers = attach_deltas(model, per_layer, loaded.sites)
        named = {f"{layer.prefix}.{i}": p for layer in layers for i, p in enumerate(layer.parameters())}
    else:
        named = _dense_trainable(model, settings.subset, loaded.sites)
    params = list(named.values())
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(("delta", "bias_delta")))

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
        saved = torch.load(checkpoint, weights_only=True, map_location="cpu")  # tensors and plain data only
        if saved["settings"] != settings.result_settings() or saved["model_revision"] != loaded.revision:
            raise FinetuneError(f"{out} holds an unfinished run with other settings or another model; use another "
                                "--out, or --overwrite to start again.")
        with torch.no_grad():
            for key, p in named.items():
                p.copy_(saved["trainable"][key])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        state = {k: saved[k] for k in state}
        resumed_from = state["step"]
        log.info("Resuming %s from step %d.", out, resumed_from)

    eval_every = settings.eval_every
    checkpoint_every = settings.checkpoint_every or eval_every
    if state["step"] == 0 and not state["curve"]:
        state["curve"].append({"step": 0, "val_loss": evaluate(model, eval_rows, settings.batch_size, pad_id, device)})
    bar = progress(settings.steps, f"finetune {lang.code} ({settings.subset})", unit="step", quiet=quiet,
                   initial=state["step"])
    started = time.perf_counter()
    try:
        while state["step"] < settings.steps:
            step = state["step"]
            batches = [batch_tensors([train_rows[i] for i in sample_order(step, micro, settings, len(train_rows))],
                                     pad_id) for micro in range(settings.grad_accum)]
            denominator = sum(int((labels[:, 1:] != IGNORE).sum()) for _, _, labels in batches)
            train_loss = 0.0
            for ids, attention, labels in batches:
                loss, _ = token_loss_sum(model, ids.to(device), attention.to(device), labels.to(device))
                (loss / denominator).backward()
                train_loss += float(loss.detach()) / denominator
            if settings.clip:
                torch.nn.utils.clip_grad_norm_(params, settings.clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", refresh=False)
            if step % eval_every == 0 or step == settings.steps:
                val = evaluate(model, eval_rows, settings.batch_size, pad_id, device)
                state["curve"].append({"step": step, "train_loss": train_loss, "val_loss": val})
                if val < state["best_loss"]:
                    state["best_loss"], state["best_step"] = val, step
                    state["best"] = {k: p.detach().cpu().clone() for k, p in named.items()}
            if step % checkpoint_every == 0 and step < settings.steps:
                _save_checkpoint(checkpoint, state, named, optimizer, scheduler, settings, loaded.revision)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
    seconds = time.perf_counter() - started

    # Keep the best evaluation's weights.
    if state["best"] is not None:
        with torch.no_grad():
            for key, p in named.items():
                p.copy_(state["best"][key])
    if settings.gradient_checkpointing:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    model.eval()

    config = {
        "format": "neuronreg-delta", "version": 1, "tool_version": __version__,
        "base_model": {"name": ref.name, "id": Path(loaded.model_id).name if ref.local else loaded.model_id,
                       "path": loaded.model_id if ref.local else None, "revision": loaded.revision,
                       "architecture": type(model).__name__, "mlp_layout": loaded.sites[0].layout,
                       "num_layers": loaded.num_layers, "intermediate_size": loaded.intermediate_size,
                       "hidden_size": loaded.hidden_size, "num_parameters": total},
        "language": {"code": lang.code, "name": lang.name, "flores200": lang.flores200},
        "subset": settings.subset,
        "mask": None if mask is None else {"source": mask.source, "model": mask.model,
                                           "selection": mask.provenance.get("selection"),
                                           "mask_model_revision": mask.provenance.get("model", {}).get("revision")},
        "neurons": None if per_layer is None else {"total": int(sum(t.numel() for t in per_layer)),
                                                   "per_layer": [int(t.numel()) for t in per_layer]},
        "trainable_parameters": trainable,
        "trainable_share": trainable / total,
        "training": {**settings.result_settings(), "dtype": loaded.dtype, "device": str(device),
                     "data": _describe(source), "eval_data": _describe(eval_source) if eval_source else None,
                     "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                     "optimizer": "AdamW", "betas": [0.9, 0.999], "eps": 1e-8,
                     "seconds_this_session": round(seconds, 3), "resumed_from_step": resumed_from},
        "best_step": state["best_step"], "best_val_loss": state["best_loss"] if state["best"] is not None else None,
        "validation_curve": state["curve"],
    }
    _write_outputs(out, model, loaded, layers, config, settings)
    checkpoint.unlink(missing_ok=True)
    return FinetuneResult(out, config, state["curve"], resumed_from)


def _where(registry) -> str:
    return str(registry) if isinstance(registry, Path) else str(registry.root)


def _check_settings(settings: FinetuneSettings) -> None:
    if settings.subset not in SUBSETS:
        raise FinetuneError(f"Unknown subset {settings.subset!r}; use one of {', '.join(SUBSETS)}.")
    if settings.schedule not in SCHEDULES:
        raise FinetuneError(f"Unknown schedule {settings.schedule!r}; use one of {', '.join(SCHEDULES)}.")
    for key in ("steps", "batch_size", "grad_accum", "seq_len", "eval_every"):
        if getattr(settings, key) < 1:
            raise FinetuneError(f"{key.replace('_', '-')} must be at least 1.")
    if settings.lr <= 0 or settings.weight_decay < 0 or settings.clip < 0 or settings.warmup_steps < 0:
        raise FinetuneError("--lr must be positive; --weight-decay, --clip and --warmup-steps not negative.")
    if not 0 < settings.eval_fraction < 1:
        raise FinetuneError("The validation fraction must be between 0 and 1.")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file; give a folder.")
    if overwrite and out.is_dir():
        for name in (CHECKPOINT_FILE, CONFIG_FILE, DELTA_FILE):
            (out / name).unlink(missing_ok=True)
    elif (out / CONFIG_FILE).is_file():
        raise FinetuneError(f"{out} already holds a finished run; use another --out, or --overwrite to replace it.")


def _split_rows(source, eval_source, tokenizer, settings: FinetuneSettings, code: str):
    rows = read_rows(source, tokenizer, settings.seq_len, settings.tokens)
    if not rows:
        raise CorpusError(f"The training text for {code} ({Path(source.location).name}) holds no text; give it some.")
    if eval_source is not None:
        eval_rows = read_rows(eval_source, tokenizer, settings.seq_len, settings.tokens)
        if not eval_rows:
            raise CorpusError(f"The validation text for {code} ({Path(eval_source.location).name}) holds no text.")
        return rows, eval_rows
    if len(rows) < 2:
        raise CorpusError(f"The text for {code} makes only {len(rows)} row of {settings.seq_len} tokens: too little "
                          "to keep a validation split. Give more text, a smaller --seq-len, or --eval-data.")
    held = max(1, int(len(rows) * settings.eval_fraction))
    return rows[:-held], rows[-held:]


def _describe(source) -> dict:
    return source.describe()


def _dense_trainable(model, subset: str, sites) -> dict[str, torch.nn.Parameter]:
    if subset == "full":
        named = dict(model.named_parameters())
    else:
        wanted = set()
        for site in sites:
            modules = [site.projection, getattr(site.mlp, SECOND_PROJECTION[site.layout])]
            if site.layout == "gated":
                modules.append(site.mlp.up_proj)
            for module in modules:
                wanted.update(id(p) for p in module.parameters())
        named = {n: p for n, p in model.named_parameters() if id(p) in wanted}
    for n, p in model.named_parameters():
        p.requires_grad_(n in named)
    return named


def _save_checkpoint(path: Path, state: dict, named: dict, optimizer, scheduler, settings: FinetuneSettings,
                     revision: str) -> None:
    payload = {**state, "trainable": {k: p.detach().cpu() for k, p in named.items()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
               "settings": settings.result_settings(), "model_revision": revision}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _write_outputs(out: Path, model, loaded, layers: list[LayerDelta], config: dict, settings: FinetuneSettings
                   ) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if layers:
        save_delta(layers, out / DELTA_FILE, {"base_model": config["base_model"]["id"],
                                              "revision": config["base_model"]["revision"],
                                              "language": config["language"]["code"]})
    if settings.subset in ("ffn", "full"):
        _save_pretrained(model, loaded.tokenizer, out / FULL_MODEL_DIR)
    elif settings.merged:
        merge_deltas(layers)
        _save_pretrained(model, loaded.tokenizer, out / MERGED_DIR)
    with atomic_path(out / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")


def _save_pretrained(model, tokenizer, folder: Path) -> None:
    """save_pretrained into a temporary folder that is renamed into place."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# -- evaluation of a finished run -----------------------------------------------------------------------
@dataclass
class RunEvaluation:
    run: Path
    language: str  # the language the run trained
    scores: dict[str, dict]  # language -> {"tokens", "base_loss", "tuned_loss", "base_perplexity", ...}

    def lines(self) -> list[str]:
        rows = [f"{'language':<10} {'tokens':>9} {'ppl before':>11} {'ppl after':>10} {'change':>8} "
                f"{'bpc before':>11} {'bpc after':>10}"]
        for code, s in self.scores.items():
            mark = " (trained)" if code == self.language else ""
            rows.append(f"{code:<10} {s['tokens']:>9,} {s['base_perplexity']:>11.3f} {s['tuned_perplexity']:>10.3f} "
                        f"{100 * (s['tuned_perplexity'] / s['base_perplexity'] - 1):>+7.2f}% "
                        f"{s['base_bits_per_character']:>11.4f} {s['tuned_bits_per_character']:>10.4f}{mark}")
        return rows


def evaluate_run(folder: str | Path, data: str, languages: list[str] | None, *, manifest: Manifest,
                 tokens: int = 100_000, seq_len: int = 512, batch_size: int = 4, dtype: str | None = None,
                 device: str | None = None, text_field: str | None = None, token: str | None = None,
                 trust_remote_code: bool = False) -> RunEvaluation:
    """Perplexity and bits per character per language, before (base model) and after (base + delta) a
    finetune run, on held-out text, measured exactly as ``ablate`` measures them: every token of the
    packed stream is predicted once, and bits per character divide by the characters of that text,
    so they compare across tokenizers."""
    from transformers import AutoTokenizer

    from .ablation import Score, heldout_text, negative_log_likelihood
    from .sparse import FULL_MODEL_DIR as DENSE_DIR
    from .sparse import base_source, load_base_model, load_sparse_model, read_run_config

    folder = Path(folder)
    config = read_run_config(folder)
    trained = config["language"]["code"]
    codes = list(dict.fromkeys(manifest.language(name).code for name in (languages or [trained])))
    sources = {code: resolve_corpus(data, manifest.language(code), manifest, text_field) for code in codes}
    tokenizer_source = str(folder / DENSE_DIR) if config["subset"] in ("ffn", "full") else base_source(config)[0]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    heldout = {code: heldout_text(source, code, tokenizer, seq_len, tokens) for code, source in sources.items()}
    scores: dict[str, dict] = {code: {"tokens": h.tokens, "characters": h.characters} for code, h in heldout.items()}

    def tuned(folder, **kw):
        return load_sparse_model(folder, merge=True, **kw)

    for label, loader in (("base", load_base_model), ("tuned", tuned)):
        model = loader(folder, dtype=dtype, device=device, token=token, trust_remote_code=trust_remote_code)
        model_device = next(model.parameters()).device
        for code, h in heldout.items():
            nll, predicted = negative_log_likelihood(model, h.inputs, batch_size=batch_size, device=model_device)
            score = Score(nll, predicted, h.characters)
            scores[code][f"{label}_loss"] = score.loss
            scores[code][f"{label}_perplexity"] = score.perplexity
            scores[code][f"{label}_bits_per_character"] = score.bits_per_character
        del model
    return RunEvaluation(folder, trained, scores)
