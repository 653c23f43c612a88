"""Text for a language: where it comes from, and how it becomes packed token rows.

Packing follows the reference pipelines: every document is tokenized without special tokens and
followed by the end-of-sequence token, the stream is cut into rows of exactly ``seq_len`` tokens
(no padding anywhere), and only the final row may be shorter. Memory follows the token budget, not
the longest document: of a document far longer than the tokens still wanted, only a prefix is
tokenized (checked to give the same first tokens as a prefix twice as long).

A model whose tokenizer puts BOS before every text it encodes (Gemma, Llama 3, Mistral) never saw
text without it, so the model is fed each row after that BOS (:func:`row_start`): context only,
never counted and never predicted. The rows themselves are the same either way.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import CorpusError, SettingsError
from .files import inside
from .limits import load_json
from .manifest import Language, Manifest
from .provenance import CorpusInfo

SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZE_BATCH = 256  # documents per tokenizer call: fast tokenizers parallelise within a call
LONG_DOCUMENT = 1 << 16  # characters; longer documents are cut to what the budget needs
MAX_TOKENS = 10**15


@dataclass(frozen=True)
class CorpusSource:
    """One language's text: a local file or a streamed Hub dataset."""

    kind: str  # "local" or "hub"
    location: str  # file path, or Hub dataset id
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> CorpusInfo:
        """Provenance of the text, precise enough to tell two corpora apart (a file by NAME and hash)."""
        if self.kind == "local":
            return CorpusInfo(kind="local", file=Path(self.location).name, sha256=_sha256(Path(self.location)))
        return CorpusInfo(kind="hub", dataset=self.location, config=self.config, split=self.split,
                          text_field=self.text_field)

    @property
    def label(self) -> str:
        return Path(self.location).name if self.kind == "local" else f"{self.location} ({self.config})"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise CorpusError(f"Cannot read {path.name}: {exc.strerror or exc}.") from exc
    return digest.hexdigest()


def resolve_corpus(spec: str, language: Language, manifest: Manifest, text_field: str | None = None) -> CorpusSource:
    """``hf`` (the manifest's default Hub corpus), ``hf:DATASET[:CONFIG]``, or a local folder."""
    if spec == "hf" or spec.startswith("hf:"):
        default = manifest.default_corpus
        _, _, rest = spec.partition(":")
        dataset, _, config = rest.partition(":")
        template = config or language.corpus_config
        try:
            config = template.format(code=language.code, iso639_3=language.iso639_3,
                                     flores200=language.flores200 or "", script=language.script,
                                     flores200_dash=(language.flores200 or "").replace("_", "-"))
        except (KeyError, IndexError, ValueError) as exc:
            raise CorpusError(f"Corpus config {template!r} has a placeholder neuronreg does not know ({exc}); use "
                              "{code}, {iso639_3}, {flores200}, {flores200_dash} or {script}.") from exc
        return CorpusSource("hub", dataset or default["dataset"], config, default.get("split", "train"),
                            text_field or default.get("text_field", "text"))
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise CorpusError(f"Corpus folder {spec} does not exist.", fix="corpus",
                          advice="Give a folder of <language>.txt files, or 'hf'.")
    root = folder.resolve()
    wanted = {key.lower() for key in language.keys()}
    try:
        candidates = sorted(p for p in root.iterdir() if p.suffix in SUFFIXES and p.stem.lower() in wanted)
    except OSError as exc:
        raise CorpusError(f"Cannot list {spec}: {exc.strerror or exc}.") from exc
    # A symlink may point anywhere; only text that really lives in the folder is read.
    candidates = [p for p in candidates if p.is_file() and inside(root, p)]
    if not candidates:
        raise CorpusError(
            f"No text for {language.name} ({language.code}) in {spec}: expected a file named "
            f"{language.code}.txt (or .jsonl/.parquet, or named by another code: {', '.join(language.keys()[:4])})."
        )
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise CorpusError(f"Several files hold {language.code} text in {spec} ({names}); keep one.")
    return CorpusSource("local", str(candidates[0]), text_field=text_field or "text")


