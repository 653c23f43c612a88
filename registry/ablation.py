"""Ablation: switch off one language's neurons and measure perplexity on every language.

This is how the LAPE authors validated their neurons (Tang et al. 2024): with the
neurons of language A set to zero, A's perplexity should rise far more than any other language's.
For every mask (each language's, plus a random control with the same count per layer) the
activations of its neurons are zeroed by forward hooks on each layer's activation module, the
module whose output ``compute`` counts: ``act_fn(gate_proj(x))`` of gated MLPs (so the neuron's
``act * up`` product and its ``down_proj`` column contribute nothing; for Phi-3's fused
``gate_up_proj`` the module sees the gate half, which is right), ``act(fc1(x))`` of plain ones.
The weights are never modified and the hooks exist only inside :func:`zeroed_neurons`.

How the numbers are measured (also in ``docs/ablation.md``):

* The held-out text of each language is packed exactly as ``compute`` packs text (``pack_rows``:
  no special tokens, the separator (EOS) after every document, rows of ``seq_len`` tokens, no
  padding, at most ``tokens`` tokens). Each row is fed with one token of context before it: the
  last token of the previous row, or the separator for the first row (as if a document had just
  ended). So every token of the evaluated stream is predicted exactly once.
* loss = total next-token negative log-likelihood (nats) / number of predicted tokens;
  perplexity = exp(loss).
* bits per character = total NLL / ln 2 / characters, where characters are those of the text the
  evaluated tokens spell: every complete document counts ``len(text)`` plus 1 for its separator
  (the line break that ends it in the file); a document cut by the token budget counts the
  characters up to the end of its last evaluated token (from the tokenizer's offsets).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__
from .corpus import TOKENIZE_BATCH, CorpusSource, _batched, iter_documents, pack_rows, resolve_corpus, separator_id
from .counting import batches
from .errors import CorpusError, HeldOutOverlap, MaskError, RegistryError, UnknownLanguage
from .manifest import Manifest
from .mask import NeuronMask, mask_from_table
from .models import MLPSite, default_device, load_model, resolve_model
from .progress import progress
from .store import LocalRegistry, atomic_path

log = logging.getLogger("neuronreg")

BASELINE = "baseline"  # no neuron switched off
RANDOM = "random"  # the control row: random neurons, the mean count per layer of the language masks
FILES = {"json": "ablation.json", "csv": "ablation.csv", "long_csv": "measurements.csv", "png": "ablation.png"}


@dataclass
class AblationSettings:
    data: str  # a folder of <language>.txt/.jsonl/.parquet, like compute's --corpus
    tokens: int = 100_000  # per language
    seq_len: int = 1024
    batch_size: int = 4
    dtype: str | None = None
    device: str | None = None
    text_field: str | None = None
    seed: int = 0  # of the random control
    allow_same_text: bool = False
    exclusive: bool = False  # switch off only the neurons of a language that no other evaluated language has


# -- masks ------------------------------------------------------------------------------------------
def stored_language(registry: LocalRegistry, model: str, name: str, manifest: Manifest) -> str:
    """The registry code of a language given by any of its codes or its name."""
    if name in registry.selected_languages(model):
        return name
    try:
        return manifest.language(name).code
    except UnknownLanguage:
        if registry.selected_languages(model):
            raise
        return name  # the error that follows says the registry has no neurons at all


def load_masks(registry: LocalRegistry, model: str, languages: list[str]) -> dict[str, NeuronMask]:
    """Each language's mask from the local registry, or one error naming what is there."""
    available = registry.selected_languages(model)
    if not available:
        raise RegistryError(f"The registry at {registry.root} has no neurons for {model}. Run 'neuronreg compute "
                            f"{model} LANG...' first (or pass --registry).")
    missing = [lang for lang in languages if lang not in available]
    if missing:
        raise RegistryError(f"No {', '.join(missing)} neurons for {model} in {registry.root} (available: "
                            f"{', '.join(available)}). Compute them first, or leave them out of --languages.")
    masks = {}
    for lang in languages:
        table, provenance = registry.read_neurons(model, lang)
        masks[lang] = mask_from_table(table, provenance, model, lang, {"registry": str(registry.root)})
    shapes = {(m.num_layers, m.intermediate_size) for m in masks.values()}
    if len(shapes) > 1:
        raise MaskError(f"The masks of {model} disagree on the model's shape ({sorted(shapes)}); run 'neuronreg "
                        "select' again.")
    return masks


