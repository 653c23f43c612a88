"""The compute job: count activations for languages, store the counts, select neurons.

This is the orchestration behind ``neuronreg compute`` and ``neuronreg select``; the pieces live in
``corpus`` (text), ``models`` (weights and MLP sites), ``lape.counting``, ``lape.selection`` and
``store.local`` (the registry).
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..corpus import (
    CorpusSource,
    iter_documents,
    pack_rows,
    resolve_corpus,
    row_start,
    row_start_name,
    text_tokens,
)
from ..distributed import Ranks
from ..errors import CorpusError, RegistryError, SettingsConflict, SettingsError, UnknownLanguage
from ..manifest import Language, Manifest
from ..options import LoadOptions, load_options
from ..progress import duration
from ..provenance import CountKey, CountsRecord, CountSummary, LanguageInfo, MaskSource, NeuronsRecord, SelectionInfo
from ..resolve import ModelRef, check_not_an_alias, language_codes, languages, resolve_model
from ..store.local import LocalRegistry
from .counting import ActivationCounts, Checkpoint, count_activations, fingerprint
from .selection import Selection, SelectionParams, select_neurons

log = logging.getLogger("neuronreg")

SEED_PIPELINE_TOKENS = 13_000_000  # about what the seed paper counted per language (GlotCC-V1)
TIE_BREAK = "lowest (layer, neuron) first"


@dataclass
class CountSettings:
    """What is counted: the corpus (a folder, ``hf`` or ``hf:DATASET[:CONFIG]``), tokens per language, row
    length, rows per forward pass, the text's field, and how often progress is checkpointed. How the model
    is loaded (dtype, device, device_map ...) is a :class:`~neuronreg.options.LoadOptions`."""

    corpus: str = "hf"
    tokens: int = SEED_PIPELINE_TOKENS
    seq_len: int = 1024
    batch_size: int = 8
    text_field: str | None = None
    checkpoint_tokens: int = 1_000_000

    def __post_init__(self):
        for key in ("tokens", "seq_len", "batch_size", "checkpoint_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SettingsError(f"{key} must be a positive integer, got {value!r}.")


@dataclass
class LanguageResult:
    code: str
    tokens: int
    status: str  # "counted", "resumed", "unchanged"


@dataclass
class ComputeReport:
    model: ModelRef
    registry: Path
    languages: list[LanguageResult] = field(default_factory=list)
    selection: Selection | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # language -> why it had no text


def _sources(langs: list[Language], settings: CountSettings, manifest, strict: bool):
    """Each language's text; a language without any is skipped with a warning (an error if ``strict``)."""
    from ..corpus import missing_text

    sources, skipped, errors, configs = {}, {}, [], {}
    for lang in langs:
        try:
            source = resolve_corpus(settings.corpus, lang, manifest, settings.text_field)
            missing = missing_text(source, configs)
            if missing is not None:
                raise missing
        except CorpusError as exc:
            if strict:
                raise
            skipped[lang.code] = exc.message
            errors.append(exc)
            continue
        sources[lang.code] = source
    if not sources:  # nothing to count: the reason, as one error
        if len(errors) == 1:
            raise errors[0]
        raise CorpusError(f"None of the {len(langs)} languages has text in {settings.corpus} (the first: "
                          f"{errors[0].message})", fix=errors[0].fix)
    for code, why in skipped.items():
        log.warning("%s: skipped, no text (%s)", code, why)
    return sources, skipped


