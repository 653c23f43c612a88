"""publish / fetch / load_mask with the real huggingface_hub and datasets clients, over HTTP, against
the loopback Hub server of tests/hubserver.py."""

import json

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner

from neuronreg.cli import cli
from neuronreg.errors import HubError, MaskError
from neuronreg.provenance import MaskSource
from neuronreg.store.hub import fetch_mask, publish
from neuronreg.store.local import LocalRegistry
from neuronreg.store.masks import load_mask

from support.cli import assert_one_line_error, run
from support.hubserver import TEST_USER, set_offline
from support.tiny import PLANTED, TOP_RATE, planted_model, save_model, tiny_model, write_corpus
from support.traffic import Traffic, total

REPO = f"{TEST_USER}/lape-neurons"


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory):
    """A registry with two models: the planted Llama (en ru el) and a second name for it (ru el)."""
    root = tmp_path_factory.mktemp("hubreg")
    save_model(planted_model(PLANTED), root / "model")
    write_corpus(root / "texts", {"en": "en", "ru": "ru", "el": "el"})
    reg = root / "reg"
    for name, langs in (("planted", ["en", "ru", "el"]), ("planted-b", ["ru", "el"])):
        result = CliRunner().invoke(cli, ["compute", str(root / "model"), *langs, "--corpus", str(root / "texts"),
                                          "--tokens", "3k", "--seq-len", "64", "--top-rate", TOP_RATE, "--name", name,
                                          "--registry", str(reg), "-q"])
        assert result.exit_code == 0, result.output
    return reg