def exclusive_masks(masks: dict[str, NeuronMask]) -> dict[str, NeuronMask]:
    """Each mask without the neurons that another of the masks also holds."""
    keys = {lang: set(_keys(mask).tolist()) for lang, mask in masks.items()}
    result = {}
    for lang, mask in masks.items():
        shared = set().union(*(other for name, other in keys.items() if name != lang))
        keep = torch.tensor([key not in shared for key in _keys(mask).tolist()], dtype=torch.bool)
        result[lang] = NeuronMask(mask.model, mask.language, mask.num_layers, mask.intermediate_size, mask.layer[keep],
                                  mask.neuron[keep], {**mask.provenance, "exclusive_of": sorted(set(masks) - {lang})},
                                  mask.source)
    return result


def shared_neurons(masks: dict[str, NeuronMask]) -> dict[str, dict[str, int]]:
    """How many neurons each pair of masks holds in common (the diagonal: each mask's size)."""
    keys = {lang: set(_keys(mask).tolist()) for lang, mask in masks.items()}
    return {a: {b: len(keys[a] & keys[b]) for b in keys} for a in keys}


def _keys(mask: NeuronMask) -> torch.Tensor:
    return mask.layer * mask.intermediate_size + mask.neuron


def matched_counts(masks: Iterable[NeuronMask]) -> list[int]:
    """Per layer, the mean neuron count of the masks, rounded (half to even)."""
    counts = torch.tensor([m.counts_per_layer() for m in masks], dtype=torch.float64)
    return [round(float(c)) for c in counts.mean(0)]


def random_mask(model: str, counts: list[int], intermediate_size: int, seed: int) -> NeuronMask:
    """``counts[l]`` neurons of layer ``l`` drawn uniformly without replacement; the same seed, the same mask."""
    generator = torch.Generator().manual_seed(seed)
    layer, neuron = [], []
    for index, count in enumerate(counts):
        if not 0 <= count <= intermediate_size:
            raise MaskError(f"Cannot draw {count} of {intermediate_size} neurons in layer {index}.")
        drawn = torch.randperm(intermediate_size, generator=generator)[:count].sort().values
        neuron.append(drawn)
        layer.append(torch.full_like(drawn, index))
    provenance = {"kind": "random", "seed": seed, "per_layer": list(counts), "num_layers": len(counts),
                  "intermediate_size": intermediate_size}
    return NeuronMask(model, RANDOM, len(counts), intermediate_size, torch.cat(layer), torch.cat(neuron), provenance)


def check_fits(sites: list[MLPSite], mask: NeuronMask) -> None:
    if len(sites) != mask.num_layers or any(site.intermediate_size != mask.intermediate_size for site in sites):
        raise MaskError(
            f"The {mask.language} mask of {mask.model} is for {mask.num_layers} layers x {mask.intermediate_size} "
            f"neurons, but this model has {len(sites)} x {sites[0].intermediate_size}. Use the mask of this model "
            "(or --name to pick the registry entry)."
        )


@contextmanager
def zeroed_neurons(sites: list[MLPSite], mask: NeuronMask) -> Iterator[None]:
    """Inside the block, the mask's neurons output 0 on every forward pass; afterwards no hook is left."""
    check_fits(sites, mask)
    handles = []
    try:
        for site, indices in zip(sites, mask.per_layer()):
            if indices.numel():
                device = next(site.projection.parameters()).device
                handles.append(site.activation.register_forward_hook(_zero(indices.to(device))))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _zero(indices: torch.Tensor):
    def hook(module, inputs, output):
        return output.index_fill(-1, indices, 0.0)

    return hook


# -- held-out text and perplexity -------------------------------------------------------------------
@dataclass
class HeldOut:
    """One language's held-out text, packed and ready to evaluate."""

    language: str
    corpus: dict  # CorpusSource.describe()
    inputs: list[torch.Tensor]  # one context token + one packed row each
    tokens: int  # tokens predicted (every token of the evaluated stream)
    characters: int


def heldout_text(source: CorpusSource, language: str, tokenizer, seq_len: int, max_tokens: int) -> HeldOut:
    sep = separator_id(tokenizer)
    rows = list(pack_rows(iter_documents(source), tokenizer, seq_len, max_tokens))
    tokens = sum(row.numel() for row in rows)
    if tokens == 0:
        raise CorpusError(f"The held-out text for {language} ({source.location}) holds no text; give it some.")
    inputs, previous = [], sep
    for row in rows:
        inputs.append(row if previous is None else torch.cat([torch.tensor([previous]), row]))
        previous = int(row[-1])
    characters = stream_characters(source, tokenizer, tokens, sep)
    if sep is None:  # no token to put before the stream: its first token has no context and is not predicted
        tokens -= 1
    return HeldOut(language, source.describe(), inputs, tokens, characters)


