"""The one measurement of next-token loss: used by ``ablate``, ``evaluate`` and fine-tuning's
validation and training loss.

How held-out text is measured (also in ``docs/ablation.md``):

* The held-out text of each language is packed exactly as ``compute`` packs text (``pack_rows``:
  no special tokens, the separator (EOS) after every document, rows of ``seq_len`` tokens, no
  padding, at most ``tokens`` tokens). Each row is fed with one token of context before it: for a
  model whose tokenizer puts BOS before every text (:func:`neuronreg.corpus.row_start`: Gemma,
  Llama 3, Mistral), that BOS, so every row starts as the model's training text did; otherwise the
  last token of the previous row, or the separator for the first row (as if a document had just
  ended). Either way every token of the evaluated stream is predicted exactly once.
* loss = total next-token negative log-likelihood (nats) / number of predicted tokens;
  perplexity = exp(loss).
* bits per character = total NLL / ln 2 / characters, where characters are those of the text the
  evaluated tokens spell: every complete document counts ``len(text)`` plus 1 for its separator
  (the line break that ends it in the file); a document cut by the token budget counts the
  characters up to the end of its last evaluated token (from the tokenizer's offsets).

The loss over the vocabulary (``token_nll``) is computed in one of two ways that agree within float
rounding: the plain way takes the model's logits and a float32 log-softmax per row; the chunked way
(:func:`chunked_token_nll`) runs the model body, then the LM head on a few hundred positions at a
time, so the full ``[positions, vocabulary]`` logits (and their float32 copy and gradient) never
exist. Which one runs is the rule in :func:`use_chunked_loss`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..corpus import (
    TOKENIZE_BATCH,
    CorpusSource,
    _batched,
    iter_documents,
    pack_rows,
    row_start,
    row_start_name,
    separator_id,
    token_ids,
)
from ..errors import CorpusError
from ..lape.counting import batches
from ..models import body
from ..provenance import CorpusInfo

log = logging.getLogger("neuronreg")

IGNORE = -100  # a label that gets no loss (padding)
# The chunked loss is used by default when a batch's logits (predicted positions x vocabulary) are
# more than this: 2**26 logits are 256 MiB in float32 (Llama-3's 128k vocabulary: above 523 positions).
CHUNKED_LOSS_ABOVE = 1 << 26
# Logits per chunk: 2**25 are 128 MiB in float32 (Llama-3: 261 positions; a 32k vocabulary: 1024).
LOSS_CHUNK_LOGITS = 1 << 25

# How each architecture's CausalLM turns its body's last hidden states into logits. Only those listed
# (read off their transformers code) take the chunked loss; any other model keeps the plain one.
_PLAIN_HEADS = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3",
                          "phi", "gpt2", "opt", "bloom", "gemma", "olmo2", "starcoder2"})
_SOFTCAPPED_HEADS = frozenset({"gemma2", "gemma3_text"})  # final_logit_softcapping: tanh(l / c) * c
_SCALED_HEADS = frozenset({"cohere", "cohere2"})  # logit_scale: l * s
_DIVIDED_HEADS = frozenset({"granite"})  # logits_scaling: l / s


@dataclass(frozen=True)
class OutputHead:
    """A model's LM head and what its CausalLM applies to the head's output, in the model's order."""

    module: nn.Module
    vocabulary: int
    softcap: float | None = None
    scale: float | None = None
    divide: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.module(hidden)  # the module itself: hooks (accelerate's device moves) still apply
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide is not None:
            logits = logits / self.divide
        return logits

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of one chunk of positions, with a float32 log-softmax as the plain way."""
        logits = self.logits(hidden)
        return F.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum")


def output_head(model: nn.Module) -> OutputHead | None:
    """The model's :class:`OutputHead`, or None when its logits are not known to be ``head(body(x))``
    (then only the plain loss is exact)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Module) or body(model) is model or kind is None:
        return None
    vocabulary = getattr(head, "out_features", None) or getattr(config, "vocab_size", None)
    if not isinstance(vocabulary, int):
        return None
    if kind in _PLAIN_HEADS:
        return OutputHead(head, vocabulary)
    if kind in _SOFTCAPPED_HEADS:
        return OutputHead(head, vocabulary, softcap=getattr(config, "final_logit_softcapping", None))
    if kind in _SCALED_HEADS:
        return OutputHead(head, vocabulary, scale=getattr(config, "logit_scale", None))
    if kind in _DIVIDED_HEADS:
        return OutputHead(head, vocabulary, divide=getattr(config, "logits_scaling", None))
    return None