def iter_documents(source: CorpusSource) -> Iterator[str]:
    """The documents of a corpus, in a fixed order, empty ones skipped."""
    if source.kind == "hub":
        yield from _hub_documents(source)
        return
    yield from _local_documents(Path(source.location), source.text_field)


def _local_documents(path: Path, text_field: str, where: dict | None = None) -> Iterator[str]:
    """A local file's documents; ``where``, when given, is kept up to date with how much of the file has been
    read: ``read`` of ``total`` bytes (.txt, .jsonl; to within the reader's 8 KiB buffer) or rows (.parquet)."""
    track = where is not None  # asking the file for its position costs time: only when wanted
    where = {} if where is None else where
    try:
        if path.suffix in (".txt", ".jsonl"):
            where["total"], where["read"] = path.stat().st_size, 0
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if track:
                        where["read"] = f.buffer.tell()
                    if path.suffix == ".txt":
                        line = line.rstrip("\n")
                        if line.strip():
                            yield line
                        continue
                    if not line.strip():
                        continue
                    try:
                        text = load_json(line).get(text_field)
                    except (ValueError, AttributeError) as exc:
                        raise CorpusError(f"{path.name} line {number} is not a JSON object; fix the file.") from exc
                    if isinstance(text, str) and text.strip():
                        yield text
        else:
            yield from _parquet_documents(path, text_field, where)
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path.name} is not UTF-8 text; convert it first.") from exc
    except OSError as exc:
        raise CorpusError(f"Cannot read {path.name}: {exc.strerror or exc}.") from exc


def _parquet_documents(path: Path, field: str, where: dict) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        if field not in table.schema_arrow.names:
            raise CorpusError(f"{path.name} has no {field!r} column.", fix="text_field",
                              advice="Pass text_field= to name the column that holds the text.")
        where["total"], where["read"] = table.metadata.num_rows, 0
        for batch in table.iter_batches(columns=[field]):
            for text in batch.column(0).to_pylist():
                where["read"] += 1
                if isinstance(text, str) and text.strip():
                    yield text
    except pa.ArrowException as exc:
        raise CorpusError(f"{path.name} is not a readable Parquet file ({type(exc).__name__}).") from exc


def _hub_documents(source: CorpusSource) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(source.location, source.config, split=source.split, streaming=True)
        for record in stream:
            text = record.get(source.text_field)
            if text is None and source.text_field != "text":
                text = record.get("text")
            if isinstance(text, str) and text.strip():
                yield text
    except CorpusError:
        raise
    except Exception as exc:  # datasets raises many types; all mean "cannot stream this"
        from .hubcalls import first_line

        raise _missing_config(source) or CorpusError(
            f"Cannot stream {source.location} ({source.config}) from the Hub: {first_line(exc)}. Check the dataset id "
            "and config and your network, or use a local corpus folder."
        ) from exc


def _missing_config(source: CorpusSource, cache: dict | None = None) -> CorpusError | None:
    """The error for a config the dataset does not have, naming the closest it has; None when it has the
    config or its configs cannot be listed (offline, no such dataset), so the streaming error stands."""
    import datasets

    if not source.config:
        return None
    cache = {} if cache is None else cache
    if source.location not in cache:
        try:  # reads the dataset card and file list, no data
            cache[source.location] = list(datasets.get_dataset_config_names(source.location))
        except Exception:  # datasets raises many types; the streaming error already says what went wrong
            cache[source.location] = None
    configs = cache[source.location]
    if configs is None:
        return None
    if not configs or source.config in configs:
        return None
    # Difflib alone misses a language in another script (shi-Arab: shi-Latn), so those come first.
    language = _language_part(source.config)
    lowered = {config.lower(): config for config in configs}
    similar = difflib.get_close_matches(source.config.lower(), list(lowered), n=3, cutoff=0)
    closest = [c for c in configs if _language_part(c) == language] + [lowered[c] for c in similar]
    closest = list(dict.fromkeys(closest))[:3]
    return CorpusError(f"{source.location} has no config {source.config!r}. Closest: {', '.join(closest)} (of its "
                       f"{len(configs)} configs).", fix="corpus",
                       advice="Pass corpus='hf:DATASET:CONFIG' with a config it has, or a folder of text.")