def stream_characters(source: CorpusSource, tokenizer, tokens: int, sep: int | None) -> int:
    """Characters of the text that the first ``tokens`` tokens of the packed stream spell."""
    remaining, characters = tokens, 0
    for batch in _batched(iter_documents(source), TOKENIZE_BATCH):
        for text, ids in zip(batch, tokenizer(batch, add_special_tokens=False)["input_ids"]):
            if remaining <= 0:
                return characters
            if len(ids) > remaining:
                return characters + _prefix_characters(tokenizer, text, ids, remaining)
            characters += len(text)
            remaining -= len(ids)
            if sep is not None and remaining > 0:
                characters += 1  # the separator stands for the line break that ends the document
                remaining -= 1
    return characters


def _prefix_characters(tokenizer, text: str, ids: list[int], count: int) -> int:
    """Characters of ``text`` covered by its first ``count`` tokens."""
    if count <= 0:
        return 0
    try:
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return int(max(end for _, end in offsets[:count]))
    except (NotImplementedError, ValueError, KeyError, TypeError):  # slow tokenizers have no offsets
        return len(tokenizer.decode(ids[:count], clean_up_tokenization_spaces=False))


@dataclass
class Score:
    """Totals over one language's held-out text under one condition."""

    nll: float  # nats, summed over predicted tokens
    tokens: int  # predicted tokens
    characters: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_character(self) -> float:
        return self.nll / math.log(2) / self.characters

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_character": self.bits_per_character,
                "nll": self.nll, "tokens": self.tokens, "characters": self.characters}


def negative_log_likelihood(model: torch.nn.Module, inputs: list[torch.Tensor], *, batch_size: int, device,
                            bar=None) -> tuple[float, int]:
    """Summed next-token NLL (nats) over every position after the first of each input, and their number."""
    total, predicted = 0.0, 0
    with torch.inference_mode():
        for batch in batches(inputs, batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            for i in range(batch.shape[0]):  # one row's float32 log-softmax at a time bounds the memory
                total += float(F.cross_entropy(logits[i, :-1].float(), batch[i, 1:], reduction="sum"))
            predicted += batch.shape[0] * (batch.shape[1] - 1)
            if bar is not None:
                bar.update(batch.shape[0] * (batch.shape[1] - 1))
    return total, predicted


# -- the job ----------------------------------------------------------------------------------------
@dataclass
class Verdict:
    """Does switching off a language's neurons hurt that language more than the others?"""

    language: str
    own_increase: float  # perplexity change of the language under its own ablation
    others_mean_increase: float | None  # mean perplexity change of the other languages under it
    ratio: float | None  # own / others' mean; None when the others' mean is not > 0
    suffers_most: bool  # its own change is larger than every other language's under its ablation
    hurt_most_by_own: bool  # no other mask (nor the random one) raises its perplexity as much
    random_increase: float | None
    loss_ratio: float | None  # the same ratio on loss changes (scale free: log of perplexity ratios)

    def line(self, baseline: float, ablated: float) -> str:
        others = "no other language" if self.others_mean_increase is None else (
            f"others {number(self.others_mean_increase, sign=True)} on average")
        if self.ratio is not None:
            ratio = number(self.ratio)
        else:
            ratio = "n/a" if self.others_mean_increase is None else "n/a (the others do not rise on average)"
        control = "" if self.random_increase is None else f"; random neurons {number(self.random_increase, sign=True)}"
        most = "n/a" if self.others_mean_increase is None else "yes" if self.suffers_most else "NO"
        return (f"{self.language}: own neurons off: perplexity {number(baseline)} -> {number(ablated)} "
                f"({number(self.own_increase, sign=True)}), {others}, ratio {ratio}; suffers most: {most}{control}")


def number(value: float, sign: bool = False) -> str:
    """Three significant digits, never in exponent notation: 1234 -> 1,234; 0.01234 -> 0.0123."""
    if not math.isfinite(value):
        return str(value)
    plus = "+" if sign else ""
    if value == 0:
        return f"{plus}0" if sign else "0"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:{plus},.{digits}f}"


