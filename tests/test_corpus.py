import pytest
import torch
from tiny import make_tokenizer

from neuronreg.corpus import pack_rows, parse_tokens
from neuronreg.errors import CorpusError


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


@pytest.mark.parametrize("text", ["lots", "-5", "0"])
def test_parse_tokens_rejects(text):
    with pytest.raises(CorpusError):
        parse_tokens(text)
