"""Nothing lost, nothing wrong, nothing let in: the registry under faults, races and hostile input.

Each test reproduces a failure found by a hostile review of neuronreg 0.1 and shows the safe outcome:
the right counts or a refusal, the registry byte-identical after every failed command, nothing
uploaded from outside the registry, one line on stderr.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from neuronreg.errors import FinetuneError
from neuronreg.store.local import LocalRegistry

from support.cli import assert_one_line_error, neuron_file, run
from support.hubserver import TEST_TOKEN, TEST_USER
from support.tiny import PLANTED, TOP_RATE, planted_model, save_model

REPO = f"{TEST_USER}/lape-neurons"


def compute(root: Path, reg: Path, *extra, langs=("en", "ru", "el"), ok=True):
    return run("compute", root / "model", *langs, "--corpus", root / "texts", "--tokens", "3k", "--seq-len", 64,
               "--top-rate", TOP_RATE, "--registry", reg, "-q", *extra, ok=ok)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def loads_with_datasets(reg: Path, config: str = "model") -> dict:
    """Every split of a config, through `datasets` (which checks the files against the card)."""
    import datasets

    found = {}
    for lang in LocalRegistry(reg).selection("model").languages:
        if LocalRegistry(reg).read_mask("model", lang).layer.size:
            found[lang] = datasets.load_dataset(str(reg), config, split=lang)["neuron"]
    return found


@pytest.fixture(scope="module")
def registry(tmp_path_factory, planted) -> Path:
    reg = tmp_path_factory.mktemp("guarantees") / "reg"
    compute(planted, reg)
    return reg


# -- 1. a damaged or mismatched checkpoint is never resumed from ----------------------------------------
@pytest.mark.parametrize("damage", ["shape", "negative", "float", "rows", "garbage", "too-many", "rows-skipped",
                                    "tokens-over-rows", "over-budget", "sum-over-positive", "positive-never-fired"])
def test_a_damaged_checkpoint_is_discarded_and_the_counts_stay_exact(planted, registry, tmp_path, damage,
                                                                    monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    import neuronreg.lape.compute as compute_module

    reg = tmp_path / "reg"
    real = compute_module.pack_rows

    def interrupted(*args, **kwargs):
        for i, row in enumerate(real(*args, **kwargs)):
            if i == 20:
                raise KeyboardInterrupt
            yield row

    monkeypatch.setattr(compute_module, "pack_rows", interrupted)
    compute(planted, reg, "--checkpoint-tokens", 64, langs=("ru",), ok=False)
    monkeypatch.setattr(compute_module, "pack_rows", real)
    checkpoint = reg / "model" / ".partial" / "ru.safetensors"
    with safe_open(str(checkpoint), "pt") as f:
        meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    counts, tokens, rows = tensors["over_zero"], int(meta["tokens"]), int(meta["rows"])
    assert set(tensors) == {"over_zero", "activation_sum", "positive_sum"} and tokens == rows * 64  # rows of 64
    never = (counts == 0).nonzero()[0].tolist()  # a neuron that never fired (a planted one of another script)
    if damage == "shape":
        counts = torch.zeros(2, 40, dtype=torch.int64)
    elif damage == "negative":
        counts[0, 0] = -5
    elif damage == "float":
        counts = counts.double()
    elif damage == "rows":
        meta = {**meta, "rows": "-3"}
    elif damage == "too-many":
        counts[1, 1] = tokens + 1
    elif damage == "rows-skipped":  # resuming would skip a row that was never counted
        meta = {**meta, "rows": str(rows + 1)}
    elif damage == "tokens-over-rows":
        meta = {**meta, "tokens": str(tokens + 64)}
    elif damage == "over-budget":  # more rows and tokens than the 3,000 tokens asked for can make
        meta = {**meta, "rows": "60", "tokens": str(60 * 64)}
    elif damage == "sum-over-positive":
        tensors["activation_sum"][0, 0] = tensors["positive_sum"][0, 0] + 1.0
    elif damage == "positive-never-fired":
        tensors["positive_sum"][never[0], never[1]] = 0.5
    if damage == "garbage":
        checkpoint.write_bytes(b"not a checkpoint")
    else:
        save_file({**tensors, "over_zero": counts}, str(checkpoint), metadata=meta)
    result = compute(planted, reg, langs=("ru",), ok=False)
    assert result.exit_code == 0 and "Discarding the checkpoint" in result.stderr, result.output
    assert pq.read_table(reg / "model" / "counts" / "ru.parquet")["count"].to_pylist() == \
        pq.read_table(registry / "model" / "counts" / "ru.parquet")["count"].to_pylist()


def test_an_interrupt_before_any_new_batch_keeps_the_checkpoint_as_it_was(planted, tmp_path, monkeypatch):
    import neuronreg.lape.compute as compute_module

    reg = tmp_path / "reg"
    real = compute_module.pack_rows

    def stop_at(n):
        def rows(*args, **kwargs):
            for i, row in enumerate(real(*args, **kwargs)):
                if i == n:
                    raise KeyboardInterrupt
                yield row
        return rows

    monkeypatch.setattr(compute_module, "pack_rows", stop_at(20))
    compute(planted, reg, "--checkpoint-tokens", 64, langs=("ru",), ok=False)
    checkpoint = reg / "model" / ".partial" / "ru.safetensors"
    before = checkpoint.read_bytes()
    monkeypatch.setattr(compute_module, "pack_rows", stop_at(20))  # the resumed run skips 20 rows: stops at once
    compute(planted, reg, "--checkpoint-tokens", 64, langs=("ru",), ok=False)
    assert checkpoint.read_bytes() == before


# -- 2. a local model's revision follows its weights --------------------------------------------------------
def test_other_weights_of_the_same_size_are_another_revision(planted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(planted / "model", folder)
    reg = tmp_path / "reg"
    args = ("en", "--corpus", planted / "texts", "--tokens", 600, "--seq-len", 64, "--top-rate", TOP_RATE,
            "--registry", reg)
    run("compute", folder, *args, "-q")
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    other = tmp_path / "other"
    save_model(planted_model(PLANTED, seed=7), other)
    shutil.copy(other / "model.safetensors", weights)
    assert weights.stat().st_size == size
    assert_one_line_error(run("compute", folder, *args, ok=False), "counted with other settings", "revision")

    # A delta records its base's fingerprint: applying it to other weights is refused unless asked.
    shutil.copytree(planted / "model", tmp_path / "base")
    run("finetune", tmp_path / "base", "en", "--name", "model", "--mask", reg, "--data", planted / "texts",
        "--steps", 1, "--seq-len", 32, "--eval-every", 1, "--out", tmp_path / "run", "-q")
    shutil.copy(other / "model.safetensors", tmp_path / "base" / "model.safetensors")
    evaluate = ("evaluate", tmp_path / "run", "--data", planted / "texts", "--seq-len", 32, "--tokens", 200)
    assert_one_line_error(run(*evaluate, ok=False), "than the run trained on",
                          "--allow-other-base")
    from neuronreg.finetune.loading import load_sparse_model

    with pytest.raises(FinetuneError, match="allow_other_base=True"):
        load_sparse_model(tmp_path / "run")
    allowed = run(*evaluate, "--allow-other-base")
    assert "Applying the delta anyway" in allowed.stderr


# -- 3. counts files are validated on read -----------------------------------------------------------------
LEGACY_COUNTS = Path(__file__).parent / "data" / "counts-1.0" / "registry"


@pytest.mark.parametrize("layout,damage,message", [
    ("2.0", "negative", "counts outside [0, 3000]"),
    ("2.0", "too-large", "counts outside [0, 3000]"),
    ("2.0", "rows", "has 95 rows for 2 x 48 neurons"),
    ("2.0", "float", "count column of double"),
    ("2.0", "strings", "count column of string"),
    ("1.0", "duplicate", "does not hold every neuron exactly once"),
    ("1.0", "negative", "counts outside [0, 3000]"),
    ("1.0", "rows", "has 95 rows for 2 x 48 neurons"),
    ("1.0", "float", "count column of double"),
])
def test_counts_files_are_validated_on_read(registry, tmp_path, layout, damage, message):
    reg = tmp_path / "reg"
    shutil.copytree(registry if layout == "2.0" else LEGACY_COUNTS, reg)
    model = "model" if layout == "2.0" else "planted"
    path = reg / model / "counts" / "el.parquet"
    table = pq.read_table(path)
    assert json.loads(table.schema.metadata[b"neuronreg"])["schema_version"] == layout
    data, schema = table.to_pydict(), table.schema
    if damage == "duplicate":
        data["neuron"][5] = data["neuron"][4]
    elif damage == "negative":
        data["count"][3] = -1
    elif damage == "too-large":
        data["count"][3] = 10**9
    elif damage in ("float", "strings"):
        data["count"] = [float(c) if damage == "float" else str(c) for c in data["count"]]
        schema = schema.set(schema.get_field_index("count"), pa.field("count", pa.float64() if damage == "float"
                                                                      else pa.string()))
    else:
        data = {k: v[:-1] for k, v in data.items()}
    pq.write_table(pa.table(data, schema=schema), path)
    before = snapshot(reg)
    assert_one_line_error(run("select", model, "--top-rate", 0.2, "--registry", reg, ok=False), message)
    assert snapshot(reg) == before  # nothing written, nothing migrated


# -- 4. settings that produce NaN, and runs that diverge -----------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "nan"), ("--clip", "nan"), ("--lr", "0"),
                                        ("--weight-decay", "-1"), ("--clip", "inf")])
def test_settings_that_cannot_train_are_refused(planted, registry, tmp_path, flag, value):
    result = run("finetune", planted / "model", "en", "--mask", registry, "--data", planted / "texts",
                 "--out", tmp_path / "run", flag, value, ok=False)
    assert_one_line_error(result, flag.lstrip("-").replace("-", "_"))
    assert not (tmp_path / "run").exists()


def test_a_run_whose_loss_stops_being_finite_stops_and_keeps_its_last_checkpoint(planted, registry, tmp_path,
                                                                                  monkeypatch):
    import neuronreg.finetune.training as training

    real = training.token_nll
    calls = {"n": 0}

    def diverging(model, ids, *args, **kwargs):
        loss, count = real(model, ids, *args, **kwargs)
        if model.training:
            calls["n"] += 1
            if calls["n"] >= 3:
                return loss * float("nan"), count
        return loss, count

    monkeypatch.setattr(training, "token_nll", diverging)
    out = tmp_path / "run"
    result = run("finetune", planted / "model", "en", "--mask", registry, "--data", planted / "texts", "--steps", 5,
                 "--seq-len", 32, "--eval-every", 1, "--out", out, "-q", ok=False)
    assert_one_line_error(result, "training loss became nan at step 3", "last checkpoint (step 2)", "--lr")
    assert (out / "checkpoint.pt").exists() and not (out / "delta.safetensors").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2


def test_release_refuses_a_run_without_a_finite_best_step(planted, registry, tmp_path, hub):
    out = tmp_path / "run"
    run("finetune", planted / "model", "en", "--mask", registry, "--data", planted / "texts", "--steps", 1,
        "--seq-len", 32, "--out", out, "-q")
    config = json.loads((out / "neuronreg_delta.json").read_text())
    config["best_step"] = None
    (out / "neuronreg_delta.json").write_text(json.dumps(config))
    assert_one_line_error(run("release", out, "--repo", f"{TEST_USER}/r", ok=False), "no finite best validation")
    assert not hub.files_or_none("model", f"{TEST_USER}/r")


# -- 5. a selection becomes visible all at once or not at all ---------------------------------------------
@pytest.mark.parametrize("target", ["os.replace", "write_parquet", "mkdir"])
def test_select_fails_at_every_step_and_leaves_the_registry_byte_identical(registry, tmp_path, monkeypatch, target):
    import neuronreg.files as files
    import neuronreg.store.local as local

    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    before = snapshot(reg)
    old_rows = loads_with_datasets(reg)
    for n in range(1, 40):
        calls = {"n": 0}

        def failing(real):
            def call(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == n:
                    raise OSError(28, "No space left on device")
                return real(*args, **kwargs)
            return call

        with monkeypatch.context() as patch:
            if target == "os.replace":
                patch.setattr(files.os, "replace", failing(os.replace))
            elif target == "write_parquet":
                patch.setattr(local, "write_parquet", failing(local.write_parquet))
            else:
                patch.setattr(Path, "mkdir", failing(Path.mkdir))
            result = run("select", "model", "--top-rate", 0.5, "--default", "--registry", reg, ok=False)
        if result.exit_code == 0:
            break
        assert_one_line_error(result, "No space left on device")
        assert snapshot(reg) == before, (target, n)  # byte-identical after every failed run
        assert loads_with_datasets(reg) == old_rows
    else:
        raise AssertionError("select never succeeded")
    new_rows = loads_with_datasets(reg)
    assert new_rows != old_rows and len(new_rows["ru"]) > 3


def test_stray_and_unreadable_things_in_the_model_folder(registry, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    (reg / "model" / "zz.parquet").mkdir()
    (reg / "model" / "e l.parquet").write_text("junk")
    (reg / "model" / ".top50.tmp").write_text("a killed run's leftover")
    run("select", "model", "--top-rate", 0.5, "--registry", reg, "-q")
    assert loads_with_datasets(reg)
    assert set(LocalRegistry(reg).selection("model", "top50").languages) == {"el", "en", "ru"}
    assert not (reg / "model" / ".top50.tmp").exists()  # leftovers go on the next write

    before = snapshot(reg)
    os.chmod(reg / "model", 0o555)
    try:
        if os.access(reg / "model", os.W_OK):
            pytest.skip("running as a user who can write to read-only folders (root)")
        result = run("select", "model", "--top-rate", 0.3, "--registry", reg, ok=False)
        assert_one_line_error(result)
    finally:
        os.chmod(reg / "model", 0o755)
    assert snapshot(reg) == before


@pytest.mark.slow
def test_select_killed_at_random_points_leaves_the_old_or_the_new_state(registry, tmp_path, monkeypatch):
    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    old_rows = loads_with_datasets(reg)
    command = [sys.executable, "-m", "neuronreg", "select", "model", "--top-rate", "0.5", "--default", "--registry",
               str(reg), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    took = time.perf_counter() - start
    shutil.rmtree(reg)
    shutil.copytree(registry, reg)
    seen = set()
    for fraction in (0.55, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(took * fraction)
        process.send_signal(signal.SIGKILL)
        process.wait()
        rows = loads_with_datasets(reg)
        seen.add("old" if rows == old_rows else "new")
        assert rows == old_rows or len(rows["ru"]) > 3, fraction
        if rows != old_rows:
            break
    (reg / "model" / ".lock").unlink(missing_ok=True)
    from neuronreg.store import local

    monkeypatch.setattr(local, "SUPERSEDED_GRACE", 0.0)  # no reader to wait for: the next write tidies up
    # (another selection: the same one again may find the killed run's committed selection and write nothing)
    run("select", "model", "--top-rate", 0.4, "--registry", reg, "-q")
    card = LocalRegistry(reg).index()
    named = {entry.path.rsplit("/", 1)[-1] for entry in card.entries("model") if entry.name == "top50"}
    versions = {p.name for p in (reg / "model" / "top50").iterdir()}
    assert versions == named and len(named) == 1 and not list(reg.rglob("*.tmp")), (versions, named)


# -- 6. one writer at a time ---------------------------------------------------------------------------------
HOLD = """
import sys, time
from neuronreg.store.local import LocalRegistry
with LocalRegistry(sys.argv[1]).model_lock("model", "a long compute"):
    print("held", flush=True)
    time.sleep(30)
