"""Text for a language: where it comes from, and how it becomes packed token rows.

Packing follows the reference pipelines: every document is tokenized without special tokens and
followed by the end-of-sequence token, the stream is cut into rows of exactly ``seq_len`` tokens
(no padding anywhere), and only the final row may be shorter.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CorpusError
from .manifest import Language, Manifest

SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKENIZE_BATCH = 256  # documents per tokenizer call: fast tokenizers parallelise within a call


@dataclass(frozen=True)
class CorpusSource:
    """One language's text: a local file or a streamed Hub dataset."""

    kind: str  # "local" or "hub"
    location: str  # file path, or Hub dataset id
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> dict:
        """Provenance of the text, precise enough to tell two corpora apart."""
        if self.kind == "local":
            return {"kind": "local", "file": Path(self.location).name, "sha256": _sha256(Path(self.location))}
        return {"kind": "hub", "dataset": self.location, "config": self.config, "split": self.split,
                "text_field": self.text_field}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_corpus(spec: str, language: Language, manifest: Manifest, text_field: str | None = None) -> CorpusSource:
    """``hf`` (the manifest's default Hub corpus), ``hf:DATASET[:CONFIG]``, or a local folder."""
    if spec == "hf" or spec.startswith("hf:"):
        default = manifest.default_corpus
        _, _, rest = spec.partition(":")
        dataset, _, config = rest.partition(":")
        return CorpusSource(
            "hub",
            dataset or default["dataset"],
            (config or language.corpus_config).format(code=language.code, iso639_3=language.iso639_3,
                                                     flores200=language.flores200 or "", script=language.script),
            default.get("split", "train"),
            text_field or default.get("text_field", "text"),
        )
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise CorpusError(f"Corpus folder {spec} does not exist. Give a folder of <language>.txt files, or 'hf'.")
    root = folder.resolve()
    wanted = {key.lower() for key in language.keys()}
    candidates = sorted(
        p for p in root.iterdir() if p.suffix in SUFFIXES and p.stem.lower() in wanted and p.is_file()
    )
    # A symlink may point anywhere; only text that really lives in the folder is read.
    candidates = [p for p in candidates if p.resolve().is_relative_to(root)]
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
    path = Path(source.location)
    try:
        if path.suffix == ".txt":
            with path.open(encoding="utf-8") as f:
                for line in f:
                    line = line.rstrip("\n")
                    if line.strip():
                        yield line
        elif path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line).get(source.text_field)
                    except (json.JSONDecodeError, AttributeError):
                        raise CorpusError(f"{path.name} line {number} is not a JSON object; fix the file.") from None
                    if isinstance(text, str) and text.strip():
                        yield text
        else:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if source.text_field not in table.schema_arrow.names:
                raise CorpusError(f"{path.name} has no {source.text_field!r} column; use --text-field.")
            for batch in table.iter_batches(columns=[source.text_field]):
                for text in batch.column(0).to_pylist():
                    if isinstance(text, str) and text.strip():
                        yield text
    except UnicodeDecodeError:
        raise CorpusError(f"{path.name} is not UTF-8 text; convert it first.") from None
    except OSError as exc:
        if isinstance(exc, CorpusError):
            raise
        raise CorpusError(f"Cannot read {path}: {exc}") from None


def _hub_documents(source: CorpusSource) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(source.location, source.config, split=source.split, streaming=True)
    except Exception as exc:  # datasets raises many types; all mean "cannot stream this"
        raise CorpusError(
            f"Cannot stream {source.location} ({source.config}) from the Hub: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
            "Check the dataset id and config, your network, or use a local --corpus folder."
        ) from exc
    for record in stream:
        text = record.get(source.text_field)
        if text is None and source.text_field != "text":
            text = record.get("text")
        if isinstance(text, str) and text.strip():
            yield text


def separator_id(tokenizer) -> int | None:
    """The token put between documents: EOS, else BOS, else nothing."""
    for attr in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return None


def pack_rows(documents: Iterable[str], tokenizer, seq_len: int, max_tokens: int) -> Iterator[torch.Tensor]:
    """Rows of ``seq_len`` token ids (the last may be shorter), ``max_tokens`` in all at most."""
    if seq_len <= 0 or max_tokens <= 0:
        raise CorpusError("--seq-len and --tokens must be positive.")
    sep = separator_id(tokenizer)
    buffer: list[int] = []
    emitted = 0
    for batch in _batched(documents, TOKENIZE_BATCH):
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
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


def parse_tokens(text: str | int) -> int:
    """'13M', '500k', '2.5M', '1B' or a plain integer."""
    if isinstance(text, int):
        return text
    value = text.strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(value[-1:], 1)
    number = value[:-1] if scale != 1 else value
    try:
        tokens = int(float(number) * scale)
    except ValueError:
        raise CorpusError(f"Cannot read token count {text!r}; write it like 13M, 500k or 2000000.") from None
    if tokens <= 0:
        raise CorpusError(f"Token count {text!r} must be positive.")
    return tokens
