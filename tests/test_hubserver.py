"""The real huggingface_hub and datasets clients against tests/hubserver.py, over HTTP on 127.0.0.1.

These prove the test Hub is faithful enough for the registry's own publish/fetch tests: every call
below is the unmodified client code, only the endpoint differs."""

from __future__ import annotations

import io
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from support.hubserver import TEST_USER, HubServer, set_offline

REPO = f"{TEST_USER}/neurons"
README = """---
license: apache-2.0
tags: [lape, neurons]
configs:
- config_name: cfg
  data_files:
  - split: sw
    path: cfg/sw.parquet
  - split: en
    path: cfg/en.parquet
---
# Neurons
"""


def parquet(rows: dict) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    return buf.getvalue()


SW = {"layer": [0, 1, 1], "neuron": [5, 7, 9]}
EN = {"layer": [2], "neuron": [3]}


def publish(api: HfApi, repo_id: str = REPO, **kwargs):
    """One atomic commit: the README (a regular, inline file) and two Parquet files (LFS uploads)."""
    return api.create_commit(
        repo_id,
        repo_type="dataset",
        commit_message="Publish neurons",
        operations=[
            CommitOperationAdd("README.md", README.encode()),
            CommitOperationAdd("cfg/sw.parquet", parquet(SW)),
            CommitOperationAdd("cfg/en.parquet", parquet(EN)),
        ],
        **kwargs,
    )


@pytest.fixture
def api(hub) -> HfApi:
    api = HfApi()
    api.create_repo(REPO, repo_type="dataset")
    return api


def test_create_repo_whoami_and_exist_ok(hub):
    api = HfApi()
    assert api.whoami()["name"] == TEST_USER
    url = api.create_repo(REPO, repo_type="dataset")
    assert url == f"{hub.url}/datasets/{REPO}" and url.repo_id == REPO
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO, repo_type="dataset")
    assert err.value.response.status_code == 409
    # exist_ok reads the url from the 409 body: same repo, no second repo, no new commit.
    assert api.create_repo(REPO, repo_type="dataset", exist_ok=True) == url
    info = api.dataset_info(REPO)
    # Like the real Hub, a new repo holds one "initial commit" with a .gitattributes.
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert info.private is False and info.sha == hub.commits("dataset", REPO)[0]
    assert len(hub.commits("dataset", REPO)) == 1


def test_commit_inline_and_lfs_files_in_one_commit(api, hub):
    hub.clear_requests()
    info = publish(api)
    assert hub.commits("dataset", REPO)[0] == info.oid and len(hub.commits("dataset", REPO)) == 2
    assert hub.file_bytes("dataset", REPO, "cfg/sw.parquet") == parquet(SW)
    assert hub.file_bytes("dataset", REPO, "README.md") == README.encode()
    paths = [p for _, p in hub.requests]
    # Both Parquet files went through LFS (batch, PUT, verify); the README went inline in the commit.
    assert sum(p.startswith("/lfs-upload/") for p in paths) == 2
    assert sum(p.startswith("/lfs-verify/") for p in paths) == 2
    assert [m for m, p in hub.requests if "/commit/" in p] == ["POST"]
    siblings = {s.rfilename: s for s in api.dataset_info(REPO, files_metadata=True).siblings}
    assert siblings["cfg/sw.parquet"].lfs.sha256 and siblings["README.md"].lfs is None
    assert siblings["cfg/en.parquet"].size == len(parquet(EN))
    # Card data is parsed from the README front matter, tags included.
    card = api.dataset_info(REPO).card_data
    assert card.license == "apache-2.0" and api.dataset_info(REPO).tags == ["lape", "neurons"]
    tree = {e.path: e for e in api.list_repo_tree(REPO, repo_type="dataset")}
    assert sorted(tree) == [".gitattributes", "README.md", "cfg"] and tree["cfg"].tree_id
    assert sorted(api.list_repo_files(REPO, repo_type="dataset")) == [
        ".gitattributes", "README.md", "cfg/en.parquet", "cfg/sw.parquet"]
    infos = api.get_paths_info(REPO, ["README.md", "cfg", "missing"], repo_type="dataset")
    assert [i.path for i in infos] == ["README.md", "cfg"]