"""


def test_a_second_writer_is_told_who_holds_the_model(registry, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(reg)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(reg)
        for command in (["select", "model", "--top-rate", 0.5], ["compute", "model", "en", "--force", "--corpus",
                                                                 tmp_path, "--tokens", 100]):
            result = run(*command, "--registry", reg, ok=False)
            assert_one_line_error(result, f"is being written by pid {holder.pid}", "a long compute",
                                  "delete its lock file")
        assert snapshot(reg) == before
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock is stale and taken over, with a warning.
    taken = run("select", "model", "--top-rate", 0.5, "--registry", reg)
    assert "Taking over the lock" in taken.stderr and not (reg / "model" / ".lock").exists()


def test_two_selects_at_once_give_two_whole_selections(registry, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "neuronreg", "select", "model", "--top-rate", rate,
                               "--registry", str(reg), "-q"], env=env, stderr=subprocess.PIPE, text=True)
             for rate in ("0.3", "0.5")]
    outcomes = [(p.wait(), p.stderr.read()) for p in procs]
    ok = [code == 0 for code, _ in outcomes]
    for code, err in outcomes:
        assert code == 0 or "is being written by pid" in err, err
    names = {e.name for e in LocalRegistry(reg).selections("model")}
    assert {"top30", "top50"} & names and len(names) == 1 + sum(ok)
    import datasets

    for entry in LocalRegistry(reg).selections("model"):
        assert datasets.load_dataset(str(reg), f"model-{entry.name}", split="ru").num_rows == \
            entry.neurons["ru"]


# -- 7. names that would break the card ---------------------------------------------------------------------
def test_names_yaml_would_misread_and_reserved_names(planted, registry, tmp_path):
    import datasets

    reg = tmp_path / "reg"
    masks = tmp_path / "masks.pt"
    torch.save([[torch.tensor([1, 5]), torch.tensor([2])], [torch.tensor([0]), torch.tensor([2, 3])]], masks)
    names = ["true", "null", "yes", "on", "1.0", "0x10", "no", "off", "1e3"]
    for name in names:
        run("import", masks, "--model", f"acme/{name}", "--name", name, "--layers", 2, "--intermediate-size", 48,
            "--languages", "en,ru", "--registry", reg, "-q")
    for name in names:
        assert datasets.load_dataset(str(reg), name, split="ru")["neuron"] == [0, 2, 3]
    for reserved in ("README.md", "readme.md", "counts"):
        assert_one_line_error(run("import", masks, "--model", "acme/x", "--name", reserved, "--layers", 2,
                                  "--intermediate-size", 48, "--languages", "en,ru", "--registry", reg, ok=False),
                              "reserved")
    assert (reg / "README.md").is_file()


# -- 8. publish sends regular, valid files from inside the registry only --------------------------------------
def test_publish_ignores_links_and_refuses_damaged_files(registry, tmp_path, hub):
    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    secret = tmp_path / "secret.txt"
    secret.write_text("my private notes")
    (reg / "model" / "counts" / "zz.parquet").symlink_to(secret)
    (reg / "model" / "counts" / "yy.parquet").symlink_to(reg / "model" / "counts" / "en.parquet")
    out = run("publish", "--repo", REPO, "--registry", reg, "-q")
    files = hub.files("dataset", REPO)
    assert not any(f.endswith(("zz.parquet", "yy.parquet")) for f in files)
    assert all(b"my private notes" not in hub.file_bytes("dataset", REPO, f) for f in files)
    for name in ("zz", "yy"):  # left out, and said so
        assert f"{name}.parquet is a symbolic link: not published" in out.stderr
    # A counts file that became a link is left out, and the repo's copy of it is kept, not deleted.
    published = hub.file_bytes("dataset", REPO, "model/counts/el.parquet")
    moved = tmp_path / "el.parquet"
    shutil.move(reg / "model" / "counts" / "el.parquet", moved)
    (reg / "model" / "counts" / "el.parquet").symlink_to(moved)
    run("select", "model", "--top-rate", 0.2, "--languages", "en,ru", "--registry", reg, "-q")
    out = run("publish", "--repo", REPO, "--registry", reg)
    assert "el.parquet is a symbolic link: not published (the repo's copy, if it has one, is kept)" in out.stderr
    assert hub.file_bytes("dataset", REPO, "model/counts/el.parquet") == published
    assert "deleted 0" in out.stderr

    truncated = reg / "model" / "counts" / "ru.parquet"
    truncated.write_bytes(truncated.read_bytes()[:200])
    commits = hub.commits("dataset", REPO)
    assert_one_line_error(run("publish", "--repo", REPO, "--registry", reg, ok=False), "ru.parquet", "damaged")
    assert hub.commits("dataset", REPO) == commits
    # Nor is an empty repo left behind when the first publish fails.
    assert_one_line_error(run("publish", "--repo", f"{TEST_USER}/fresh", "--registry", reg, ok=False), "damaged")
    assert hub.files_or_none("dataset", f"{TEST_USER}/fresh") is None


# -- 9. what a repo holds is validated, and the card escapes it -----------------------------------------------
def test_foreign_and_hostile_files_in_the_repo(registry, tmp_path, hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    evil = tmp_path / "evil"
    shutil.copytree(registry, evil)
    reg = LocalRegistry(evil)
    masks = reg.read_masks("model", ["en", "ru", "el"])
    for mask in masks.values():
        mask.provenance.model.name = "evil"  # the files go to evil/ in the repo: of the model they are filed under
        mask.provenance.model.id = "---\nlicense: stolen\n<script>alert(1)</script> | x |"
        mask.provenance.language.name = "<img src=x onerror=alert(1)>"
    reg.write_selection("evil", masks, name="top9.375")
    api = HfApi(token=TEST_TOKEN)
    api.create_repo(REPO, repo_type="dataset")
    operations = [CommitOperationAdd(f"evil/{lang}.parquet", str(neuron_file(evil, "evil", lang)))
                  for lang in ("en", "ru", "el")]
    bad = pq.read_table(neuron_file(registry, "model", "en"))
    meta = json.loads(bad.schema.metadata[b"neuronreg"])
    data = bad.to_pydict()
    meta["model"]["name"] = "wrong"  # filed under wrong/, of the model wrong
    data["layer"][0] = 99  # out of range
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.table(data, schema=bad.schema).replace_schema_metadata(
        {b"neuronreg": json.dumps(meta).encode()}), broken)
    operations += [CommitOperationAdd("wrong/en.parquet", str(broken)),
                   CommitOperationAdd("a b/el.parquet", str(broken)),
                   CommitOperationAdd("notes/readme.txt", b"not ours")]
    api.create_commit(REPO, operations, repo_type="dataset", commit_message="someone else's files")

    result = run("publish", "--repo", REPO, "--registry", registry)
    assert "Skipping wrong/en.parquet" in result.stderr
    card = hub.file_bytes("dataset", REPO, "README.md").decode()
    body = card.split("\n---\n", 1)[1]
    assert "<script>" not in body and "<img" not in body and "\n---\nlicense: stolen" not in card
    assert "&lt;script&gt;" in body
    import yaml

    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0"
    import datasets

    assert datasets.load_dataset(REPO, "model", split="ru")["neuron"] == [10, 30, 31]
    assert datasets.load_dataset(REPO, "evil", split="ru")["neuron"] == [10, 30, 31]
    assert "a b/el.parquet" in hub.files("dataset", REPO)  # not ours: neither read nor deleted
    assert_one_line_error(run("fetch", "wrong", "en", "--repo", REPO, ok=False), "indices outside")


@pytest.mark.parametrize("damage,message", [
    ("nan-entropy", "entropies outside [0, log 3]"),
    ("big-entropy", "entropies outside [0, log 3]"),
    ("big-prob", "activation probabilities outside [0, 1]"),
    ("string-layer", "layer column of string"),
    ("float-neuron", "neuron column of double"),
    ("wrong-model", "says it is of the model 'other'"),
])
def test_foreign_values_in_a_neuron_file_are_refused_locally_and_from_a_repo(registry, tmp_path, hub, damage,
                                                                            message):
    from huggingface_hub import HfApi

    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    path = neuron_file(reg, "model", "ru")
    table = pq.read_table(path)
    meta, data, schema = json.loads(table.schema.metadata[b"neuronreg"]), table.to_pydict(), table.schema
    if damage == "nan-entropy":
        data["entropy"][0] = float("nan")
    elif damage == "big-entropy":
        data["entropy"][0] = 1.2  # above log 3 = 1.0986, the most three languages' shares can have
    elif damage == "big-prob":
        data["activation_prob"][0] = 5.0
    elif damage in ("string-layer", "float-neuron"):
        name, kind = ("layer", pa.string()) if damage == "string-layer" else ("neuron", pa.float64())
        data[name] = [str(v) if kind == pa.string() else float(v) for v in data[name]]
        schema = schema.set(schema.get_field_index(name), pa.field(name, kind))
    else:
        meta["model"]["name"] = "other"
    pq.write_table(pa.table(data, schema=schema).replace_schema_metadata(
        {b"neuronreg": json.dumps(meta).encode()}), path)
    if damage != "wrong-model":  # a local file may be read under another name of the same model
        assert_one_line_error(run("show", "model", "ru", "--registry", reg, ok=False), message)
    api = HfApi(token=TEST_TOKEN)
    api.create_repo(REPO, repo_type="dataset")
    api.upload_file(path_or_fileobj=str(path), path_in_repo="model/ru.parquet", repo_id=REPO, repo_type="dataset")
    assert_one_line_error(run("fetch", "model", "ru", "--repo", REPO, ok=False), message)


# -- 11. a tag that exists is refused before anything is committed --------------------------------------------
def test_publish_tag_is_checked_before_committing(registry, tmp_path, hub):
    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    run("publish", "--repo", REPO, "--tag", "v1", "--registry", reg, "-q")
    again = run("publish", "--repo", REPO, "--tag", "v1", "--registry", reg)
    assert "already holds this registry" in again.stderr  # the same state again: done, not an error
    run("select", "model", "--top-rate", 0.5, "--registry", reg, "-q")
    commits = hub.commits("dataset", REPO)
    assert_one_line_error(run("publish", "--repo", REPO, "--tag", "v1", "--registry", reg, ok=False),
                          "already has the tag 'v1'", "nothing was committed", "--tag")
    assert hub.commits("dataset", REPO) == commits
    run("publish", "--repo", REPO, "--tag", "v2", "--registry", reg, "-q")


@pytest.mark.slow
def test_publish_fails_at_every_request_and_the_repo_is_old_or_new(registry, tmp_path, hub):
    import datasets

    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    run("publish", "--repo", REPO, "--registry", reg, "-q")
    old = datasets.load_dataset(REPO, "model", split="ru")["neuron"]
    run("select", "model", "--top-rate", 0.5, "--default", "--registry", reg, "-q")
    local_before = snapshot(reg)
    for k in range(0, 60):
        before = hub.commits("dataset", REPO)
        hub.fail_after(k, 400)
        result = run("publish", "--repo", REPO, "--registry", reg, ok=False)
        hub._fail.clear()
        assert snapshot(reg) == local_before
        rows = datasets.load_dataset(REPO, "model", split="ru", download_mode="force_redownload")["neuron"]
        if result.exit_code == 0:
            assert rows != old and len(hub.commits("dataset", REPO)) == len(before) + 1
            break
        assert_one_line_error(result), (k, result.exception)
        assert rows == old and hub.commits("dataset", REPO) == before, k
    else:
        raise AssertionError("publish never succeeded")


# -- 12. one-line errors everywhere ---------------------------------------------------------------------------
def test_one_line_errors_for_bad_values_devices_and_files(planted, registry, tmp_path):
    base = ("compute", planted / "model", "en", "--corpus", planted / "texts", "--registry", tmp_path / "reg")
    for args, fragment in [
        (("--tokens", "inf"), "is not a finite number"),
        (("--tokens", "1e400"), "is not a finite number"),
        (("--tokens", "-3"), "must be positive"),
        (("--device", "bogus"), "Unknown device 'bogus'"),
        (("--device", "cuda:3"), "--device cpu"),
        (("--checkpoint-tokens", "nan"), "Checkpoint interval"),
    ]:
        if "cuda" in args[1] and torch.cuda.device_count() > 3:
            continue
        assert_one_line_error(run(*base, *args, ok=False), fragment)
    assert not (tmp_path / "reg").exists() or not list((tmp_path / "reg").rglob("*.parquet"))

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "en.parquet").write_text("this is not parquet")
    assert_one_line_error(run("compute", planted / "model", "en", "--corpus", texts, "--registry", tmp_path / "r2",
                              ok=False), "en.parquet is not a readable Parquet file")
    assert_one_line_error(run("compute", planted / "model", "en", "--corpus", "hf:x/y:{foo}", "--registry",
                              tmp_path / "r2", ok=False), "placeholder")

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "neuronreg_delta.json").write_text("{broken")
    assert_one_line_error(run("evaluate", run_dir, "--data", planted / "texts", ok=False), "not readable JSON")
    (run_dir / "neuronreg_delta.json").write_text(json.dumps({"format": "neuronreg-delta", "subset": "lape"}))
    assert_one_line_error(run("evaluate", run_dir, "--data", planted / "texts", ok=False), "is missing")
    assert_one_line_error(run("release", run_dir, "--repo", "a/b", ok=False), "is missing")


@pytest.mark.parametrize("tensors,fragment", [
    ([[torch.tensor([1.5])]], "list[language][layer] -> integer tensors"),
    ([[torch.tensor([1 + 2j])]], "list[language][layer] -> integer tensors"),
    ([[torch.tensor([True])]], "list[language][layer] -> integer tensors"),
])
def test_import_refuses_tensors_that_are_not_indices(tmp_path, tensors, fragment):
    torch.save(tensors, tmp_path / "m.pt")
    assert_one_line_error(run("import", tmp_path / "m.pt", "--model", "acme/x", "--layers", 1, "--intermediate-size",
                              8, "--languages", "en", "--registry", tmp_path / "reg", ok=False), fragment)


@pytest.mark.parametrize("rate", ["0", "1.5", "-0.1", "nan"])
def test_import_refuses_a_top_rate_outside_0_1(tmp_path, rate):
    torch.save([[torch.tensor([1])]], tmp_path / "m.pt")
    assert_one_line_error(run("import", tmp_path / "m.pt", "--model", "acme/x", "--layers", 1, "--intermediate-size",
                              8, "--languages", "en", "--top-rate", rate, "--registry", tmp_path / "reg", ok=False),
                          "top_rate must be in (0, 1]")


@pytest.mark.slow
def test_hub_errors_are_one_line(registry, tmp_path, monkeypatch, hub):
    import socket

    assert_one_line_error(run("publish", "--repo", "not a repo", "--registry", registry, ok=False),
                          "is not a valid Hub repo id")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from support.hubserver import point_clients_at

    point_clients_at(f"http://127.0.0.1:{port}", monkeypatch, tmp_path / "dead", token=TEST_TOKEN)
    assert_one_line_error(run("publish", "--repo", REPO, "--registry", registry, ok=False), "Cannot reach the Hub")
    assert_one_line_error(run("fetch", "model", "ru", "--repo", REPO, ok=False), "the Hub cannot be reached")


@pytest.mark.slow
def test_the_offline_message_names_only_what_is_set(registry, hub, monkeypatch, tmp_path):
    import socket

    from support.hubserver import point_clients_at, set_offline

    run("publish", "--repo", REPO, "--registry", registry, "-q")
    set_offline(monkeypatch, True)
    assert_one_line_error(run("fetch", "model", "ru", "--repo", REPO, ok=False), "HF_HUB_OFFLINE is set",
                          "while online")
    set_offline(monkeypatch, False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_clients_at(f"http://127.0.0.1:{port}", monkeypatch, tmp_path / "dead", token=TEST_TOKEN)
    result = run("fetch", "model", "ru", "--repo", REPO, ok=False)
    assert_one_line_error(result, "the Hub cannot be reached")
    assert "HF_HUB_OFFLINE is set" not in result.output and "Unset" not in result.output


def test_run_folders_follow_the_umask(planted, registry, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        run("finetune", planted / "model", "en", "--mask", registry, "--data", planted / "texts", "--steps", 1,
            "--seq-len", 32, "--merged", "--out", out, "-q")
    finally:
        os.umask(old)
    for path in [out / "delta.safetensors", out / "neuronreg_delta.json", *(out / "merged").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert (out / "merged").stat().st_mode & 0o777 == 0o755


def test_a_huge_layer_count_in_a_file_is_refused_not_allocated(registry, tmp_path):
    reg = tmp_path / "reg"
    shutil.copytree(registry, reg)
    path = neuron_file(reg, "model", "ru")
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"neuronreg"])
    meta["model"]["num_layers"] = 10**12
    pq.write_table(table.replace_schema_metadata({b"neuronreg": json.dumps(meta).encode()}), path)
    assert_one_line_error(run("show", "model", "ru", "--registry", reg, ok=False), "num_layers", "out of range")