def test_publish_fetch_load_dataset_round_trip(hub, registry_dir, tmp_path):
    import datasets

    result = run("publish", "--repo", REPO, "--registry", registry_dir, "-q")
    assert result.exit_code == 0, result.output
    assert len(hub.commits("dataset", REPO)) == 2  # the repo's initial commit, then ONE commit for everything
    files = set(hub.files("dataset", REPO))
    assert {"README.md", "planted/ru.parquet", "planted/counts/ru.parquet", "planted/neurons_per_layer.png",
            "planted-b/el.parquet"} <= files
    local = LocalRegistry(registry_dir)
    for model in ("planted", "planted-b"):
        for lang in local.selected_languages(model):
            published = hub.file_bytes("dataset", REPO, f"{model}/{lang}.parquet")
            assert published == local.neuron_path(model, lang).read_bytes()
            rows = datasets.load_dataset(REPO, model, split=lang)
            table = pq.read_table(local.neuron_path(model, lang))
            assert rows["layer"] == table["layer"].to_pylist() and rows["neuron"] == table["neuron"].to_pylist()
            mask = fetch_mask(model, lang, repo=REPO)
            assert list(zip(mask.layer.tolist(), mask.neuron.tolist())) == list(zip(rows["layer"], rows["neuron"]))
            assert mask.source.commit == hub.commits("dataset", REPO)[0]
    png = hub.file_bytes("dataset", REPO, "planted/neurons_per_layer.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_card_parses_and_its_configs_load(hub, registry_dir):
    import datasets

    publish(LocalRegistry(registry_dir), REPO)
    card = hub.file_bytes("dataset", REPO, "README.md").decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["license"] and meta["size_categories"] and "lape" in meta["tags"]
    assert set(meta["language"]) == {"el", "en", "ru"}
    for config in meta["configs"]:
        for item in config["data_files"]:
            assert datasets.load_dataset(REPO, config["config_name"], split=item["split"]).num_rows > 0
    for text in ("## planted", "## planted-b", "![Neurons per layer", "neuronreg fetch", "@inproceedings{tang",
                 "| Russian | ru | 3,000 | 3 (1.370%) |", "top rate 0.09375"):
        assert text in card, text


def test_republishing_makes_no_commit_and_a_change_makes_one(hub, registry_dir, tmp_path):
    reg = LocalRegistry(registry_dir)
    first = publish(reg, REPO)
    again = publish(reg, REPO)
    assert first.changed and not again.changed and again.commit == first.commit
    assert len(hub.commits("dataset", REPO)) == 2  # the repo's initial commit and the first publish
    out = run("publish", "--repo", REPO, "--registry", registry_dir)
    assert out.exit_code == 0 and "no commit made" in out.stderr

    # A new selection of one model: only that model's files and the card change, in one commit.
    import shutil

    copy = tmp_path / "reg"
    shutil.copytree(registry_dir, copy)
    assert run("select", "planted-b", "--top-rate", 0.5, "--registry", copy, "-q").exit_code == 0
    changed = publish(LocalRegistry(copy), REPO, ["planted-b"])
    assert changed.changed and len(hub.commits("dataset", REPO)) == 3
    assert all(path.startswith("planted-b/") or path == "README.md" for path in changed.uploaded)
    # The card still lists the model that was not republished.
    assert "config_name: planted\n" in hub.file_bytes("dataset", REPO, "README.md").decode()


def test_a_second_publish_sends_only_what_changed_and_says_how_much(hub, registry_dir, tmp_path):
    import shutil

    traffic = Traffic(hub)
    copy = tmp_path / "reg"
    shutil.copytree(registry_dir, copy)
    first = publish(LocalRegistry(copy), REPO)
    calls = traffic.take()
    uploads = [c for c in calls if c.kind == "upload"]
    # Every content is sent once, though the default selection's files are at two paths each.
    assert len({c.path for c in uploads}) == len(uploads) and len(uploads) < len(first.uploaded) - 1
    card = len(hub.file_bytes("dataset", REPO, "README.md"))  # sent inside the commit, not as an LFS object
    assert sum(c.sent for c in uploads) + card == first.sent_bytes and first.present == 0
    assert total(calls, "download") == (0, 0, 0)  # a first publish reads nothing back

    # Another selection: only its files and the card are sent; nothing is downloaded.
    run("select", "planted", "--top-rate", 0.5, "--registry", copy, "-q")
    second = publish(LocalRegistry(copy), REPO)
    calls = traffic.take()
    assert sorted(second.uploaded) == ["README.md"] + [f"planted/top50/{lang}.parquet" for lang in ("el", "en", "ru")]
    assert total(calls, "download") == (0, 0, 0)
    assert sum(c.sent for c in calls if c.kind == "upload") + len(hub.file_bytes("dataset", REPO, "README.md")) \
        == second.sent_bytes
    published = len(hub.files("dataset", REPO)) - 1  # all but .gitattributes
    assert second.present == published - len(second.uploaded)
    assert second.present_bytes == sum(len(hub.file_bytes("dataset", REPO, p)) for p in hub.files("dataset", REPO)
                                       if p != ".gitattributes" and p not in second.uploaded)
    # Nothing changed: two requests (does the repo exist, what does its head hold), and the output says so.
    out = run("publish", "--repo", REPO, "--registry", copy)
    assert total(traffic.take())[0] == 2
    assert f"({published} file(s)" in out.stderr and "already there): no commit made" in out.stderr
    run("select", "planted", "--top-rate", 0.6, "--registry", copy, "-q")
    out = run("publish", "--repo", REPO, "--registry", copy)
    assert "Uploaded 4 file(s) (" in out.stderr and " sent; " in out.stderr and "already there), deleted 0" in \
        out.stderr


def test_publishing_one_model_takes_the_others_files_from_what_is_at_hand(hub, registry_dir, tmp_path):
    import shutil

    traffic = Traffic(hub)
    publish(LocalRegistry(registry_dir), REPO)
    # The local registry holds planted too, byte for byte as published: none of its files is downloaded.
    copy = tmp_path / "reg"
    shutil.copytree(registry_dir, copy)
    run("select", "planted-b", "--top-rate", 0.5, "--registry", copy, "-q")
    traffic.take()
    publish(LocalRegistry(copy), REPO, ["planted-b"])
    downloads = {c.path.rsplit("/", 1)[-1] for c in traffic.take() if c.kind == "download"}
    assert downloads == {"README.md"}  # the card, for the index of what the repo holds
    # A registry without planted: its files come from the repo once, then from the Hub cache.
    only_b = tmp_path / "only-b"
    root = registry_dir.parent
    run("compute", root / "model", "ru", "el", "--corpus", root / "texts", "--tokens", "3k", "--seq-len", 64,
        "--top-rate", 0.7, "--name", "planted-b", "--registry", only_b, "-q")
    publish(LocalRegistry(only_b), REPO, ["planted-b"])
    assert any(c.path.endswith("/planted/ru.parquet") for c in traffic.take() if c.kind == "download")
    run("select", "planted-b", "--top-rate", 0.8, "--registry", only_b, "-q")
    result = publish(LocalRegistry(only_b), REPO, ["planted-b"])
    assert result.changed and {c.path.rsplit("/", 1)[-1] for c in traffic.take() if c.kind == "download"} == \
        {"README.md"}
    assert "config_name: planted\n" in hub.file_bytes("dataset", REPO, "README.md").decode()


def test_a_stale_parent_fails_cleanly(hub, registry_dir, monkeypatch):
    from huggingface_hub import HfApi

    publish(LocalRegistry(registry_dir), REPO)
    before = hub.commits("dataset", REPO)
    original = HfApi.create_commit

    pushed = []

    def someone_pushes_first(self, *args, **kwargs):
        if not pushed:  # another writer commits between our plan and our commit
            pushed.append(True)
            HfApi().upload_file(path_or_fileobj=b"hello", path_in_repo="other.txt", repo_id=REPO, repo_type="dataset")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", someone_pushes_first)
    import shutil  # noqa: E401
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(registry_dir, tmp, dirs_exist_ok=True)
        run("select", "planted", "--top-rate", 0.5, "--registry", tmp, "-q")
        result = run("publish", "--repo", REPO, "--registry", tmp, ok=False)
    assert_one_line_error(result, "changed while publishing", "Run publish again")
    after = hub.commits("dataset", REPO)
    assert len(after) == len(before) + 1  # only the other writer's commit
    assert "other.txt" in hub.files("dataset", REPO)


def test_a_failed_upload_leaves_the_repo_as_it_was(hub, registry_dir, tmp_path):
    publish(LocalRegistry(registry_dir), REPO)
    before = {p: hub.file_bytes("dataset", REPO, p) for p in hub.files("dataset", REPO)}
    import shutil

    shutil.copytree(registry_dir, tmp_path / "reg")
    run("select", "planted", "--top-rate", 0.4, "--registry", tmp_path / "reg", "-q")
    hub.fail_next(50, status=503)
    result = run("publish", "--repo", REPO, "--registry", tmp_path / "reg", ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    hub.fail_next(0)
    assert {p: hub.file_bytes("dataset", REPO, p) for p in hub.files("dataset", REPO)} == before


def test_private_repo_needs_a_token(hub, registry_dir, monkeypatch):
    publish(LocalRegistry(registry_dir), REPO, private=True)
    assert fetch_mask("planted", "ru", repo=REPO).language == "ru"
    monkeypatch.setenv("HF_TOKEN", "")
    with pytest.raises(HubError, match="private and your token cannot see it"):
        fetch_mask("planted", "el", repo=REPO, token=False)
    result = run("fetch", "planted", "el", "--repo", REPO, "--token", "hf_wrong", ok=False)
    assert_one_line_error(result, "refused the token")
    assert "hf_wrong" not in result.output  # tokens are never printed


def test_publish_without_login_is_a_clear_error(hub, registry_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr("huggingface_hub.utils._auth.get_token", lambda: None, raising=False)
    result = run("publish", "--repo", f"{TEST_USER}/fresh", "--registry", registry_dir, ok=False)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "hf auth login" in result.output


def test_gated_repo(hub, registry_dir, monkeypatch):
    publish(LocalRegistry(registry_dir), REPO)
    hub.set_gated("dataset", REPO)
    hub.tokens["hf_other"] = "bob"
    with pytest.raises(HubError, match="gated"):
        fetch_mask("planted", "ru", repo=REPO, token="hf_other")


def test_missing_repo_model_and_language_say_what_exists(hub, registry_dir):
    publish(LocalRegistry(registry_dir), REPO)
    assert_one_line_error(run("fetch", "planted", "sw", "--repo", REPO, ok=False), "No sw neurons for planted",
                          "available: el, en, ru")
    assert_one_line_error(run("fetch", "nemo", "sw", "--repo", REPO, ok=False), "has no model nemo",
                          "planted, planted-b")
    assert_one_line_error(run("fetch", "planted", "ru", "--repo", f"{TEST_USER}/nope", ok=False), "was not found")
    assert_one_line_error(run("fetch", "planted", "swahilli", "--repo", REPO, ok=False), "Did you mean")


def test_fetch_formats_tags_and_offline_cache(hub, registry_dir, tmp_path):
    reg = LocalRegistry(registry_dir)
    assert run("publish", "planted", "--repo", REPO, "--tag", "v1.0", "--registry", registry_dir).exit_code == 0
    expected = [torch.tensor(sorted(j for layer, langs in PLANTED.items() if layer == index for j in langs["ru"]))
                for index in range(2)]
    hub.clear_requests()
    pt = tmp_path / "ru.pt"
    result = run("fetch", "planted", "Russian", "--repo", REPO, "--revision", "v1.0", "--format", "pt", "-o", pt)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(pt) and "3 neurons" in result.stderr and "per layer: 1 2" in result.stderr
    assert [t.tolist() for t in torch.load(pt, weights_only=True)] == [t.tolist() for t in expected]
    # A cold fetch downloads exactly the one file asked for.
    downloads = {path.split("?")[0] for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert downloads == {f"/datasets/{REPO}/resolve/v1.0/planted/ru.parquet"}

    js = json.loads(run("fetch", "planted", "ru", "--repo", REPO, "--revision", "v1.0").stdout)
    assert js["layers"] == [t.tolist() for t in expected] and js["source"]["repo"] == REPO
    st = tmp_path / "ru.safetensors"
    assert run("fetch", "planted", "ru", "--repo", REPO, "-o", st).exit_code == 0
    from safetensors.torch import load_file

    assert load_file(str(st))["neuron"].tolist() == [10, 30, 31]
    pq_out = tmp_path / "ru.parquet"
    assert run("fetch", "planted", "ru", "--repo", REPO, "-o", pq_out).exit_code == 0
    assert pq_out.read_bytes() == reg.neuron_path("planted", "ru").read_bytes() or \
        pq.read_table(pq_out)["neuron"].to_pylist() == [10, 30, 31]

    # Offline: served from the Hub cache, no request at all.
    hub.clear_requests()
    with pytest.MonkeyPatch.context() as mp:
        set_offline(mp, True)
        mask = fetch_mask("planted", "ru", repo=REPO, revision="v1.0")
        assert mask.neuron.tolist() == [10, 30, 31]
        with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
            fetch_mask("planted", "el", repo=REPO, revision="v1.0")
    assert hub.requests == []


def test_ls_repo_reads_the_card_alone_and_works_offline(hub, registry_dir):
    publish(LocalRegistry(registry_dir), REPO)
    traffic = Traffic(hub)
    online = json.loads(run("ls", "--repo", REPO, "--json").stdout)
    assert [m["model"] for m in online["models"]] == ["planted", "planted-b"]
    calls = traffic.take()
    # The card alone: its HEAD and GET, no file listing (which the Hub cache could not answer offline).
    assert {c.kind for c in calls} == {"download"} and {c.path.rsplit("/", 1)[-1] for c in calls} == {"README.md"}
    with pytest.MonkeyPatch.context() as mp:
        set_offline(mp, True)
        offline = run("ls", "--repo", REPO, "--json")
        assert json.loads(offline.stdout) == online
        table = run("ls", "--repo", REPO).stdout
        assert "planted" in table and "el en ru" in table
        # A repo whose card was never read is a one-line error that says why.
        assert_one_line_error(run("ls", "--repo", f"{TEST_USER}/other", ok=False), "HF_HUB_OFFLINE")
    assert traffic.take() == []


def test_ls_repo_without_a_card_lists_its_files(hub, registry_dir):
    """A repo with no card (neuronreg 0.1's layout, files uploaded by hand) is listed from its files; a card
    without the index: test_selections.py."""
    from huggingface_hub import HfApi

    old = f"{TEST_USER}/no-card"
    api = HfApi()
    api.create_repo(old, repo_type="dataset")
    local = LocalRegistry(registry_dir)
    for lang in ("el", "ru"):
        api.upload_file(path_or_fileobj=local.neuron_path("planted", lang).read_bytes(),
                        path_in_repo=f"planted/{lang}.parquet", repo_id=old, repo_type="dataset")
    hub.clear_requests()
    listing = json.loads(run("ls", "--repo", old, "--json").stdout)
    assert [(m["model"], m["default"], m["selections"][0]["languages"]) for m in listing["models"]] == [
        ("planted", "default", ["el", "ru"])]
    # The card asked for (there is none), then the file list; no Parquet file.
    assert [(method, path.split("?")[0]) for method, path in hub.requests] == [
        ("HEAD", f"/datasets/{old}/resolve/main/README.md"), ("GET", f"/api/datasets/{old}/tree/main")]


def test_load_mask_api_and_check(hub, registry_dir):
    publish(LocalRegistry(registry_dir), REPO)
    mask = load_mask("planted", "Russian", repo=REPO)
    assert mask.per_layer()[1].tolist() == [30, 31]
    boolean = mask.boolean()
    assert boolean.shape == (2, 48) and int(boolean.sum()) == 3 and bool(boolean[0, 10])
    mask.check(planted_model(PLANTED))
    with pytest.raises(MaskError, match="2 layers x 48 neurons, but this model has"):
        from transformers import LlamaConfig, LlamaForCausalLM

        mask.check(LlamaForCausalLM(LlamaConfig(vocab_size=90, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4)))
    local = load_mask("planted", "ru", registry=registry_dir)
    assert local.source == MaskSource(kind="registry", selection="top9.375") and local.location == registry_dir
    assert local.neuron.tolist() == mask.neuron.tolist()
    assert tiny_model  # the same helpers build every model in these tests


def test_compute_streams_a_hub_corpus(hub, registry_dir, tmp_path):
    """--corpus hf:DATASET:CONFIG streams the text with `datasets` over HTTP; counts equal local text."""
    import io

    import pyarrow as pa
    from huggingface_hub import CommitOperationAdd, HfApi

    texts = registry_dir.parent / "texts"
    lines = (texts / "ru.txt").read_text(encoding="utf-8").splitlines()
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": lines}), buffer)
    card = "---\nconfigs:\n- config_name: rus\n  data_files:\n  - split: train\n    path: rus/train.parquet\n---\n"
    api = HfApi()
    api.create_repo(f"{TEST_USER}/texts", repo_type="dataset")
    api.create_commit(f"{TEST_USER}/texts", [CommitOperationAdd("README.md", card.encode()),
                                             CommitOperationAdd("rus/train.parquet", buffer.getvalue())],
                      commit_message="text", repo_type="dataset")
    reg = tmp_path / "reg"
    result = run("compute", registry_dir.parent / "model", "ru", "--corpus", f"hf:{TEST_USER}/texts:{{iso639_3}}",
                 "--tokens", "3k", "--seq-len", 64, "--name", "planted", "--registry", reg, "-q")
    assert result.exit_code == 0, result.output
    prov = json.loads(pq.read_schema(reg / "planted" / "counts" / "ru.parquet").metadata[b"neuronreg"])
    assert prov["corpus"] == {"kind": "hub", "dataset": f"{TEST_USER}/texts", "config": "rus", "split": "train",
                              "text_field": "content"}
    assert pq.read_table(reg / "planted" / "counts" / "ru.parquet")["count"].to_pylist() == \
        pq.read_table(registry_dir / "planted" / "counts" / "ru.parquet")["count"].to_pylist()
