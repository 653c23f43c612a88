"""Hostile input, second round (issue 19): config names, fingerprints, tracebacks, readers during a
replace, locks and names.

Each test reproduces one finding of the second hostile review and shows the safe outcome: a refusal
in one line that says why, the right number, or a reader that never fails.
"""

import hashlib
import json
import os
import shutil
import socket
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from neuronreg.errors import FinetuneError, RegistryError
from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, neuron_file, run
from support.hubserver import TEST_USER
from support.tiny import PLANTED, TOP_RATE, planted_model, save_model

SELECTION = "top9.375"  # the name of the selection TOP_RATE makes
REPO = f"{TEST_USER}/shared-neurons"


def compute(root: Path, reg: Path, *extra, model=None, langs=("en", "ru", "el"), ok=True):
    return run("compute", model or root / "model", *langs, "--corpus", root / "texts", "--tokens", "3k",
               "--seq-len", 64, "--top-rate", TOP_RATE, "--registry", reg, "-q", *extra, ok=ok)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def lape_file(path: Path) -> Path:
    """A LAPE authors' file for 2 x 48, languages en and ru."""
    torch.save([[torch.tensor([1, 5]), torch.tensor([2])], [torch.tensor([0]), torch.tensor([2, 3])]], path)
    return path


def import_args(masks: Path, reg: Path, *extra):
    return ("import", masks, "--layers", 2, "--intermediate-size", 48, "--languages", "en,ru", "--registry", reg,
            *extra)


def card_configs(reg: Path) -> list[str]:
    import yaml

    meta = yaml.safe_load((reg / "README.md").read_text().split("---\n")[1])
    return [c["config_name"] for c in meta["configs"]]


def set_provenance(path: Path, change) -> None:
    """Rewrite a Parquet file's provenance with ``change(dict)`` (or to raw text when it returns a str)."""
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"neuronreg"])
    new = change(meta)
    raw = new if isinstance(new, str) else json.dumps(meta)
    pq.write_table(table.replace_schema_metadata({b"neuronreg": raw.encode()}), path)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, planted) -> Path:
    reg = tmp_path_factory.mktemp("hostile") / "reg"
    compute(planted, reg)
    return reg


@pytest.fixture
def reg(registry, tmp_path) -> Path:
    copy = tmp_path / "reg"
    shutil.copytree(registry, copy)
    return copy


# -- 4. config names are unique across models and selections ---------------------------------------------
def test_an_import_whose_config_name_is_taken_by_another_model_is_refused(reg, tmp_path):
    import datasets

    masks = lape_file(tmp_path / "rand.pt")
    before = snapshot(reg)
    result = run(*import_args(masks, reg, "--model", "x/y", "--name", f"model-{SELECTION}"), ok=False)
    assert_one_line_error(result, f"'model-{SELECTION}'", f"selection {SELECTION} of model model", "--name")
    assert snapshot(reg) == before
    assert datasets.load_dataset(str(reg), f"model-{SELECTION}", split="ru")["neuron"] == [10, 30, 31]

    # The other way round: a model whose own config is X-imported-top5 is there, then X gets that selection.
    run(*import_args(masks, reg, "--model", "x/y", "--name", "x-imported-top5", "-q"))
    before = snapshot(reg)
    result = run(*import_args(masks, reg, "--model", "x/z", "--name", "x", "--top-rate", 0.05), ok=False)
    assert_one_line_error(result, "'x-imported-top5'", "model x-imported-top5", "--name")
    assert snapshot(reg) == before
    assert len(card_configs(reg)) == len(set(card_configs(reg)))


def test_compute_with_a_taken_config_name_is_refused_before_counting(planted, reg):
    before = snapshot(reg)
    result = compute(planted, reg, "--name", f"model-{SELECTION}", langs=("en",), ok=False)
    assert_one_line_error(result, f"'model-{SELECTION}'", "--name")
    assert snapshot(reg) == before and not (reg / f"model-{SELECTION}").exists()


def test_publish_into_a_shared_repo_keeps_our_config_when_a_foreign_one_collides(registry, tmp_path, hub):
    import datasets

    foreign = tmp_path / "foreign"
    run(*import_args(lape_file(tmp_path / "rand.pt"), foreign, "--model", "x/y", "--name", f"model-{SELECTION}",
                     "-q"))
    run("publish", "--repo", REPO, "--registry", foreign, "-q")
    result = run("publish", "--repo", REPO, "--registry", registry)
    assert f"model-{SELECTION}" in result.stderr and "is taken" in result.stderr
    import yaml

    meta = yaml.safe_load(hub.file_bytes("dataset", REPO, "README.md").decode().split("---\n")[1])
    names = [c["config_name"] for c in meta["configs"]]
    assert len(names) == len(set(names))
    assert datasets.load_dataset(REPO, f"model-{SELECTION}", split="ru")["neuron"] == [10, 30, 31]