@dataclass
class AblationReport:
    model: dict
    languages: list[str]
    settings: dict
    heldout: dict[str, dict]
    masks: dict[str, NeuronMask]  # the languages' masks, then the random control
    shared: dict[str, dict[str, int]]  # neurons each pair of the registry's language masks holds in common
    baseline: dict[str, Score]
    ablated: dict[str, dict[str, Score]]  # mask -> evaluated language -> score
    same_text: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[str]:
        return list(self.ablated)

    def delta(self, row: str, column: str, measure: str = "perplexity") -> float:
        return getattr(self.ablated[row][column], measure) - getattr(self.baseline[column], measure)

    def verdicts(self) -> dict[str, Verdict]:
        result = {}
        for lang in self.languages:
            own = self.delta(lang, lang)
            others = [self.delta(lang, other) for other in self.languages if other != lang]
            others_loss = [self.delta(lang, other, "loss") for other in self.languages if other != lang]
            mean = sum(others) / len(others) if others else None
            mean_loss = sum(others_loss) / len(others_loss) if others_loss else None
            rivals = [self.delta(row, lang) for row in self.rows if row != lang]
            result[lang] = Verdict(
                lang, own, mean,
                own / mean if mean is not None and mean > 0 else None,
                bool(others) and own > max(others),
                own > max(rivals, default=-math.inf),
                self.delta(RANDOM, lang) if RANDOM in self.ablated else None,
                self.delta(lang, lang, "loss") / mean_loss if mean_loss is not None and mean_loss > 0 else None,
            )
        return result

    def summary_lines(self) -> list[str]:
        return [verdict.line(self.baseline[lang].perplexity, self.ablated[lang][lang].perplexity)
                for lang, verdict in self.verdicts().items()]

    def to_json(self) -> dict:
        return {
            "tool": "neuronreg",
            "version": __version__,
            "model": self.model,
            "languages": self.languages,
            "settings": self.settings,
            "definitions": {
                "loss": "total next-token NLL (nats) / predicted tokens; every token of the packed held-out stream is "
                        "predicted once",
                "perplexity": "exp(loss)",
                "bits_per_character": "total NLL / ln 2 / characters of the evaluated text (each document's separator "
                                      "counts as one character)",
                "delta_perplexity": "perplexity with the mask's neurons zeroed - baseline perplexity",
                "ratio": "own delta_perplexity / mean delta_perplexity of the other languages under the same mask",
                "random": "control mask: random neurons, per layer the mean count of the language masks (rounded), "
                          "drawn uniformly with the given seed",
                "shared_neurons": "neurons each pair of the registry's language masks holds in common",
                "exclusive": "when true, each language's mask lost the neurons another evaluated language also holds",
            },
            "heldout": self.heldout,
            "shared_neurons": self.shared,
            "same_text": self.same_text,
            "masks": {name: {"neurons": len(mask), "per_layer": mask.counts_per_layer(),
                             **({"selection": mask.provenance.get("selection")} if name != RANDOM else
                                {"seed": mask.provenance.get("seed")})}
                      for name, mask in self.masks.items()},
            "baseline": {lang: score.as_dict() for lang, score in self.baseline.items()},
            "ablated": {row: {lang: {**score.as_dict(),
                                     "delta_perplexity": self.delta(row, lang),
                                     "delta_loss": self.delta(row, lang, "loss"),
                                     "delta_bits_per_character": self.delta(row, lang, "bits_per_character"),
                                     "relative_perplexity_change":
                                         self.delta(row, lang) / self.baseline[lang].perplexity}
                              for lang, score in scores.items()}
                        for row, scores in self.ablated.items()},
            "summary": {lang: asdict(v) for lang, v in self.verdicts().items()},
        }


def check_separate_text(masks: dict[str, NeuronMask], heldout: dict[str, CorpusSource], allow_same_text: bool
                        ) -> list[str]:
    """Held-out files that are a text some mask was computed from: an error, or (allowed) a loud warning."""
    used: dict[str, str] = {}  # sha256 or Hub dataset -> the language whose counts read it
    for mask in masks.values():
        prov = mask.provenance
        corpora = [(mask.language, prov.get("corpus"))]
        corpora += [(lang, info.get("corpus")) for lang, info in (prov.get("counts") or {}).items()]
        for lang, corpus in corpora:
            if key := _text_key(corpus):
                used.setdefault(key, lang)
    same = []
    for lang, source in heldout.items():
        key = _text_key(source.describe())
        if key in used:
            what = f"{Path(source.location).name} (sha256 {key[:12]}...)" if source.kind == "local" else key
            if not allow_same_text:
                raise HeldOutOverlap(
                    f"The held-out text for {lang}, {what}, is the text the {used[key]} counts of the masks were "
                    "computed from. Give held-out text the masks never saw, or pass --allow-same-text."
                )
            log.warning("WARNING: the held-out text for %s, %s, is the text the %s counts were computed from: the "
                        "figures measure the masks on their own training text, not on unseen text.", lang, what,
                        used[key])
            same.append(lang)
    return same