def missing_text(source: CorpusSource, cache: dict | None = None) -> CorpusError | None:
    """Why ``source`` has no readable text, found without reading it: a Hub config the dataset does not
    have (``cache`` keeps each dataset's config list for the caller), a Parquet file that is not one or
    lacks the text column; None when nothing is known to be wrong."""
    if source.kind == "hub":
        return _missing_config(source, cache)
    path = Path(source.location)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(path).schema_arrow.names
        except (OSError, pa.ArrowException) as exc:
            return CorpusError(f"{path.name} is not a readable Parquet file ({type(exc).__name__}).")
        if source.text_field not in names:
            return CorpusError(f"{path.name} has no {source.text_field!r} column.", fix="text_field",
                               advice="Pass text_field= to name the column that holds the text.")
    return None


def _language_part(config: str) -> str:
    """'shi' of 'shi-Latn' or 'shi_Latn'."""
    return config.lower().replace("_", "-").partition("-")[0]


def separator_id(tokenizer) -> int | None:
    """The token put between documents: EOS, else BOS, else nothing."""
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


def row_start(tokenizer) -> int | None:
    """The token a packed row is fed after: the tokenizer's BOS where the tokenizer puts it before every
    text it encodes by default (Gemma, Llama 3, Mistral: the model has only ever seen text after it),
    else None (SmolLM2, GPT-2: a row starts with its own first token).

    Read off what ``tokenizer("a")`` returns, not off the model's name, so any model is judged by its
    own tokenizer. Position 0 of such a row is the BOS: not the language's text, never counted and
    never predicted.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if not isinstance(bos, int):
        return None
    try:
        ids = list(tokenizer("a")["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    except (TypeError, ValueError, KeyError, NotImplementedError):  # not a transformers-style tokenizer
        return None
    return bos if ids[:1] == [bos] and ids[1:1 + len(plain)] == plain else None


ROW_START_BOS = "bos"  # how provenance names a BOS row start (None: rows start with their text)


def row_start_name(tokenizer) -> str | None:
    """:func:`row_start` as the records write it: ``"bos"`` or None."""
    return ROW_START_BOS if row_start(tokenizer) is not None else None


def token_ids(documents: list[str], tokenizer, budget: int) -> list[list[int]]:
    """Each document's token ids (no special tokens); of a document far longer than ``budget`` tokens,
    only its first ``budget + 1`` tokens (or more) are computed."""
    short = [doc if len(doc) <= max(LONG_DOCUMENT, 16 * budget) else "" for doc in documents]
    ids = tokenizer(short, add_special_tokens=False)["input_ids"]
    for i, doc in enumerate(documents):
        if len(doc) > max(LONG_DOCUMENT, 16 * budget):
            ids[i] = _prefix_ids(doc, tokenizer, budget)
    return ids


def _prefix_ids(text: str, tokenizer, budget: int) -> list[int]:
    """At least the first ``budget + 1`` tokens of ``text``, from the shortest prefix whose first tokens
    agree with those of a prefix twice as long (so the cut changes none of the tokens kept)."""
    chars = max(LONG_DOCUMENT, 8 * (budget + 1))
    previous = None
    while chars < len(text):
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if previous is not None and len(previous) > budget + 1 and previous[:budget + 1] == ids[:budget + 1]:
            return ids[:budget + 1]
        previous, chars = ids, chars * 2
    return tokenizer(text, add_special_tokens=False)["input_ids"]


SIZE_SAMPLE = 1 << 16  # tokens read before a local corpus's size is extrapolated from the share of it read
SIZE_MARGIN = 2  # an extrapolation this many times the tokens asked for is taken as "enough text"


def text_tokens(source: CorpusSource, tokenizer, max_tokens: int) -> int:
    """How many tokens :func:`pack_rows` will give of ``source`` with this budget: ``min(max_tokens, tokens of
    the text)``, found before counting, so that estimates and progress bars follow the text there is.

    A local file is tokenized as packing does, in order, until the budget is reached, the text ends (the exact
    count), or a sample of ``SIZE_SAMPLE`` tokens, extrapolated over the share of the file read (bytes, or rows
    of a Parquet file), promises ``SIZE_MARGIN`` times the budget (``max_tokens``: the file clearly holds
    enough). Only a file of about the budget's size is read in full, and then no more of it than packing reads.
    A Hub corpus is streamed, its size unknown until then: ``max_tokens``."""
    if max_tokens <= 0:
        raise SettingsError("tokens must be positive.")
    if source.kind != "local":
        return max_tokens
    where: dict = {}
    sep = separator_id(tokenizer)
    total = 0
    for batch in _batched(_local_documents(Path(source.location), source.text_field, where), TOKENIZE_BATCH):
        for ids in token_ids(batch, tokenizer, max_tokens - total):
            total += len(ids) + (sep is not None)
            if total >= max_tokens:
                return max_tokens
        read, size = where.get("read", 0), where.get("total", 0)
        if total >= SIZE_SAMPLE and 0 < read < size and total * size / read >= SIZE_MARGIN * max_tokens:
            return max_tokens
    return total


def pack_rows(documents: Iterable[str], tokenizer, seq_len: int, max_tokens: int) -> Iterator:
    """Rows of ``seq_len`` token ids (torch int64; the last may be shorter), ``max_tokens`` in all at most."""
    import torch

    if seq_len <= 0 or max_tokens <= 0:
        raise SettingsError("seq_len and tokens must be positive.")
    sep = separator_id(tokenizer)
    buffer: list[int] = []
    emitted = 0
    for batch in _batched(documents, TOKENIZE_BATCH):
        for ids in token_ids(batch, tokenizer, max_tokens - emitted):
            buffer.extend(ids)
            if sep is not None:
                buffer.append(sep)
            while len(buffer) >= seq_len:
                take = min(seq_len, max_tokens - emitted)
                yield torch.tensor(buffer[:take], dtype=torch.long)
                emitted += take
                if emitted >= max_tokens:
                    return
                del buffer[:seq_len]
    take = min(len(buffer), max_tokens - emitted)
    if take > 0:
        yield torch.tensor(buffer[:take], dtype=torch.long)


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def parse_tokens(text: str | int, what: str = "Token count") -> int:
    """'13M', '500k', '2.5M', '1B' or a plain integer; a finite positive count below 10^15."""
    if isinstance(text, int) and not isinstance(text, bool):
        tokens = text
    else:
        value = str(text).strip().lower().replace("_", "").replace(",", "")
        scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(value[-1:], 1)
        number = value[:-1] if scale != 1 else value
        try:
            amount = float(number) * scale
        except ValueError as exc:
            raise SettingsError(f"Cannot read {what.lower()} {text!r}; write it like 13M, 500k or 2000000.") from exc
        if not math.isfinite(amount):
            raise SettingsError(f"{what} {text!r} is not a finite number.")
        tokens = int(amount)
    if tokens <= 0:
        raise SettingsError(f"{what} {text!r} must be positive.")
    if tokens > MAX_TOKENS:
        raise SettingsError(f"{what} {text!r} is larger than any corpus ({MAX_TOKENS:.0e}).")
    return tokens