def use_chunked_loss(model: nn.Module, ids: torch.Tensor, chunked: bool | None = None) -> bool:
    """The rule: ``chunked=None`` (the default) chunks when the batch's logits would be more than
    ``CHUNKED_LOSS_ABOVE`` (256 MiB in float32); True always chunks, False never. A model whose head is
    not in the table of known heads (:func:`output_head`) always takes the plain loss; asking it for
    the chunked one logs a warning once."""
    if chunked is False:
        return False
    head = output_head(model)
    if head is None:
        if chunked:
            _warn_plain(model)
        return False
    if chunked:
        return True
    return ids.shape[0] * max(ids.shape[1] - 1, 0) * head.vocabulary > CHUNKED_LOSS_ABOVE


_WARNED: set[str] = set()


def _warn_plain(model: nn.Module) -> None:
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    if kind not in _WARNED:
        _WARNED.add(kind)
        log.warning("The chunked loss does not know how %s computes its logits; using the plain loss.", kind)


def token_nll(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor | None = None,
              labels: torch.Tensor | None = None, *, chunked: bool | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy (nats, float32) and the number of predicted tokens.

    Position ``t`` predicts ``labels[:, t + 1]`` (default: the ids); labels equal to ``IGNORE``
    (padding) are not predicted. The sum stays differentiable, so training uses this very function.
    ``chunked`` chooses the way (see :func:`use_chunked_loss`; None: by the size of the logits). The
    plain way takes the model's logits and a float32 log-softmax one row at a time; the chunked way is
    :func:`chunked_token_nll`.
    """
    if use_chunked_loss(model, ids, chunked):
        return chunked_token_nll(model, ids, attention, labels)
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    targets = (ids if labels is None else labels)[:, 1:]
    total = logits.new_zeros((), dtype=torch.float32)
    for i in range(ids.shape[0]):
        total = total + F.cross_entropy(logits[i, :-1].float(), targets[i], ignore_index=IGNORE, reduction="sum")
    return total, int((targets != IGNORE).sum())


def chunked_token_nll(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None, *, chunk_tokens: int | None = None
                      ) -> tuple[torch.Tensor, int]:
    """:func:`token_nll` without the full-vocabulary logits: a linear cross-entropy in chunks.

    The model body gives the last hidden states; the predicted positions are taken (labels not
    ``IGNORE``) and cut into chunks of ``chunk_tokens`` (default: ``LOSS_CHUNK_LOGITS`` logits per
    chunk). Each chunk's logits are the LM head's (and whatever the architecture applies after it:
    Gemma 2's soft-capping, Cohere's scale), then a float32 log-softmax and the summed cross-entropy.
    With gradients on, each chunk runs under ``torch.utils.checkpoint``: backward recomputes the
    chunk's logits instead of keeping them, so at most one chunk's logits exist at a time.
    """
    head = output_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__}'s logits are not known to be its LM head over its body's "
                         "output; use token_nll(chunked=False).")
    hidden = body(model)(input_ids=ids, attention_mask=attention, use_cache=False)[0]
    targets = (ids if labels is None else labels)[:, 1:]
    keep = targets != IGNORE
    predicted = int(keep.sum())
    positions = hidden[:, :-1][keep.to(hidden.device)]  # [predicted, hidden]
    wanted = targets[keep]
    step = chunk_tokens or max(1, LOSS_CHUNK_LOGITS // head.vocabulary)
    total = None
    for start in range(0, predicted, step):
        chunk, chunk_targets = positions[start:start + step], wanted[start:start + step]
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            # No randomness in a head: no RNG state to stash and restore per chunk.
            part = checkpoint(head.nll, chunk, chunk_targets, use_reentrant=False, preserve_rng_state=False)
        else:
            part = head.nll(chunk, chunk_targets)
        total = part if total is None else total + part
    if total is None:  # nothing to predict
        total = hidden[..., :0].sum().float()  # 0, and still part of the graph
    return total, predicted


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
    row_start: str | None = None  # "bos": every row was fed after BOS; None: after the previous token


def heldout_text(source: CorpusSource, language: str, tokenizer, seq_len: int, max_tokens: int) -> HeldOut:
    sep = separator_id(tokenizer)
    rows = list(pack_rows(iter_documents(source), tokenizer, seq_len, max_tokens))
    tokens = sum(row.numel() for row in rows)
    if tokens == 0:
        raise CorpusError(f"The held-out text for {language} ({source.label}) holds no text.")
    start = row_start(tokenizer)
    inputs, previous = [], sep
    for row in rows:
        context = start if start is not None else previous
        inputs.append(row if context is None else torch.cat([torch.tensor([context]), row]))
        previous = int(row[-1])
    characters = stream_characters(source, tokenizer, tokens, sep)
    if sep is None and start is None:  # nothing before the stream: its first token has no context, no prediction
        tokens -= 1
    return HeldOut(language, source.describe(), inputs, tokens, characters, row_start_name(tokenizer))


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