def _text_key(corpus: dict | None) -> str | None:
    if not corpus:
        return None
    if corpus.get("kind") == "local":
        return corpus.get("sha256")
    return f"hub:{corpus.get('dataset')}:{corpus.get('config')}:{corpus.get('split')}"


def ablate(
    model_spec: str,
    language_names: list[str] | None,
    *,
    manifest: Manifest,
    registry: LocalRegistry,
    settings: AblationSettings,
    name: str | None = None,
    quiet: bool = False,
    trust_remote_code: bool = False,
    token: str | None = None,
) -> AblationReport:
    """Perplexity of every language with no neuron, each language's neurons, and random neurons switched off."""
    ref = resolve_model(model_spec, manifest, name)
    names = language_names or registry.selected_languages(ref.name)
    languages = list(dict.fromkeys(stored_language(registry, ref.name, n, manifest) for n in names))
    masks = load_masks(registry, ref.name, languages)
    shared = shared_neurons(masks)
    sources = {lang: resolve_corpus(settings.data, manifest.language(lang), manifest, settings.text_field)
               for lang in languages}
    same_text = check_separate_text(masks, sources, settings.allow_same_text)
    for lang, source in sources.items():
        if next(iter_documents(source), None) is None:
            raise CorpusError(f"The held-out text for {lang} ({source.location}) holds no text; give it some.")
    if settings.exclusive:
        masks = exclusive_masks(masks)
    empty = [lang for lang, mask in masks.items() if len(mask) == 0]
    if empty:
        log.warning("%s: no neurons in the mask; its row is the baseline.", ", ".join(empty))

    device = settings.device or default_device()
    loaded = load_model(ref, dtype=settings.dtype, device=device, trust_remote_code=trust_remote_code, token=token,
                        quiet=quiet)
    first = next(iter(masks.values()))
    revision = first.provenance.get("model", {}).get("revision")
    if revision and revision != loaded.revision:
        log.warning("The masks were computed on revision %s of %s, this model is %s.", revision, ref.name,
                    loaded.revision)
    control = random_mask(ref.name, matched_counts(masks.values()), first.intermediate_size, settings.seed)
    all_masks = {**masks, RANDOM: control}
    for mask in all_masks.values():
        check_fits(loaded.sites, mask)

    texts = {lang: heldout_text(source, lang, loaded.tokenizer, settings.seq_len, settings.tokens)
             for lang, source in sources.items()}
    for lang, text in texts.items():
        if text.tokens < settings.tokens:
            log.info("%s: %s tokens of held-out text (asked for %s); evaluated all of them.", lang,
                     f"{text.tokens:,}", f"{settings.tokens:,}")
    runs = [name for name, mask in all_masks.items() if len(mask)]
    bar = progress((1 + len(runs)) * sum(t.tokens for t in texts.values()), f"{ref.name} ablation", quiet=quiet)

    def scores() -> dict[str, Score]:
        result = {}
        for lang, text in texts.items():
            bar.set_postfix_str(lang, refresh=False)
            nll, predicted = negative_log_likelihood(loaded.model, text.inputs, batch_size=settings.batch_size,
                                                     device=loaded.device, bar=bar)
            result[lang] = Score(nll, predicted, text.characters)
        return result

    try:
        bar.set_description(f"{ref.name} baseline")
        baseline = scores()
        ablated = {}
        for row, mask in all_masks.items():
            if not len(mask):
                ablated[row] = dict(baseline)
                continue
            bar.set_description(f"{ref.name} -{row}")
            with zeroed_neurons(loaded.sites, mask):
                ablated[row] = scores()
    finally:
        bar.close()

    heldout = {lang: {"corpus": text.corpus, "tokens": text.tokens, "characters": text.characters,
                      "same_text_as_mask": lang in same_text} for lang, text in texts.items()}
    model = {"name": ref.name, "id": Path(loaded.model_id).name if ref.local else loaded.model_id,
             "revision": loaded.revision, "architecture": type(loaded.model).__name__,
             "mlp_layout": loaded.sites[0].layout, "num_layers": loaded.num_layers,
             "intermediate_size": loaded.intermediate_size}
    # A local folder is named, not located, as in the registry's provenance.
    run_settings = {"data": settings.data if settings.data.startswith("hf") else Path(settings.data).name,
                    "tokens": settings.tokens, "seq_len": settings.seq_len, "batch_size": settings.batch_size,
                    "dtype": loaded.dtype, "device": str(loaded.device), "seed": settings.seed,
                    "allow_same_text": settings.allow_same_text, "exclusive": settings.exclusive}
    return AblationReport(model, languages, run_settings, heldout, all_masks, shared, baseline, ablated, same_text)


