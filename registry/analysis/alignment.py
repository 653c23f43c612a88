"""Cross-lingual representational alignment on line-aligned parallel text.

Line ``i`` of every language's file is the same sentence (NTREX-128, FLORES-200). For a language X and
the pivot P (English), at one layer, with ``p_i`` and ``x_i`` the sentence representations of
:mod:`.representations` (mean residual stream after the layer) of the first N lines:

* centred (the default): each language's mean over its N sentences is subtracted from its vectors
  first, ``p_i - mean(p)`` and ``x_i - mean(x)``. Raw cosines of language-model states are dominated
  by a direction that every state shares (anisotropy: any two sentences have a cosine near 1), which
  hides how matched and mismatched pairs differ; centring by language removes that shared direction
  and each language's own offset (Libovicky et al. 2020). ``centred=False`` gives the raw cosines.
* S[i, j] = cos(p_i, x_j) = p_i . x_j / (|p_i| |x_j|), in float64.
* ``matched`` = mean of S[i, i] over the N pairs; ``mismatched`` = mean of S[i, j] over the N (N - 1)
  pairs i != j; ``gap`` = matched - mismatched.
* ``retrieval_from_pivot`` = the share of i whose translation x_i has a strictly higher cosine with p_i
  than every other x_j (top-1 of N; a tie counts as a miss); ``retrieval_to_pivot`` the same from x_i
  among the p_j. Chance is 1 / N.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CorpusError, SettingsError
from .representations import Representations, sentence_representations

PIVOT = "en"


@dataclass(frozen=True)
class LayerAlignment:
    """How close one language's sentence representations are to the pivot's at one layer (``-1``: the
    embeddings), over ``sentences`` line-aligned pairs (see the module's definitions)."""

    language: str
    pivot: str
    layer: int
    sentences: int
    centred: bool
    matched: float
    mismatched: float
    gap: float
    retrieval_from_pivot: float
    retrieval_to_pivot: float

    def to_dict(self) -> dict:
        return asdict(self)


def cosine_matrix(pivot: torch.Tensor, other: torch.Tensor, centred: bool = True) -> torch.Tensor:
    """S[i, j] = cos(pivot_i, other_j) in float64, each side centred on its own mean first when ``centred``."""
    a, b = pivot.double(), other.double()
    if centred:
        a, b = a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)
    norms_a, norms_b = a.norm(dim=1), b.norm(dim=1)
    if bool((norms_a == 0).any()) or bool((norms_b == 0).any()):
        raise SettingsError("A sentence representation is zero (after centring: it equals its language's mean), so "
                            "its cosine is undefined; use more (and different) sentences.")
    return (a / norms_a[:, None]) @ (b / norms_b[:, None]).T


def _retrieved(similarity: torch.Tensor) -> float:
    """The share of rows whose diagonal entry is strictly above every other entry of the row."""
    n = similarity.shape[0]
    diagonal = similarity.diagonal()
    others = similarity.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    return float((diagonal > others.max(dim=1).values).double().mean())


def compare_sentences(pivot: torch.Tensor, other: torch.Tensor, *, language: str, layer: int, pivot_name: str = PIVOT,
                      centred: bool = True) -> LayerAlignment:
    """:class:`LayerAlignment` of two ``[N, hidden]`` matrices whose row i are translations of each other."""
    if pivot.shape != other.shape or pivot.dim() != 2:
        raise SettingsError(f"Parallel representations must have one shape [sentences, hidden]; got "
                            f"{tuple(pivot.shape)} and {tuple(other.shape)}.")
    n = pivot.shape[0]
    if n < 2:
        raise SettingsError(f"Alignment needs at least 2 sentence pairs, not {n}.")
    s = cosine_matrix(pivot, other, centred)
    matched = float(s.diagonal().mean())
    mismatched = float((s.sum() - s.diagonal().sum()) / (n * (n - 1)))
    return LayerAlignment(language, pivot_name, layer, n, centred, matched, mismatched, matched - mismatched,
                          _retrieved(s), _retrieved(s.T))


def compare_representations(representations: Mapping[str, Representations], pivot: str = PIVOT, *,
                            centred: bool = True) -> list[LayerAlignment]:
    """Every language but the pivot against the pivot, at every layer they share: one record per
    (language, layer), languages in the mapping's order, layers ascending."""
    if pivot not in representations:
        raise SettingsError(f"The pivot language {pivot!r} has no representations.")
    base = representations[pivot]
    records = []
    for language, reps in representations.items():
        if language == pivot:
            continue
        for layer in [layer for layer in reps.layers if layer in base.layers]:
            records.append(compare_sentences(base.layer(layer), reps.layer(layer), language=language, layer=layer,
                                             pivot_name=pivot, centred=centred))
    return records


def alignment(model: nn.Module, tokenizer, parallel: Mapping[str, Sequence[str]], pivot: str = PIVOT, *,
              centred: bool = True, layers: Sequence[int] | None = None, prefix_ids: Sequence[int] | None = None,
              batch_size: int = 16, max_tokens: int | None = None, embeddings: bool = False) -> list[LayerAlignment]:
    """Each language of ``parallel`` (language -> its sentences, line-aligned) against ``pivot``, per layer:
    :func:`.representations.sentence_representations` of every language, then :func:`compare_representations`.

    To get both the centred and the raw records, compute the representations once and call
    :func:`compare_representations` twice."""
    counts = {language: len(lines) for language, lines in parallel.items()}
    if len(set(counts.values())) > 1:
        raise CorpusError(f"Parallel text must have as many lines in every language; got {counts}.")
    if pivot not in parallel:
        raise SettingsError(f"The pivot language {pivot!r} is not among {', '.join(parallel)}.")
    representations = {language: sentence_representations(model, tokenizer, lines, layers=layers,
                                                           prefix_ids=prefix_ids, batch_size=batch_size,
                                                           max_tokens=max_tokens, embeddings=embeddings)
                       for language, lines in parallel.items()}
    return compare_representations(representations, pivot, centred=centred)


def read_parallel(paths: Mapping[str, str | Path], limit: int | None = None) -> dict[str, list[str]]:
    """Line-aligned text, one file per language (UTF-8, one sentence per ``\\n``-ended line): the first ``limit`` lines
    of each (all when None). CorpusError when the files differ in length or a line within the limit is
    empty (it could not be aligned or pooled)."""
    texts = {}
    for language, path in paths.items():
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"No parallel text for {language}: {path} is not a file.")
        # Split on "\n" only: str.splitlines also splits at U+2028, U+0085 ..., which may sit inside a sentence.
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        texts[language] = [line.removesuffix("\r") for line in lines]
    lengths = {language: len(lines) for language, lines in texts.items()}
    if len(set(lengths.values())) > 1:
        raise CorpusError(f"Parallel files must have as many lines in every language; got {lengths}.")
    out = {}
    for language, lines in texts.items():
        chosen = lines[:limit] if limit is not None else lines
        empty = next((i for i, line in enumerate(chosen) if not line.strip()), None)
        if empty is not None:
            raise CorpusError(f"Line {empty + 1} of {paths[language]} ({language}) is empty; parallel text needs a "
                              "sentence on every line.")
        out[language] = chosen
    return out
