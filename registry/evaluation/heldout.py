"""The one measurement of next-token loss: used by ``ablate``, ``evaluate`` and fine-tuning's
validation and training loss.

How held-out text is measured (also in ``docs/ablation.md``):

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

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..corpus import TOKENIZE_BATCH, CorpusSource, _batched, iter_documents, pack_rows, separator_id, token_ids
from ..errors import CorpusError
from ..lape.counting import batches
from ..provenance import CorpusInfo

IGNORE = -100  # a label that gets no loss (padding)


def token_nll(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor | None = None,
              labels: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats, float32) and the number of predicted tokens.

    Position ``t`` predicts ``labels[:, t + 1]`` (default: the ids); labels equal to ``IGNORE``
    (padding) are not predicted. One row's float32 log-softmax at a time bounds the memory to one
    row of logits; the sum stays differentiable, so training uses this very function.
    """
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    targets = (ids if labels is None else labels)[:, 1:]
    total = logits.new_zeros((), dtype=torch.float32)
    for i in range(ids.shape[0]):
        total = total + F.cross_entropy(logits[i, :-1].float(), targets[i], ignore_index=IGNORE, reduction="sum")
    return total, int((targets != IGNORE).sum())


def negative_log_likelihood(model: torch.nn.Module, inputs: list[torch.Tensor], *, batch_size: int, device,
                            bar=None) -> tuple[float, int]:
    """Summed next-token NLL (nats) over every position after the first of each input, and their number."""
    total, predicted = 0.0, 0
    with torch.inference_mode():
        for batch in batches(inputs, batch_size):
            nll, count = token_nll(model, batch.to(device))
            total += float(nll)
            predicted += count
            if bar is not None:
                bar.update(count)
    return total, predicted


@dataclass
class HeldOut:
    """One language's held-out text, packed and ready to evaluate."""

    language: str
    corpus: CorpusInfo
    inputs: list[torch.Tensor]  # one context token + one packed row each
    tokens: int  # tokens predicted (every token of the evaluated stream)
    characters: int


def heldout_text(source: CorpusSource, language: str, tokenizer, seq_len: int, max_tokens: int) -> HeldOut:
    sep = separator_id(tokenizer)
    rows = list(pack_rows(iter_documents(source), tokenizer, seq_len, max_tokens))
    tokens = sum(row.numel() for row in rows)
    if tokens == 0:
        raise CorpusError(f"The held-out text for {language} ({source.label}) holds no text.")
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
        for text, ids in zip(batch, token_ids(batch, tokenizer, remaining)):
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
    """Characters of ``text`` covered by its first ``count`` tokens (``ids`` are at least those)."""
    if count <= 0:
        return 0
    limit = min(len(text), max(1 << 12, 8 * count))
    try:
        while True:  # a prefix of the text long enough that its first tokens are the document's
            encoded = tokenizer(text[:limit], add_special_tokens=False, return_offsets_mapping=True)
            if limit >= len(text) or (len(encoded["input_ids"]) > count
                                      and encoded["input_ids"][:count] == list(ids[:count])):
                return int(max(end for _, end in encoded["offset_mapping"][:count]))
            limit = min(len(text), limit * 2)
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
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_character(self) -> float:
        return self.nll / math.log(2) / self.characters

    def as_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_character": self.bits_per_character,
                "nll": self.nll, "tokens": self.tokens, "characters": self.characters}


def score(model: torch.nn.Module, text: HeldOut, *, batch_size: int, device, bar=None) -> Score:
    nll, predicted = negative_log_likelihood(model, text.inputs, batch_size=batch_size, device=device, bar=bar)
    return Score(nll, predicted, text.characters)
