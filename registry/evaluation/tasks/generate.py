"""Write the per-language task files of flores200/ and sib200/ from flores200_languages.tsv.

Run ``python registry/evaluation/tasks/generate.py`` after changing the list or the naming; a test checks that
the files shipped are exactly what this writes. Every task file includes its benchmark's template
(``_flores200_template_yaml``, ``_sib200_template_yaml``) and adds only what differs per language.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PIVOT = "eng_Latn"  # FLORES-200 translation is measured into and out of English
# SIB-200 labels FLORES-200's sentences, and adds N'Ko (translated for SIB-200).
SIB_ONLY = ("nqo_Nkoo",)
HEADER = "# Written by generate.py from flores200_languages.tsv; do not edit.\n"


def flores_languages() -> dict[str, str]:
    """FLORES-200 code -> language name, in the file's order."""
    names = {}
    for line in (HERE / "flores200_languages.tsv").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            code, name = line.split("\t")
            names[code] = name
    return names


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar (the names hold no backslash or double quote)."""
    return '"' + text.replace("\n", "\\n") + '"'


def task_files() -> dict[str, str]:
    """Relative path -> content of every generated task file."""
    names = flores_languages()
    files = {}
    for code, name in names.items():
        if code == PIVOT:
            continue
        for source, target, tag in ((PIVOT, code, "flores200_eng-x"), (code, PIVOT, "flores200_x-eng")):
            task = f"flores200_{source}-{target}"
            files[f"flores200/{task}.yaml"] = (
                f"{HEADER}include: ../_flores200_template_yaml\ntask: {task}\ntag:\n  - flores200\n  - {tag}\n"
                f"dataset_kwargs:\n  flores_source: {source}\n  flores_target: {target}\n"
                f"doc_to_text: {_quoted(f'{names[source]}: {{{{source}}}}' + chr(10) + f'{names[target]}:')}\n")
    for code in [*names, *SIB_ONLY]:
        task = f"sib200_{code}"
        files[f"sib200/{task}.yaml"] = (f"{HEADER}include: ../_sib200_template_yaml\ntask: {task}\ntag: sib200\n"
                                        f"dataset_kwargs:\n  sib_language: {code}\n")
    return files


def main() -> None:
    files = task_files()
    for folder in ("flores200", "sib200"):
        (HERE / folder).mkdir(exist_ok=True)
        for old in (HERE / folder).glob("*.yaml"):
            if f"{folder}/{old.name}" not in files:
                old.unlink()
    for relative, text in files.items():
        (HERE / relative).write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} task files")


if __name__ == "__main__":
    main()