def _announce(loaded, sizes: dict[str, int], settings: CountSettings, world: int) -> None:
    """Before counting: how much (the text there is, up to the tokens asked for) and, from one timed batch,
    about how long."""
    import time

    rows = torch.randint(0, max(2, len(loaded.tokenizer)), (settings.batch_size, settings.seq_len))
    from ..models import body

    start = time.perf_counter()
    with torch.inference_mode():
        body(loaded.model)(input_ids=rows.to(loaded.device), use_cache=False)
        if str(loaded.device).startswith("cuda"):
            torch.cuda.synchronize()
    rate = rows.numel() / max(time.perf_counter() - start, 1e-9) * world
    total = sum(sizes.values())
    short = {code: n for code, n in sizes.items() if n < settings.tokens}
    if short:
        listed = ", ".join(f"{code} {n:,}" for code, n in list(short.items())[:6])
        more = f" and {len(short) - 6} more" if len(short) > 6 else ""
        amount = (f"{len(sizes)} language(s), {total:,} tokens in all ({settings.tokens:,} asked for each; the text "
                  f"holds less for {listed}{more})")
    else:
        amount = f"{len(sizes)} language(s) x {settings.tokens:,} tokens = {total:,} tokens"
    log.info("Counting %s with %s on %s%s: about %s at %s tokens/s (measured on one batch; the first batches run "
             "slower).", amount, loaded.name, loaded.device, f" x {world} processes" if world > 1 else "",
             duration(total / rate), f"{rate:,.0f}")


def compute(
    model_spec: str,
    language_names: list[str] | str,
    *,
    settings: CountSettings | None = None,
    params: SelectionParams | None = None,
    load: LoadOptions | None = None,
    registry: LocalRegistry | str | Path | None = None,
    manifest: Manifest | None = None,
    select_languages: list[str] | str | None = None,
    name: str | None = None,
    force: bool = False,
    default: bool = False,
    strict: bool = False,
) -> ComputeReport:
    """Count every language not yet in the registry (or changed, with ``force``), then select.

    ``language_names`` are codes, names or sets (``@ntrex``, ``@seed12``, ``@all``). A language
    without text (no file in the corpus folder, no config in the Hub dataset) is reported and
    skipped, unless ``strict``. ``registry``: a LocalRegistry or folder (None: the default one);
    ``load``: how the model is loaded.
    """
    from ..manifest import load_manifest

    settings = settings or CountSettings()
    load = load_options(load)
    manifest = manifest or load_manifest()
    registry = registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)
    params = params or SelectionParams()
    langs = languages(language_names, manifest)
    if not langs:
        raise CorpusError("No language was named.", fix="languages", advice="Name at least one, e.g. ['sw', 'mt'].")
    ref = resolve_model(model_spec, manifest, name=name, registry=registry)
    check_not_an_alias(ref, manifest)
    if ref.source is None:
        raise RegistryError(f"{ref.name} is a name the registry holds, but it does not say where the model's "
                            "weights are.", fix="model_source", advice="Give the model's Hub id or folder.")
    # A name whose datasets config is another model's or selection's is refused now, not after the counting.
    registry.check_config_names(ref.name, _selection_name(params, select_languages, manifest))
    ranks = Ranks.from_env(load.device)
    try:
        with ExitStack() as held:
            # Rank 0 alone writes the registry, so it alone holds the model's lock; every rank hears if
            # it could not be taken.
            error = None
            if ranks.is_main:
                try:
                    held.enter_context(registry.model_lock(ref.name, "compute"))
                except BaseException as exc:
                    error = exc
            ranks.check(error)
            return _compute(langs, ref, ranks, manifest=manifest, registry=registry, settings=settings,
                            params=params, load=load, select_languages=select_languages, force=force,
                            default=default, strict=strict)
    finally:
        ranks.close()


def _selection_name(params: SelectionParams, select_languages, manifest: Manifest) -> str | None:
    """The name of the selection a compute will make (None where its languages are known only later)."""
    from ..store.index import selection_name

    info = SelectionInfo(method="lape", languages=[], top_rate=params.top_rate, filter_rate=params.filter_rate,
                         activation_bar_ratio=params.activation_bar_ratio)
    try:
        over = language_codes(select_languages, manifest) if select_languages else None
    except UnknownLanguage:  # a code only the registry knows: select checks the name when it writes
        return None
    return selection_name(info, over)