def test_identical_commit_creates_no_commit(api, hub):
    first = publish(api)
    hub.clear_requests()
    second = publish(api)
    # preupload returns the stored oids; the client drops unchanged files and, with nothing left,
    # skips the commit entirely and answers with the current head (fetched through repo info).
    assert second.oid == first.oid
    assert len(hub.commits("dataset", REPO)) == 2
    # Quirk: the LFS batch call still happens (uploads run before the no-op filter), but the server
    # answers "already stored" (no actions), so no bytes are sent and no commit is posted.
    assert [p.rsplit("/", 1)[-1] for _, p in hub.requests] == ["validate-yaml", "main", "batch", "main"]
    assert [m for m, p in hub.requests if "/preupload/" in p or "/revision/" in p] == ["POST", "GET"]
    # One changed file: only that file is sent, in a new commit.
    hub.clear_requests()
    api.create_commit(REPO, repo_type="dataset", commit_message="en only", operations=[
        CommitOperationAdd("README.md", README.encode()), CommitOperationAdd("cfg/en.parquet", parquet(SW))])
    assert len(hub.commits("dataset", REPO)) == 3
    assert sum(p.startswith("/lfs-upload/") for _, p in hub.requests) == 0  # same bytes as sw: already stored
    assert hub.file_bytes("dataset", REPO, "cfg/en.parquet") == parquet(SW)


def test_stale_parent_commit_is_rejected(api, hub):
    parent = hub.commits("dataset", REPO)[0]
    publish(api)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_commit(REPO, repo_type="dataset", commit_message="late", parent_commit=parent,
                          operations=[CommitOperationAdd("late.txt", b"late")])
    assert err.value.response.status_code == 412
    assert "late.txt" not in hub.files("dataset", REPO)
    # With the current head as parent the same commit goes through.
    head = hub.commits("dataset", REPO)[0]
    api.create_commit(REPO, repo_type="dataset", commit_message="on time", parent_commit=head,
                      operations=[CommitOperationAdd("late.txt", b"late")])
    assert hub.file_bytes("dataset", REPO, "late.txt") == b"late"


def test_create_pr_leaves_main_untouched(api, hub):
    main_before = hub.commits("dataset", REPO)
    info = publish(api, create_pr=True)
    assert info.pr_url.endswith(f"/datasets/{REPO}/discussions/1")
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert hub.commits("dataset", REPO) == main_before
    assert hub.commits("dataset", REPO, "refs/pr/1")[1:] == main_before
    refs = api.list_repo_refs(REPO, repo_type="dataset", include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", info.oid)]
    path = hf_hub_download(REPO, "cfg/sw.parquet", repo_type="dataset", revision="refs/pr/1")
    assert pq.read_table(path).to_pydict() == SW
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "cfg/sw.parquet", repo_type="dataset")  # not on main


