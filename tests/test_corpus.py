import pytest
import torch

from neuronreg.corpus import pack_rows, parse_tokens
from neuronreg.errors import SettingsError

from support.tiny import make_tokenizer


def test_packing_is_exact_with_separators_and_no_padding():
    tok = make_tokenizer()
    docs = ["abc", "абвгд", "αβ"]
    stream = []
    for doc in docs:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = list(pack_rows(docs, tok, seq_len=4, max_tokens=100))
    assert [r.numel() for r in rows] == [4, 4, 4, 1]  # 13 tokens: the last row is short, not padded
    assert torch.cat(rows).tolist() == stream
    capped = list(pack_rows(docs, tok, seq_len=4, max_tokens=6))
    assert [r.numel() for r in capped] == [4, 2] and torch.cat(capped).tolist() == stream[:6]


@pytest.mark.parametrize("text,value", [("13M", 13_000_000), ("500k", 500_000), ("2.5M", 2_500_000), ("1B", 10**9),
                                        ("2000", 2000), ("1_000", 1000)])
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.parametrize("text", ["lots", "-5", "0", "inf", "1e400", "nan", "1e20"])
def test_parse_tokens_rejects(text):
    with pytest.raises(SettingsError):
        parse_tokens(text)


def test_memory_follows_the_budget_not_the_longest_document():
    """Of a document far longer than the budget, only a prefix is tokenized, and it gives the same rows."""
    tok = make_tokenizer()
    calls = []
    long_doc = "abcdefgh" * 200_000  # 1.6M characters, one document
    docs = ["xyz", long_doc, "mno"]
    rows = list(pack_rows(docs, _Counting(tok, calls), seq_len=64, max_tokens=2000))
    assert sum(r.numel() for r in rows) == 2000
    assert torch.cat(rows).tolist() == (tok("xyz", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                                        + tok(long_doc[:1996], add_special_tokens=False)["input_ids"])
    assert max(calls) < 200_000  # never the whole 1.6M-character document


class _Counting:
    """A tokenizer that records how many characters each call tokenizes."""

    def __init__(self, tok, calls):
        self.tok, self.calls = tok, calls
        self.eos_token_id, self.bos_token_id = tok.eos_token_id, tok.bos_token_id

    def __call__(self, texts, *args, **kwargs):
        self.calls.append(sum(len(t) for t in ([texts] if isinstance(texts, str) else texts)))
        return self.tok(texts, *args, **kwargs)