def _compute(langs: list[Language], ref: ModelRef, ranks: Ranks, *, manifest, registry: LocalRegistry,
             settings: CountSettings, params, load: LoadOptions, select_languages, force, default,
             strict) -> ComputeReport:
    from ..models import (
        check_device,
        default_device,
        dtype_name,
        load_model,
        local_fingerprint,
        older_fingerprint,
        parse_dtype,
    )

    device = ranks.device(load.device)
    device = (device or default_device()) if load.device_map else check_device(device)
    dtype = dtype_name(parse_dtype(load.dtype, device))
    registry.ensure_writable()
    sources, skipped = _sources(langs, settings, manifest, strict)
    langs = [lang for lang in langs if lang.code in sources]
    # The revision decides whether stored counts are still good: a local folder's is its content hash; a
    # Hub model's is the revision asked for (the commit it resolved to is in the counts' model info).
    revision = local_fingerprint(Path(ref.source)) if ref.local else ref.revision
    # Whether rows are fed after a BOS is the tokenizer's to say, and part of what makes counts comparable;
    # the tokenizer alone is read before deciding what to count (the weights only if something is).
    tokenizer = _load_tokenizer(ref, load)
    start = row_start_name(tokenizer)

    report = ComputeReport(ref, registry.root, skipped=skipped)
    pending: list[tuple[Language, CountKey]] = []
    for lang in langs:
        wanted = CountKey(model_id="local" if ref.local else ref.source, revision=revision,
                          corpus=sources[lang.code].describe(), tokens_requested=settings.tokens,
                          seq_len=settings.seq_len, dtype=dtype, row_start=start)
        if lang.code in registry.counted_languages(ref.name):
            stored = registry.read_counts_record(ref.name, lang.code)
            if stored.settings == wanted and not force:
                report.languages.append(LanguageResult(lang.code, stored.tokens, "unchanged"))
                continue
            if not force:
                changed = wanted.changed(stored.settings)
                older = older_fingerprint(Path(ref.source), stored.settings.revision, "they were counted with") \
                    if ref.local and changed == ["revision"] else None
                raise SettingsConflict(
                    f"The counts of {ref.name}/{lang.code} name the model by fingerprint {older}" if older else
                    f"{ref.name}/{lang.code} was counted with other settings (changed: {', '.join(changed)}).",
                    fix="force", advice="Pass force=True to count it again, or use another registry.")
        pending.append((lang, wanted))

    if pending:
        loaded = load_model(ref, load.but(device=device), tokenizer=False)
        loaded.tokenizer = tokenizer
        info = loaded.info()
        _check_same_model(registry, ref.name, info.num_layers, info.intermediate_size,
                          [lang.code for lang, _ in pending])
        sizes = {lang.code: settings.tokens for lang, _ in pending}
        if ranks.is_main:  # one progress bar and one set of messages: rank 0's
            # The text there is, up to the tokens asked for (a local corpus is sized cheaply first).
            sizes = {lang.code: text_tokens(sources[lang.code], tokenizer, settings.tokens) for lang, _ in pending}
            _announce(loaded, sizes, settings, ranks.world)
        for lang, wanted in pending:
            report.languages.append(_count_language(loaded, info, lang, sources[lang.code], wanted, settings,
                                                    registry, ranks, expected=sizes[lang.code]))
    if ranks.is_main:
        report.selection = select_locked(ref.name, registry=registry, params=params, languages=select_languages,
                                         manifest=manifest, default=default)
    ranks.barrier()
    return report


def _load_tokenizer(ref: ModelRef, load: LoadOptions):
    from transformers import AutoTokenizer

    from ..models import load_error

    try:
        return AutoTokenizer.from_pretrained(ref.source, revision=ref.revision, token=load.token,
                                             trust_remote_code=load.trust_remote_code)
    except Exception as exc:  # transformers and the Hub raise many types; load_error maps them
        raise load_error(ref, exc) from exc


def _check_same_model(registry: LocalRegistry, model: str, layers: int, inter: int, replacing: list[str]) -> None:
    for other in registry.counted_languages(model):
        if other in replacing:
            continue
        stored = registry.read_counts_record(model, other).model
        if (stored.num_layers, stored.intermediate_size) != (layers, inter):
            raise RegistryError(
                f"The registry holds {model} counts of another shape ({stored.num_layers} x "
                f"{stored.intermediate_size}, from {stored.id}) than this model ({layers} x {inter}).",
                fix="name", advice="Store it under another name (name=...).")


