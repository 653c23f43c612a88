"""Publishing a finetune run to a Hub model repo: the delta, its JSON and a model card (and, with
``merged``, the merged full model at the repo root) in ONE commit."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .cards import render
from .errors import FinetuneError
from .hub import hub_errors
from .sparse import CONFIG_FILE, DELTA_FILE, FULL_MODEL_DIR, MERGED_DIR, read_run_config

REPO_TYPE = "model"


@dataclass
class ReleaseResult:
    repo_id: str
    commit: str
    url: str | None
    files: list[str]


def delta_card(config: dict, repo_id: str, merged: bool) -> str:
    base, training = config["base_model"], config["training"]
    neurons = config.get("neurons") or {}
    curve = config.get("validation_curve") or [{}]
    mask = config.get("mask") or {}
    source = mask.get("source") or {}
    subset_text = {
        "lape": "the gate and up rows and down columns of its LAPE neurons, nothing else",
        "random": "a random neuron subset with the LAPE mask's count per layer (a control)",
        "ffn": "every MLP weight (a baseline)", "full": "every weight (a baseline)"}[config["subset"]]
    hub_id = base["id"] if not base.get("path") else None
    return render(
        "delta_card.md.j2", repo_id=repo_id, base_hub_id=hub_id, base_name=base["name"], base_id=base["id"],
        base_revision=base["revision"], language=config["language"], merged=merged, subset=config["subset"],
        subset_text=subset_text, neurons=neurons.get("total"),
        per_layer=" ".join(map(str, neurons.get("per_layer", []))),
        trainable=f"{config['trainable_parameters']:,}", share=f"{100 * config['trainable_share']:.3f}%",
        mask_source=source.get("repo") or source.get("registry") or source.get("file") or "-",
        steps=training["steps"], batch=training["batch_size"] * training["grad_accum"], seq_len=training["seq_len"],
        lr=training["lr"], weight_decay=training["weight_decay"], clip=training["clip"], schedule=training["schedule"],
        seed=training["seed"], dtype=training["dtype"], first_loss=f"{curve[0].get('val_loss', float('nan')):.4f}",
        best_loss="-" if config.get("best_val_loss") is None else f"{config['best_val_loss']:.4f}",
        best_step=config.get("best_step"), tool_version=config.get("tool_version"))


def release(folder: str | Path, repo_id: str, *, merged: bool = False, private: bool = False,
            token: str | None = None, message: str | None = None) -> ReleaseResult:
    """Upload a finished run. A dense baseline (``ffn``/``full``) uploads its full weights instead of a delta."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    config = read_run_config(folder)
    dense = config["subset"] in ("ffn", "full")
    files: dict[str, Path] = {CONFIG_FILE: folder / CONFIG_FILE}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not dense:
            if not (folder / DELTA_FILE).is_file():
                raise FinetuneError(f"{folder} has no {DELTA_FILE}; run finetune to the end first.")
            files[DELTA_FILE] = folder / DELTA_FILE
        full = None
        if dense:
            full = folder / FULL_MODEL_DIR
        elif merged:
            full = folder / MERGED_DIR
            if not full.is_dir():
                from .sparse import base_source, load_sparse_model

                model = load_sparse_model(folder, merge=True, device="cpu")
                full = tmp / "merged"
                model.save_pretrained(full, safe_serialization=True)
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(base_source(config)[0]).save_pretrained(full)
        if full is not None:
            for path in sorted(full.iterdir()):
                if path.is_file() and path.name != "README.md":
                    files[path.name] = path
        card = tmp / "README.md"
        card.write_text(delta_card(config, repo_id, merged or dense), encoding="utf-8")
        files["README.md"] = card
        api = HfApi(token=token)
        with hub_errors(repo_id):
            api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
            commit = api.create_commit(
                repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                          for name, path in sorted(files.items())],
                repo_type=REPO_TYPE,
                commit_message=message or f"Release {config['language']['code']} {config['subset']} fine-tune "
                                          f"of {config['base_model']['name']} (neuronreg)")
    return ReleaseResult(repo_id, commit.oid, commit.commit_url, sorted(files))


def download_run(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """The run files of a released repo (delta and JSON only), through the Hub cache."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id):
        path = snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, token=token,
                                 allow_patterns=[CONFIG_FILE, DELTA_FILE])
    if json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))["subset"] in ("ffn", "full"):
        path = snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, token=token)
    return Path(path)