def test_tag_branch_commits_and_download_at_tag(api, hub):
    v1 = publish(api).oid
    api.create_tag(REPO, tag="v1", repo_type="dataset", tag_message="first")
    api.create_branch(REPO, branch="release/v2", repo_type="dataset")  # a slash: percent-encoded on the wire
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(REPO, tag="v1", repo_type="dataset")
    assert err.value.response.status_code == 409
    api.create_tag(REPO, tag="v1", repo_type="dataset", exist_ok=True)
    api.create_commit(REPO, repo_type="dataset", commit_message="v2 data", revision="release/v2",
                      operations=[CommitOperationDelete("cfg/"), CommitOperationAdd("v2/sw.parquet", parquet(EN))])
    api.create_commit(REPO, repo_type="dataset", commit_message="drop en",
                      operations=[CommitOperationDelete("cfg/en.parquet")])
    refs = api.list_repo_refs(REPO, repo_type="dataset")
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": v1}
    assert {b.name for b in refs.branches} == {"main", "release/v2"} and refs.converts == []
    # The tag still serves the first snapshot, the branch its own, main lost one file.
    assert pq.read_table(hf_hub_download(REPO, "cfg/en.parquet", repo_type="dataset", revision="v1")).to_pydict() == EN
    assert hub.files("dataset", REPO, "release/v2") == [".gitattributes", "README.md", "v2/sw.parquet"]
    assert "cfg/en.parquet" not in hub.files("dataset", REPO)
    commits = api.list_repo_commits(REPO, repo_type="dataset", revision="v1")
    assert [c.title for c in commits] == ["Publish neurons", "initial commit"] and commits[0].commit_id == v1
    assert commits[0].authors == [TEST_USER]
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "README.md", repo_type="dataset", revision="no-such-branch")


def test_hf_hub_download_fetches_only_that_file_then_serves_offline_from_cache(api, hub, monkeypatch):
    commit = publish(api).oid
    hub.clear_requests()
    path = hf_hub_download(REPO, "cfg/sw.parquet", repo_type="dataset")
    assert pq.read_table(path).to_pydict() == SW and commit in path
    assert hub.requests == [("HEAD", f"/datasets/{REPO}/resolve/main/cfg/sw.parquet"),
                            ("GET", f"/datasets/{REPO}/resolve/main/cfg/sw.parquet")]
    hub.clear_requests()
    set_offline(monkeypatch)
    assert hf_hub_download(REPO, "cfg/sw.parquet", repo_type="dataset") == path
    assert hub.requests == []


def test_snapshot_download(api, hub, tmp_path):
    publish(api)
    folder = snapshot_download(REPO, repo_type="dataset")
    assert pq.read_table(f"{folder}/cfg/en.parquet").to_pydict() == EN
    assert Path(folder, "README.md").read_text() == README
    partial = snapshot_download(REPO, repo_type="dataset", allow_patterns=["cfg/sw.*"],
                                local_dir=tmp_path / "local")
    assert pq.read_table(f"{partial}/cfg/sw.parquet").to_pydict() == SW
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [".cache", "cfg"]
    assert [p.name for p in (tmp_path / "local" / "cfg").iterdir()] == ["sw.parquet"]  # only what matched


def test_hffs_ls_glob_and_ranged_open(api, hub):
    publish(api)
    fs = HfFileSystem()
    assert sorted(fs.ls(f"datasets/{REPO}/cfg", detail=False)) == [
        f"datasets/{REPO}/cfg/en.parquet", f"datasets/{REPO}/cfg/sw.parquet"]
    assert fs.glob(f"datasets/{REPO}/**/*.parquet") == [
        f"datasets/{REPO}/cfg/en.parquet", f"datasets/{REPO}/cfg/sw.parquet"]
    data = parquet(SW)
    hub.clear_requests()
    with fs.open(f"datasets/{REPO}/cfg/sw.parquet", "rb", block_size=16) as f:
        f.seek(len(data) - 8)
        assert f.read() == data[-8:]  # a Parquet footer (length + "PAR1"): fsspec fetches it with a Range GET
    assert any(m == "GET" and "/resolve/" in p for m, p in hub.requests)
    assert pq.read_table(fs.open(f"datasets/{REPO}/cfg/sw.parquet")).to_pydict() == SW