def test_publish_refuses_a_registry_whose_configs_collide(reg, tmp_path, hub, monkeypatch):
    with monkeypatch.context() as older:  # as neuronreg 0.2 wrote it, without the check
        older.setattr(LocalRegistry, "check_config_names", lambda *args: None)
        run(*import_args(lape_file(tmp_path / "rand.pt"), reg, "--model", "x/y", "--name", f"model-{SELECTION}",
                         "-q"))
    result = run("publish", "--repo", REPO, "--registry", reg, ok=False)
    assert_one_line_error(result, f"Two configs are named 'model-{SELECTION}'", f"selection {SELECTION} of model "
                          "model", f"of model model-{SELECTION}", "--name")
    assert hub.files_or_none("dataset", REPO) is None


# -- 6. a local model's fingerprint covers its tokenizer, and a rewrite cannot keep an old hash --------------
def fingerprint_args(planted, reg):
    return ("en", "--corpus", planted / "texts", "--tokens", 600, "--seq-len", 64, "--top-rate", TOP_RATE,
            "--registry", reg)


def test_another_tokenizer_is_another_revision(planted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(planted / "model", folder)
    reg = tmp_path / "reg"
    run("compute", folder, *fingerprint_args(planted, reg), "-q")
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["normalizer"] = {"type": "Lowercase"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert_one_line_error(run("compute", folder, *fingerprint_args(planted, reg), ok=False),
                          "counted with other settings", "revision")


def test_weights_rewritten_in_place_with_their_old_mtime_are_another_revision(planted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(planted / "model", folder)
    reg = tmp_path / "reg"
    run("compute", folder, *fingerprint_args(planted, reg), "-q")
    weights = folder / "model.safetensors"
    stat = weights.stat()
    other = tmp_path / "other"
    save_model(planted_model(PLANTED, seed=7), other)
    data = (other / "model.safetensors").read_bytes()
    assert len(data) == stat.st_size
    with weights.open("r+b") as f:  # the same inode, the same size ...
        f.write(data)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime
    assert weights.stat().st_ino == stat.st_ino and weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert_one_line_error(run("compute", folder, *fingerprint_args(planted, reg), ok=False),
                          "counted with other settings", "revision")


def old_fingerprint(folder: Path) -> str:
    """neuronreg 0.2's fingerprint of a local model (config and weights only), computed here anew."""
    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    digest = hashlib.sha256(sha(folder / "config.json").encode())
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            digest.update(f"{path.name}:{sha(path)}".encode())
    return "local-" + digest.hexdigest()[:16]


def test_counts_fingerprinted_without_the_tokenizer_say_so(planted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(planted / "model", folder)
    reg = tmp_path / "reg"
    run("compute", folder, *fingerprint_args(planted, reg), "-q")
    old = old_fingerprint(folder)

    def older(meta):
        meta["settings"]["revision"] = meta["model"]["revision"] = old

    set_provenance(reg / "model" / "counts" / "en.parquet", older)
    result = run("compute", folder, *fingerprint_args(planted, reg), ok=False)
    assert_one_line_error(result, "older neuronreg", "tokenizer", "config and weights are the same", "--force")
    run("compute", folder, *fingerprint_args(planted, reg), "--force", "-q")  # counted again: the new fingerprint


def test_a_run_on_a_base_fingerprinted_without_the_tokenizer_says_so(planted, registry, tmp_path):
    from neuronreg.finetune.loading import load_sparse_model

    base = tmp_path / "base"
    shutil.copytree(planted / "model", base)
    out = tmp_path / "run"
    run("finetune", base, "en", "--name", "model", "--mask", registry, "--data", planted / "texts", "--steps", 1,
        "--seq-len", 32, "--out", out, "-q")
    config = json.loads((out / "neuronreg_delta.json").read_text())
    config["base_model"]["revision"] = old_fingerprint(base)
    (out / "neuronreg_delta.json").write_text(json.dumps(config))
    with pytest.raises(FinetuneError, match="older neuronreg.*tokenizer.*config and weights are the same"):
        load_sparse_model(out)


# -- 8. no traceback: nesting, huge integers, long names, pickled adapters ------------------------------------
DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("where", ["neurons", "counts"])
def test_provenance_nested_200000_deep_is_one_line(reg, where):
    path = neuron_file(reg, "model", "ru") if where == "neurons" else reg / "model" / "counts" / "ru.parquet"
    set_provenance(path, lambda meta: json.dumps({**meta, "extra": None})[:-1] + ', "deep": ' + DEEP + "}")
    command = ("show", "model", "ru") if where == "neurons" else ("select", "model", "--top-rate", 0.5)
    assert_one_line_error(run(*command, "--registry", reg, ok=False), "ru.parquet", "damaged")


def test_a_card_nested_200000_deep_is_one_line(reg):
    card = (reg / "README.md").read_text()
    head, rest = card.split("\n---\n", 1)
    (reg / "README.md").write_text(head + "\ndeep: " + DEEP + "\n---\n" + rest)
    assert_one_line_error(run("ls", "--registry", reg, ok=False), "README.md", "nested")


def test_a_run_config_nested_200000_deep_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "neuronreg_delta.json").write_text('{"deep": ' + DEEP + "}")
    assert_one_line_error(run("release", out, "--repo", "a/b", ok=False), "not readable JSON", "nested")


def test_publish_skips_a_foreign_file_nested_200000_deep(registry, tmp_path, hub):
    from huggingface_hub import HfApi

    bad = tmp_path / "bad.parquet"
    shutil.copy(neuron_file(registry, "model", "en"), bad)
    set_provenance(bad, lambda meta: json.dumps(meta)[:-1] + ', "deep": ' + DEEP + "}")
    api = HfApi()
    api.create_repo(REPO, repo_type="dataset")
    api.upload_file(path_or_fileobj=str(bad), path_in_repo="other/en.parquet", repo_id=REPO, repo_type="dataset")
    result = run("publish", "--repo", REPO, "--registry", registry)
    assert "other/en.parquet" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("where", ["counts", "neurons"])
def test_an_absurd_token_count_in_provenance_is_one_line(reg, where):
    def absurd(meta):
        if where == "counts":
            meta["tokens"] = 10**30
        else:
            meta["counts"]["ru"]["tokens"] = 10**30

    if where == "counts":
        set_provenance(reg / "model" / "counts" / "ru.parquet", absurd)
        command = ("select", "model", "--top-rate", 0.5)
    else:
        set_provenance(neuron_file(reg, "model", "ru"), absurd)
        command = ("show", "model", "ru")
    assert_one_line_error(run(*command, "--registry", reg, ok=False), "tokens", "out of range")


def test_an_absurd_float_in_provenance_is_one_line(reg):
    def absurd(meta):
        meta["selection"]["top_rate"] = 10**400

    set_provenance(neuron_file(reg, "model", "ru"), absurd)
    assert_one_line_error(run("show", "model", "ru", "--registry", reg, ok=False), "top_rate")


@pytest.mark.parametrize("command", ["show", "compute", "import"])
def test_a_model_name_over_255_characters_is_refused_by_the_name_check(planted, reg, tmp_path, command):
    name = "m" * 300
    if command == "show":
        result = run("show", name, "ru", "--registry", reg, ok=False)
    elif command == "compute":
        result = compute(planted, reg, model=name, langs=("en",), ok=False)
    else:
        result = run(*import_args(lape_file(tmp_path / "m.pt"), reg, "--model", "x/y", "--name", name), ok=False)
    assert_one_line_error(result, "300 characters")


def test_a_pickled_peft_adapter_is_refused_in_one_line(planted, tmp_path):
    out = tmp_path / "run"
    run("finetune", planted / "model", "en", "--subset", "lora", "--lora-r", 2, "--data", planted / "texts",
        "--steps", 1, "--seq-len", 32, "--out", out, "-q")
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    torch.save(weights, out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()
    result = run("evaluate", out, "--data", planted / "texts", "--seq-len", 32, "--tokens", 200, ok=False)
    assert_one_line_error(result, "adapter_model.bin", "safetensors")


# -- 9. readers during a replace ---------------------------------------------------------------------------------
def test_datasets_readers_never_fail_while_a_selection_is_replaced(reg, tmp_path):
    import datasets

    registry = LocalRegistry(reg)
    run("select", "model", "--top-rate", 0.5, "--registry", reg, "-q")
    states = [registry.read_masks("model", ["en", "ru", "el"], name) for name in (SELECTION, "top50")]
    registry.write_selection("model", states[0], name="moving")
    allowed = {tuple(registry.read_mask("model", "ru", name).neuron.tolist()) for name in (SELECTION, "top50")}
    stop, failures, reads = threading.Event(), [], []

    def reader(number):
        while not stop.is_set():
            try:
                rows = datasets.load_dataset(str(reg), "model-moving", split="ru",
                                             cache_dir=str(tmp_path / f"cache-{number}-{len(reads)}"))["neuron"]
                assert tuple(rows) in allowed, rows
                reads.append(1)
            except Exception as exc:  # noqa: BLE001 - every failure of a reader is what this test counts
                failures.append(repr(exc))

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        for i in range(12):
            registry.write_selection("model", states[(i + 1) % 2], name="moving")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]
    assert reads
    # The disk cost stays bounded: the current version and at most one superseded one.
    assert len(list((reg / "model" / "moving").iterdir())) <= 2


# -- 10. locks, names, a failed compute ---------------------------------------------------------------------------
@pytest.mark.parametrize("pid", [0, -1, "4242", 99999999999999999999999, None, True])
def test_a_lock_with_an_impossible_pid_is_taken_over(reg, pid):
    (reg / "model" / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "x",
                                                     "since": "2020-01-01T00:00:00+00:00"}))
    result = run("select", "model", "--top-rate", 0.5, "--registry", reg)
    assert "Taking over the lock" in result.stderr and not (reg / "model" / ".lock").exists()


@pytest.mark.parametrize("content", ["", '{"pid": 12', "[]", "null"])
def test_an_empty_or_damaged_lock_does_not_block(reg, content):
    (reg / "model" / ".lock").write_text(content)
    result = run("select", "model", "--top-rate", 0.5, "--registry", reg)
    assert "Taking over the lock" in result.stderr


def test_a_full_disk_while_the_lock_is_written_leaves_no_lock(reg, monkeypatch):
    import neuronreg.store.locks as locks

    real = locks.os.write

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(locks.os, "write", full)
    assert_one_line_error(run("select", "model", "--top-rate", 0.5, "--registry", reg, ok=False),
                          "No space left on device")
    monkeypatch.setattr(locks.os, "write", real)
    assert not list((reg / "model").glob(".lock*")) and not list(reg.glob(".lock*"))
    run("select", "model", "--top-rate", 0.5, "--registry", reg, "-q")


@pytest.mark.parametrize("name", ["x\n", "x\r", "x\n\n", "\nx"])
def test_a_name_with_a_newline_is_refused(reg, tmp_path, name):
    from neuronreg.files import SAFE_NAME, safe_name

    assert SAFE_NAME.match(name) is None
    with pytest.raises(RegistryError):
        safe_name(name, "Model")
    result = run(*import_args(lape_file(tmp_path / "m.pt"), reg, "--model", "x/y", "--name", name), ok=False)
    assert_one_line_error(result, "cannot be a registry path")


def test_names_with_a_newline_read_from_a_repo_card_are_skipped(registry, tmp_path, hub):
    from huggingface_hub import HfApi

    from neuronreg.store.hub import read_remote_index

    run("publish", "--repo", REPO, "--registry", registry, "-q")
    card = hub.file_bytes("dataset", REPO, "README.md").decode()
    import yaml

    head, body = card.split("\n---\n", 1)
    meta = yaml.safe_load(head.removeprefix("---\n"))
    index = meta["neuronreg"]
    index["models"]["evil\n"] = index["models"]["model"]
    selections = index["models"]["model"]["selections"]
    selections[SELECTION] = {**selections[SELECTION], "languages": ["ru\n", "en"]}
    text = "---\n" + yaml.safe_dump(meta) + "---\n" + body
    HfApi().upload_file(path_or_fileobj=text.encode(), path_in_repo="README.md", repo_id=REPO, repo_type="dataset")
    index = read_remote_index(REPO)
    assert "evil\n" not in index.models and not index.entries("model")


def test_a_failed_compute_removes_the_folder_it_created_and_nothing_else(planted, reg, tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "en.txt").write_text("\n\n")  # no text at all
    folder = tmp_path / "other-model"
    shutil.copytree(planted / "model", folder)
    result = run("compute", folder, "en", "--corpus", texts, "--tokens", 600, "--registry", reg, ok=False)
    assert result.exit_code == 1, result.output
    assert not (reg / "other-model").exists()
    assert (reg / "model" / "counts" / "en.parquet").is_file()

    fresh = tmp_path / "fresh"
    result = run("compute", folder, "en", "--corpus", texts, "--tokens", 600, "--registry", fresh, ok=False)
    assert result.exit_code == 1 and not (fresh / "other-model").exists()

    before = snapshot(reg)  # a model that is there keeps its folder
    result = run("compute", planted / "model", "en", "--corpus", texts, "--tokens", 600, "--force", "--registry",
                 reg, ok=False)
    assert result.exit_code == 1 and snapshot(reg) == before
