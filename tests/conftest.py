"""Fixtures shared by the test modules: isolation from the user's folders and the network, the
loopback Hub, the ../shared folder, and tiny models with their texts."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from support.hubserver import TEST_TOKEN, TEST_USER, HubServer, point_clients_at  # noqa: E402
from support.tiny import PLANTED, planted_model, save_model, write_corpus  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the user's caches, registry, token or the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("NEURONREG_REGISTRY", str(tmp_path / "registry"))
    monkeypatch.delenv("NEURONREG_MANIFEST", raising=False)
    monkeypatch.delenv("NEURONREG_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    yield


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent (a user's clone): the NTREX corpus and reference masks are not here")
    return SHARED


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running loopback HubServer (token TEST_TOKEN -> user TEST_USER), the real clients pointed at it
    and signed in via HF_TOKEN. For anonymous calls pass `token=False` or setenv HF_TOKEN to ""."""
    from huggingface_hub import HfFileSystem
    from huggingface_hub.utils import close_session

    server = HubServer(tokens={TEST_TOKEN: TEST_USER})
    url = server.start()
    point_clients_at(url, monkeypatch, tmp_path, token=TEST_TOKEN)
    try:
        yield server
    finally:
        # Drop the client's pooled keep-alive connections and cached filesystems before the server goes.
        close_session()
        HfFileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A saved planted Llama (model/) and texts whose files are named by other codes (eng, Russian, el)."""
    root = tmp_path_factory.mktemp("planted")
    save_model(planted_model(PLANTED), root / "model")
    write_corpus(root / "texts", {"en": "eng", "ru": "Russian", "el": "el"})
    return root