# -- output -----------------------------------------------------------------------------------------
def table_lines(report: AblationReport) -> list[str]:
    """The perplexity-change table as text: rows the switched-off masks, columns the evaluated languages."""
    width = max(10, *(len(lang) + 2 for lang in report.languages))
    labels = {row: f"{row} ({len(report.masks[row]):,})" for row in report.rows}
    first = max(12, *(len(label) + 1 for label in labels.values()))
    lines = [f"{'perplexity':<{first}}" + "".join(f"{lang:>{width}}" for lang in report.languages)]
    lines.append(f"{'baseline':<{first}}" + "".join(f"{number(report.baseline[lang].perplexity):>{width}}"
                                                   for lang in report.languages))
    lines.append("change with the neurons of ... switched off (neurons):")
    for row in report.rows:
        lines.append(f"{labels[row]:<{first}}" + "".join(f"{number(report.delta(row, lang), sign=True):>{width}}"
                                                        for lang in report.languages))
    return lines


def output_folder(folder: str | Path) -> Path:
    """The output folder, created and checked writable (before an hour of evaluation, not after)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise RegistryError(f"Cannot write to {folder}: {exc.strerror or exc}. Choose another --out.") from None
    return folder


def save_report(report: AblationReport, folder: str | Path) -> dict[str, Path]:
    """ablation.json (everything), ablation.csv (the perplexity-change table), measurements.csv (every
    measurement, one row each) and ablation.png (the heatmap), each written atomically."""
    folder = output_folder(folder)
    paths = {kind: folder / name for kind, name in FILES.items()}
    data = report.to_json()
    with atomic_path(paths["json"]) as tmp:
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_path(paths["csv"]) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ablated", "neurons", *report.languages])
        for row in report.rows:
            deltas = [repr(report.delta(row, lang)) for lang in report.languages]
            writer.writerow([row, len(report.masks[row]), *deltas])
    with atomic_path(paths["long_csv"]) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ablated", "evaluated", "neurons", "tokens", "characters", "loss", "perplexity",
                         "bits_per_character", "delta_loss", "delta_perplexity"])
        for row, scores in [(BASELINE, report.baseline), *report.ablated.items()]:
            for lang, score in scores.items():
                neurons = 0 if row == BASELINE else len(report.masks[row])
                delta = (0.0, 0.0) if row == BASELINE else (report.delta(row, lang, "loss"), report.delta(row, lang))
                writer.writerow([row, lang, neurons, score.tokens, score.characters, repr(score.loss),
                                 repr(score.perplexity), repr(score.bits_per_character), repr(delta[0]),
                                 repr(delta[1])])
    draw_heatmap(data, paths["png"])
    return paths


def draw_heatmap(data: dict, path: str | Path) -> Path:
    """The perplexity-change heatmap of an ``ablation.json`` (as written by :func:`save_report`)."""
    from .plots import ablation_heatmap

    languages, rows = data["languages"], list(data["ablated"])
    exclusive = "exclusive " if data["settings"].get("exclusive") else ""
    return ablation_heatmap(
        [[data["ablated"][row][lang]["delta_perplexity"] for lang in languages] for row in rows],
        [f"{row} off ({data['masks'][row]['neurons']:,})" for row in rows],
        [f"{lang}\n{data['baseline'][lang]['perplexity']:.3g}" for lang in languages],
        path,
        title=f"{data['model']['name']}: perplexity change with one mask's {exclusive}neurons switched off",
        xlabel="evaluated language (baseline perplexity)",
        ylabel="neurons switched off (count)",
        colorbar_label="perplexity change (ablated - baseline)",
    )
