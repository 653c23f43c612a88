"""Where neuronreg's lm-evaluation-harness tasks get their documents.

lm-eval loads this file by its path (``!function utils.NAME`` in the templates beside it) and calls
a task's ``custom_dataset`` with the task's ``metadata`` and ``dataset_kwargs`` as keyword
arguments; extra keys (lm-eval's own, such as ``version``) are ignored. Nothing here imports
neuronreg, so the folder also works as a plain ``lm_eval --include_path``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

FLORES_SPLITS = ("dev", "devtest")
SIB_SPLITS = {"train": "train", "validation": "dev", "test": "test"}  # lm-eval split -> SIB-200 file


def flores200_pairs(flores_source: str, flores_target: str, flores200_dir: str | None = None,
                    flores200_hub: str = "facebook/flores", **_):
    """One FLORES-200 direction: rows ``id``, ``source``, ``target`` for the dev and devtest splits,
    the two languages' sentences joined by their sentence id."""
    import datasets

    folder = flores200_dir or os.environ.get("NEURONREG_FLORES200_DIR") or None
    splits = {}
    for split in FLORES_SPLITS:
        source = _flores_sentences(flores_source, split, folder, flores200_hub)
        target = _flores_sentences(flores_target, split, folder, flores200_hub)
        ids = sorted(set(source) & set(target))
        if not ids:
            raise ValueError(f"FLORES-200 {split} has no sentence in both {flores_source} and {flores_target}.")
        splits[split] = datasets.Dataset.from_dict(
            {"id": ids, "source": [source[i] for i in ids], "target": [target[i] for i in ids]})
    return datasets.DatasetDict(splits)


def _flores_sentences(code: str, split: str, folder: str | None, hub: str) -> dict[int, str]:
    """Sentence id -> sentence of one language and split: from the official archive's layout
    (``<folder>/<split>/<code>.<split>``, one sentence per line, ids counted from 1) or the Hub."""
    if folder:
        path = _find(Path(folder) / split, f"{code}.{split}")
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return {i: line for i, line in enumerate(lines, start=1)}
    import datasets

    rows = datasets.load_dataset(hub, code, split=split)
    return {int(row["id"]): row["sentence"] for row in rows}


def sib200_docs(sib_language: str, sib200_dir: str | None = None, sib200_hub: str = "Davlan/sib200", **_):
    """SIB-200 for one language: ``index_id``, ``category``, ``text`` in train, validation and test."""
    import datasets

    folder = sib200_dir or os.environ.get("NEURONREG_SIB200_DIR") or None
    if not folder:
        return datasets.load_dataset(sib200_hub, sib_language)
    language = _find(Path(folder), sib_language)
    splits = {}
    for split, stem in SIB_SPLITS.items():
        # Written by pandas (tab-separated, a header, quoted where a field holds a quote).
        with _find(language, f"{stem}.tsv").open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        splits[split] = datasets.Dataset.from_dict(
            {"index_id": [int(r["index_id"]) for r in rows], "category": [r["category"] for r in rows],
             "text": [r["text"] for r in rows]})
    return datasets.DatasetDict(splits)


def _find(folder: Path, name: str) -> Path:
    """``folder / name``, matched without regard to case (archives differ: eng_Latn.dev, eng_latn.dev)."""
    exact = folder / name
    if exact.exists():
        return exact
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.lower() == name.lower():
                return path
    raise FileNotFoundError(f"{exact} does not exist.")