def test_range_requests_and_error_codes_on_resolve(api, hub):
    publish(api)
    url = f"{hub.url}/datasets/{REPO}/resolve/main/README.md"
    req = urllib.request.Request(url, headers={"Range": "bytes=4-9"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206 and resp.read() == README.encode()[4:10]
        assert resp.headers["Content-Range"] == f"bytes 4-9/{len(README)}"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=9999-"}))
    assert err.value.code == 416
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url.replace("README.md", "nope"), method="HEAD"))
    assert err.value.code == 404 and err.value.headers["X-Error-Code"] == "EntryNotFound"
    assert err.value.headers["X-Repo-Commit"] == hub.commits("dataset", REPO)[0]


def test_load_dataset_config_and_split(api, hub):
    datasets = pytest.importorskip("datasets")
    publish(api)
    ds = datasets.load_dataset(REPO, "cfg", split="sw")
    assert ds.to_dict() == SW
    assert datasets.load_dataset(REPO, "cfg", split="en").to_dict() == EN


def test_private_repo_needs_the_owners_token(hub, monkeypatch):
    api = HfApi()
    api.create_repo(REPO, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="weights.txt", repo_id=REPO)
    assert api.model_info(REPO).private is True
    # Anonymous: the Hub answers 401 + RepoNotFound (it never confirms that a private repo exists).
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info(REPO, token=False)
    assert err.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "weights.txt", token=False)
    # Signed in as someone else: 404 + RepoNotFound.
    hub.tokens["hf_other_token"] = "bob"
    with pytest.raises(RepositoryNotFoundError) as err:
        api.model_info(REPO, token="hf_other_token")
    assert err.value.response.status_code == 404
    # A token the Hub does not know is an auth error, not a missing repo.
    with pytest.raises(HfHubHTTPError) as err:
        api.model_info(REPO, token="hf_bogus")
    assert err.value.response.status_code == 401 and not isinstance(err.value, RepositoryNotFoundError)
    # Writes need a token at all.
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(f"{TEST_USER}/other", token=False)
    assert err.value.response.status_code == 401
    # The owner's token (HF_TOKEN, set by the fixture) works.
    with open(hf_hub_download(REPO, "weights.txt"), "rb") as f:
        assert f.read() == b"secret"


def test_gated_repo_download(api, hub):
    publish(api)
    hub.set_gated("dataset", REPO, True)
    hub.tokens["hf_other_token"] = "bob"
    for token in (False, "hf_other_token"):
        with pytest.raises(GatedRepoError):
            hf_hub_download(REPO, "README.md", repo_type="dataset", token=token)
    # Metadata stays public, as on the Hub; the owner can download.
    assert HfApi().dataset_info(REPO, token=False).gated == "auto"
    assert Path(hf_hub_download(REPO, "README.md", repo_type="dataset")).read_text() == README


def test_server_errors_are_retried_where_the_client_retries(api, hub):
    publish(api)
    hub.clear_requests()
    hub.fail_next(1, status=503)
    # Tree listings go through http_backoff: one retry (after ~1 s) and the listing succeeds.
    assert "README.md" in api.list_repo_files(REPO, repo_type="dataset")
    assert [m for m, p in hub.requests] == ["GET", "GET"] and all("/tree/" in p for _, p in hub.requests)
    # repo info does not retry: a clean HfHubHTTPError carrying the status.
    hub.fail_next(1, status=500)
    with pytest.raises(HfHubHTTPError) as err:
        api.dataset_info(REPO)
    assert err.value.response.status_code == 500
    assert api.dataset_info(REPO).sha == hub.commits("dataset", REPO)[0]


def test_storage_under_root_and_unique_commit_ids(tmp_path):
    # Two servers (two "runs") never hand out the same commit id for the same content.
    with HubServer(root=tmp_path / "a") as one, HubServer() as two:
        one.create_repo("dataset", REPO)
        two.create_repo("dataset", REPO)
        assert one.commits("dataset", REPO) != two.commits("dataset", REPO)
        assert one.file_bytes("dataset", REPO, ".gitattributes") == two.file_bytes("dataset", REPO, ".gitattributes")
        assert any((tmp_path / "a" / "blobs").iterdir())
