"""The compute job: count activations for languages, store the counts, select neurons.

This is the orchestration behind ``neuronreg compute`` and ``neuronreg select``; the pieces live
in ``corpus`` (text), ``models`` (weights and MLP sites), ``counting``, ``selection`` and ``store``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .cards import write_registry_card
from .corpus import CorpusSource, iter_documents, pack_rows, resolve_corpus
from .counting import ActivationCounts, Checkpoint, count_activations, fingerprint
from .distributed import Ranks
from .errors import CorpusError, RegistryError, SettingsConflict
from .manifest import Language, Manifest
from .models import ModelRef, default_device, load_model, parse_dtype, resolve_model
from .selection import Selection, SelectionParams, select_neurons
from .store import LocalRegistry, neuron_table

log = logging.getLogger("neuronreg")

SEED_PIPELINE_TOKENS = 13_000_000  # about what the seed paper counted per language (GlotCC-V1)


@dataclass
class CountSettings:
    corpus: str = "hf"
    tokens: int = SEED_PIPELINE_TOKENS
    seq_len: int = 1024
    batch_size: int = 8
    dtype: str | None = None  # None: bf16 on CUDA, fp32 on CPU
    device: str | None = None
    text_field: str | None = None
    checkpoint_tokens: int = 1_000_000
    device_map: str | None = None  # "auto": split one model over the GPUs (accelerate)


@dataclass
class LanguageResult:
    code: str
    tokens: int
    status: str  # "counted", "resumed", "unchanged"


@dataclass
class ComputeReport:
    model: str
    registry: Path
    languages: list[LanguageResult] = field(default_factory=list)
    selection: Selection | None = None


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_languages(names: list[str], manifest: Manifest) -> list[Language]:
    seen: dict[str, Language] = {}
    for name in names:
        for part in name.split(","):
            if part.strip():
                lang = manifest.language(part)
                seen.setdefault(lang.code, lang)
    return list(seen.values())


def _count_settings(ref: ModelRef, source: CorpusSource, settings: CountSettings, dtype: str) -> dict:
    """What makes two counts of one language comparable; a change needs --force."""
    return {
        "model_id": ref.source if not ref.local else "local",
        "revision": ref.revision,
        "corpus": source.describe(),
        "tokens_requested": settings.tokens,
        "seq_len": settings.seq_len,
        "dtype": dtype,
    }


def compute(
    model_spec: str,
    language_names: list[str],
    *,
    manifest: Manifest,
    registry: LocalRegistry,
    settings: CountSettings = CountSettings(),
    params: SelectionParams = SelectionParams(),
    select_languages: list[str] | None = None,
    name: str | None = None,
    force: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
    token: str | None = None,
) -> ComputeReport:
    """Count every language not yet in the registry (or changed, with ``force``), then select."""
    languages = resolve_languages(language_names, manifest)
    if not languages:
        raise CorpusError("Name at least one language, e.g. 'neuronreg compute MODEL sw mt'.")
    ref = resolve_model(model_spec, manifest, name)
    if ref.local:
        from .models import local_fingerprint

        ref = ModelRef(ref.source, local_fingerprint(Path(ref.source)), ref.name, True)
    ranks = Ranks.from_env(settings.device)
    try:
        return _compute(languages, ref, ranks, manifest=manifest, registry=registry, settings=settings, params=params,
                        select_languages=select_languages, force=force, quiet=quiet,
                        trust_remote_code=trust_remote_code, token=token)
    finally:
        ranks.close()


def _compute(languages, ref, ranks, *, manifest, registry, settings, params, select_languages, force, quiet,
             trust_remote_code, token) -> ComputeReport:
    device = ranks.device(settings.device) or default_device()
    dtype = str(parse_dtype(settings.dtype, device)).removeprefix("torch.")
    registry.ensure_writable()
    quiet = quiet or not ranks.is_main  # one progress bar and one set of messages: rank 0's
    sources = {lang.code: resolve_corpus(settings.corpus, lang, manifest, settings.text_field) for lang in languages}

    report = ComputeReport(ref.name, registry.root)
    pending: list[tuple[Language, dict]] = []
    for lang in languages:
        wanted = _count_settings(ref, sources[lang.code], settings, dtype)
        path = registry.counts_path(ref.name, lang.code)
        if path.exists():
            stored = registry.read_provenance(path)
            if stored.get("settings") == wanted and not force:
                report.languages.append(LanguageResult(lang.code, int(stored["tokens"]), "unchanged"))
                continue
            if not force:
                changed = sorted(k for k in wanted if stored.get("settings", {}).get(k) != wanted[k])
                raise SettingsConflict(
                    f"{ref.name}/{lang.code} was counted with other settings (changed: {', '.join(changed)}). "
                    "Add --force to recount it, or use another --registry."
                )
        pending.append((lang, wanted))

    if pending:
        loaded = load_model(ref, dtype=settings.dtype, device=device, trust_remote_code=trust_remote_code, token=token,
                            quiet=quiet, device_map=settings.device_map)
        _check_same_model(registry, ref.name, loaded.num_layers, loaded.intermediate_size, [l.code for l, _ in pending])
        num_parameters = sum(p.numel() for p in loaded.model.parameters())
        for lang, wanted in pending:
            report.languages.append(
                _count_language(loaded, lang, sources[lang.code], wanted, settings, registry, num_parameters, quiet,
                                ranks)
            )
    if ranks.is_main:
        report.selection = select(ref.name, registry=registry, params=params, languages=select_languages)
    ranks.barrier()
    return report


def _check_same_model(registry: LocalRegistry, model: str, layers: int, inter: int, replacing: list[str]) -> None:
    for other in registry.counted_languages(model):
        if other in replacing:
            continue
        stored = registry.read_provenance(registry.counts_path(model, other))
        if (stored.get("num_layers"), stored.get("intermediate_size")) != (layers, inter):
            raise RegistryError(
                f"The registry holds {model} counts of another shape ({stored.get('num_layers')} x "
                f"{stored.get('intermediate_size')}, from {stored.get('model', {}).get('id')}) than this model "
                f"({layers} x {inter}). Use --name to store it under another name."
            )


def _count_language(loaded, lang: Language, source: CorpusSource, wanted: dict, settings: CountSettings,
                    registry: LocalRegistry, num_parameters: int, quiet: bool, ranks: Ranks) -> LanguageResult:
    # Each rank checkpoints its own share; a checkpoint of another world size is not reused.
    checkpoint = Checkpoint(registry.checkpoint_path(loaded.name, lang.code, ranks.checkpoint_suffix()),
                            fingerprint({**wanted, "world": ranks.world, "rank": ranks.rank}))
    resumed = checkpoint.load() is not None
    if resumed:
        log.info("%s: resuming from a checkpoint", lang.code)
    rows = ranks.shard(pack_rows(iter_documents(source), loaded.tokenizer, settings.seq_len, settings.tokens))
    counts, error = None, None
    try:
        counts = count_activations(
            loaded.model, loaded.sites, rows, batch_size=settings.batch_size, device=loaded.device,
            checkpoint=checkpoint, checkpoint_tokens=settings.checkpoint_tokens,
            total_tokens=-(-settings.tokens // ranks.world), desc=f"{loaded.name} {lang.code}", quiet=quiet,
        )
    except BaseException as exc:  # every rank must hear of it before anyone waits on a sum
        error = exc
    ranks.check(error)
    over_zero = ranks.sum(counts.over_zero)
    tokens = int(ranks.sum(torch.tensor([counts.tokens], dtype=torch.int64)).item())
    counts = ActivationCounts(over_zero, tokens)
    if counts.tokens == 0:
        checkpoint.remove()
        raise CorpusError(f"The corpus for {lang.code} ({source.location}) holds no text.")
    if counts.tokens < settings.tokens and ranks.is_main:
        log.warning("%s: only %s tokens of text (asked for %s); counted all of them.", lang.code,
                    f"{counts.tokens:,}", f"{settings.tokens:,}")
    provenance = {
        "kind": "counts",
        "tool": "neuronreg",
        "version": __version__,
        "created": now(),
        # A local folder is named, not located: provenance travels to the Hub, the user's paths do not.
        "model": {"name": loaded.name, "id": Path(loaded.model_id).name if wanted["model_id"] == "local" else loaded.model_id,
                  "revision": loaded.revision, "architecture": type(loaded.model).__name__,
                  "mlp_layout": loaded.sites[0].layout, "num_parameters": num_parameters},
        "num_layers": loaded.num_layers,
        "intermediate_size": loaded.intermediate_size,
        "hidden_size": loaded.hidden_size,
        "language": {"code": lang.code, "name": lang.name, "iso639_3": lang.iso639_3, "script": lang.script,
                     "flores200": lang.flores200},
        "corpus": source.describe(),
        "tokens": counts.tokens,
        "seq_len": settings.seq_len,
        "dtype": loaded.dtype,
        "settings": wanted,
    }
    if ranks.is_main:
        registry.write_counts(loaded.name, lang.code, counts.over_zero, provenance)
    ranks.barrier()  # the file is in place before any rank drops its share's checkpoint
    checkpoint.remove()
    return LanguageResult(lang.code, counts.tokens, "resumed" if resumed else "counted")


def load_count_tensor(registry: LocalRegistry, model: str, languages: list[str]) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict]]:
    """Stack stored counts into ``[L, I, K]`` and ``[K]`` for selection."""
    columns, tokens, provenance = [], [], {}
    for lang in languages:
        over_zero, prov = registry.read_counts(model, lang)
        if columns and over_zero.shape != columns[0].shape:
            raise RegistryError(f"{model}/counts/{lang}.parquet has shape {tuple(over_zero.shape)}, others "
                                f"{tuple(columns[0].shape)}: recompute it with --force.")
        columns.append(over_zero)
        tokens.append(int(prov["tokens"]))
        provenance[lang] = prov
    return torch.stack(columns, dim=-1), torch.tensor(tokens, dtype=torch.int64), provenance


def select(model: str, *, registry: LocalRegistry, params: SelectionParams = SelectionParams(),
           languages: list[str] | None = None) -> Selection:
    """Select neurons from the counts in the registry and rewrite the model's neuron files."""
    available = registry.counted_languages(model)
    if not available:
        raise RegistryError(f"The registry at {registry.root} has no counts for {model}. Run 'neuronreg compute' first.")
    chosen = languages or available
    missing = [lang for lang in chosen if lang not in available]
    if missing:
        raise RegistryError(f"No counts for {', '.join(missing)} of {model} (available: {', '.join(available)}).")
    over_zero, tokens, counts_prov = load_count_tensor(registry, model, chosen)
    selection = select_neurons(over_zero, tokens, chosen, params)
    first = counts_prov[chosen[0]]
    shared = {
        "kind": "neurons",
        "tool": "neuronreg",
        "version": __version__,
        "created": now(),
        "model": first["model"],
        "num_layers": selection.num_layers,
        "intermediate_size": selection.intermediate_size,
        "hidden_size": first["hidden_size"],
        "selection": {
            **asdict(params),
            "method": "lape",
            "languages": chosen,
            "filter_threshold": selection.filter_threshold,
            "activation_bar": selection.activation_bar,
            "selected_total": selection.selected,
            "tie_break": "lowest (layer, neuron) first",
        },
        "counts": {lang: {"tokens": p["tokens"], "corpus": p["corpus"], "seq_len": p["seq_len"], "dtype": p["dtype"],
                          "revision": p["model"]["revision"], "created": p["created"]}
                   for lang, p in counts_prov.items()},
    }
    tables = {}
    for lang in chosen:
        neurons = selection.neurons[lang]
        prov = {**shared, "language": counts_prov[lang]["language"], "num_neurons": len(neurons),
                "tokens": counts_prov[lang]["tokens"], "corpus": counts_prov[lang]["corpus"],
                "seq_len": counts_prov[lang]["seq_len"], "dtype": counts_prov[lang]["dtype"]}
        tables[lang] = (neuron_table(neurons.layer, neurons.neuron, neurons.entropy, neurons.activation_prob), prov)
    registry.write_neurons(model, tables)
    write_registry_card(registry)
    return selection
