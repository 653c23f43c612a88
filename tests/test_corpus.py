import pytest
import torch

from neuronreg.corpus import SIZE_SAMPLE, CorpusSource, iter_documents, pack_rows, parse_tokens, text_tokens
from neuronreg.errors import CorpusError, SettingsError

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


def test_row_start_is_the_bos_a_tokenizer_puts_before_every_text():
    from tokenizers import processors

    from neuronreg.corpus import row_start, row_start_name

    plain, with_bos = make_tokenizer(), make_tokenizer(bos=True)
    assert plain("ab")["input_ids"] == [6, 7] and with_bos("ab")["input_ids"] == [1, 6, 7]
    assert (row_start(plain), row_start_name(plain)) == (None, None)
    assert (row_start(with_bos), row_start_name(with_bos)) == (1, "bos")
    # Packing never puts it in the rows: they are the same for both tokenizers.
    docs = ["abc", "абвгд"]
    assert [r.tolist() for r in pack_rows(docs, with_bos, 3, 100)] == [r.tolist() for r in pack_rows(docs, plain, 3,
                                                                                                     100)]
    # Judged by what the tokenizer does, not by having a BOS token: one that appends EOS only has no row start.
    eos_only = make_tokenizer()
    eos_only._tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    assert eos_only("ab")["input_ids"] == [6, 7, 2] and row_start(eos_only) is None


def write_docs(path, docs: list[str]):
    """``docs`` in the file format of ``path``'s suffix (an empty document as an empty line or a null)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".txt":
        path.write_text("".join(doc + "\n" for doc in docs), encoding="utf-8")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": doc or None}) + "\n" for doc in docs), encoding="utf-8")
    else:
        pq.write_table(pa.table({"text": [doc or None for doc in docs]}), path, row_group_size=2)
    return CorpusSource("local", str(path))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_a_corpus_smaller_than_asked_is_sized_exactly(tmp_path, suffix):
    tok = make_tokenizer()
    docs = ["abc", "абвгд", "", "αβ x", "   ", "z" * 50]
    source = write_docs(tmp_path / f"sw{suffix}", docs)
    # One token per character, and the separator after every document with text.
    expected = sum(len(doc) + 1 for doc in docs if doc.strip())
    assert text_tokens(source, tok, 10**6) == expected == 66
    assert sum(row.numel() for row in pack_rows(iter_documents(source), tok, 7, 10**6)) == expected
    assert text_tokens(source, tok, 20) == 20  # more text than asked for: the budget
    assert text_tokens(CorpusSource("hub", "some/dataset", "swh_Latn"), tok, 500) == 500  # unknown before streaming


def test_a_corpus_far_larger_than_asked_is_sized_from_a_sample(tmp_path):
    """Sizing stops once a sample promises twice the budget: here before a broken line that reading up to
    the budget would reach."""
    tok = make_tokenizer()
    line = "abcdefghij" * 10  # 101 tokens with its separator
    docs = [line] * 800 + ["{broken"] + [line] * 9200
    path = tmp_path / "sw.jsonl"
    write_docs(path, [line] * 800)
    with path.open("a", encoding="utf-8") as f:
        f.write("{broken\n" + "".join('{"text": "%s"}\n' % doc for doc in docs[801:]))
    source = CorpusSource("local", str(path))
    budget = 90_000
    assert 800 * 101 < budget and SIZE_SAMPLE < 800 * 101
    assert text_tokens(source, tok, budget) == budget
    with pytest.raises(CorpusError, match="line 801 is not a JSON object"):
        list(pack_rows(iter_documents(source), tok, 64, budget))