def _count_language(loaded, info, lang: Language, source: CorpusSource, wanted: CountKey, settings: CountSettings,
                    registry: LocalRegistry, ranks: Ranks, expected: int | None = None) -> LanguageResult:
    """Count one language; ``expected``: the tokens its text will give (:func:`~neuronreg.corpus.text_tokens`,
    the progress bar's total; default: the tokens asked for)."""
    # Each rank checkpoints its own share; a checkpoint of another world size is not reused.
    # Its totals are checked against the rows' length and the most this rank's share of the rows can hold.
    share = -(-(-(-settings.tokens // settings.seq_len)) // ranks.world) * settings.seq_len
    checkpoint = Checkpoint(registry.checkpoint_path(loaded.name, lang.code, ranks.checkpoint_suffix()),
                            fingerprint({**wanted.to_dict(), "world": ranks.world, "rank": ranks.rank}),
                            seq_len=settings.seq_len, max_tokens=min(settings.tokens, share))
    resumed = checkpoint.path.exists()
    rows = ranks.shard(pack_rows(iter_documents(source), loaded.tokenizer, settings.seq_len, settings.tokens))
    counts, error = None, None
    try:
        counts = count_activations(
            loaded.model, loaded.sites, rows, batch_size=settings.batch_size, device=loaded.device,
            checkpoint=checkpoint, checkpoint_tokens=settings.checkpoint_tokens,
            total_tokens=-(-(expected or settings.tokens) // ranks.world), desc=f"{loaded.name} {lang.code}",
            show=ranks.is_main,
            row_start=row_start(loaded.tokenizer),
        )
    except BaseException as exc:  # every rank must hear of it before anyone waits on a sum
        error = exc
    ranks.check(error)
    resumed = resumed and checkpoint.path.exists()
    if resumed:
        log.info("%s: resumed from a checkpoint", lang.code)
    over_zero = ranks.sum(counts.over_zero)
    tokens = int(ranks.sum(torch.tensor([counts.tokens], dtype=torch.int64)).item())
    # The float64 activation sums add up over ranks like the counts (the means are sums / counts).
    counts = ActivationCounts(over_zero, tokens, ranks.sum(counts.activation_sum), ranks.sum(counts.positive_sum))
    if counts.tokens == 0:
        checkpoint.remove()
        raise CorpusError(f"The corpus for {lang.code} ({source.label}) holds no text.")
    if counts.tokens < settings.tokens and ranks.is_main:
        log.warning("%s: only %s tokens of text (asked for %s); counted all of them.", lang.code,
                    f"{counts.tokens:,}", f"{settings.tokens:,}")
    record = CountsRecord(model=info, language=LanguageInfo.of(lang), corpus=wanted.corpus, tokens=counts.tokens,
                          seq_len=settings.seq_len, dtype=loaded.dtype, settings=wanted)
    if ranks.is_main:
        registry.write_counts(loaded.name, lang.code, counts.over_zero, record, activation_sum=counts.activation_sum,
                              positive_sum=counts.positive_sum)
        if loaded.ref.local:
            registry.remember_source(loaded.name, loaded.ref.source)
    ranks.barrier()  # the file is in place before any rank drops its share's checkpoint
    checkpoint.remove()
    return LanguageResult(lang.code, counts.tokens, "resumed" if resumed else "counted")


def load_count_tensor(registry: LocalRegistry, model: str, codes: list[str]
                      ) -> tuple[torch.Tensor, torch.Tensor, dict[str, CountsRecord]]:
    """Stored counts as ``[L, I, K]`` and ``[K]`` for selection: the ``count`` column alone of each file, one
    language at a time into one tensor allocated once (int32 while every language's tokens fit, else int64),
    so memory holds the counts and one file's column, never a copy of all of them."""
    import numpy as np

    records = {lang: registry.read_counts_record(model, lang) for lang in codes}  # footers only
    first = records[codes[0]].model
    shape = (first.num_layers, first.intermediate_size)
    for lang, record in records.items():
        if (record.model.num_layers, record.model.intermediate_size) != shape:
            raise RegistryError(f"{model}/counts/{lang}.parquet has shape ({record.model.num_layers}, "
                                f"{record.model.intermediate_size}), others {shape}.", fix="force",
                                advice="Count it again.")
    wide = max(record.tokens for record in records.values()) > np.iinfo(np.int32).max
    over_zero = torch.empty((*shape, len(codes)), dtype=torch.int64 if wide else torch.int32)
    columns = over_zero.numpy().reshape(-1, len(codes))
    for k, lang in enumerate(codes):
        data = registry.read_count_array(model, lang)
        if data.shape != shape:  # replaced since its footer was read (a writer without the lock)
            raise RegistryError(f"{model}/counts/{lang}.parquet changed while it was read.", fix="force",
                                advice="Count it again.")
        columns[:, k] = data.count
        records[lang] = data.record
    tokens = torch.tensor([records[lang].tokens for lang in codes], dtype=torch.int64)
    return over_zero, tokens, records


def select(model: str, *, params: SelectionParams | None = None, languages: list[str] | str | None = None,
           registry: LocalRegistry | str | Path | None = None, manifest: Manifest | None = None,
           default: bool = False) -> Selection:
    """Select neurons from the counts in the registry and store them as a selection of the model.

    The selection is named by how it is made (``top1``, ``top5``, ``top5-mt-sw`` when ``languages``
    are given): it is added next to the model's other selections, or replaces the one of the same
    name. The model's first selection, or one made with ``default=True``, is its default.
    ``model`` is anything :func:`~neuronreg.resolve.resolve_model` accepts; ``languages`` any of their
    codes or names (default: every language counted for the model).
    """
    from ..manifest import load_manifest

    manifest = manifest or load_manifest()
    registry = registry if isinstance(registry, LocalRegistry) else LocalRegistry(registry)
    name = resolve_model(model, manifest, registry=registry).name
    with registry.model_lock(name, "select"):
        return select_locked(name, registry=registry, params=params, languages=languages, manifest=manifest,
                             default=default)


def select_locked(name: str, *, registry: LocalRegistry, params: SelectionParams | None, languages,
                  manifest: Manifest, default: bool = False) -> Selection:
    """:func:`select`, for a caller that holds the model's lock."""
    params = params or SelectionParams()
    available = registry.counted_languages(name)
    if not available:
        raise RegistryError(f"The registry at {registry.root} has no counts for {name}.", fix="compute",
                            advice="Compute them first (neuronreg.lape.compute.compute).")
    chosen = language_codes(languages, manifest, available) if languages else available
    missing = [lang for lang in chosen if lang not in available]
    if missing:
        raise RegistryError(f"No counts for {', '.join(missing)} of {name} (available: {', '.join(available)}).",
                            fix="compute")
    over_zero, tokens, records = load_count_tensor(registry, name, chosen)
    selection = select_neurons(over_zero, tokens, chosen, params, model=name)
    del over_zero
    info = SelectionInfo(method="lape", languages=chosen, top_rate=params.top_rate, filter_rate=params.filter_rate,
                         activation_bar_ratio=params.activation_bar_ratio,
                         filter_threshold=selection.filter_threshold, activation_bar=selection.activation_bar,
                         selected_total=selection.selected, tie_break=TIE_BREAK)
    model_info = records[chosen[0]].model
    for lang in chosen:
        # Its own counts in full; of the other languages, the token totals the selection divided by (the
        # whole summary in every file would grow with the square of the languages: 70 KB a file at 128).
        own = records[lang]
        counts = {code: CountSummary(tokens=r.tokens) for code, r in records.items()}
        counts[lang] = CountSummary(tokens=own.tokens, corpus=own.corpus, seq_len=own.seq_len, dtype=own.dtype,
                                    revision=own.model.revision, created=own.created)
        mask = selection.neurons[lang]
        mask.provenance = NeuronsRecord(model=model_info, language=own.language, selection=info,
                                        num_neurons=len(mask), counts=counts)
        mask.source, mask.location = MaskSource(kind="registry"), registry.root
    selection.entry = registry.write_selection(name, selection.neurons, over=chosen if languages else None,
                                               default=default)
    # Counts of an older layout are rewritten once in the current one, after the commit: a select that
    # fails leaves every file as it was. Each file is replaced by one rename and holds the same numbers,
    # so a failure here costs only the space the old layout takes.
    try:
        registry.migrate_counts(name)
    except (RegistryError, OSError) as exc:
        log.warning("The counts of %s stay in their older layout for now (%s).", name, exc)
    return selection
