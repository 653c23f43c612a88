"""Publishing a finetune run to a Hub model repo: the delta, its JSON and a model card (and, with
``merged``, the merged full model at the repo root) in ONE commit."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError
from ..hubcalls import hub_errors
from ..store.cards import front_matter, render
from .config import CONFIG_FILE, DELTA_FILE, FULL_MODEL_DIR, MERGED_DIR, RunConfig, read_run_config

REPO_TYPE = "model"


@dataclass
class ReleaseResult:
    repo_id: str
    commit: str
    url: str | None
    files: list[str]


def delta_card(config: RunConfig, repo_id: str, merged: bool) -> str:
    base, training = config.base_model, config.training
    curve = config.validation_curve or [{}]
    source = config.mask.source if config.mask else {}
    subset_text = {
        "lape": "the gate and up rows and down columns of its LAPE neurons, nothing else",
        "random": "a random neuron subset with the LAPE mask's count per layer (a control)",
        "ffn": "every MLP weight (a baseline)", "full": "every weight (a baseline)"}[config.subset]
    hub_id = None if config.base_path or (base.revision or "").startswith("local-") else base.id
    metadata = {**({"base_model": hub_id} if hub_id else {}), "language": [config.language.code],
                **({"library_name": "transformers"} if merged else {}),
                "tags": ["neuronreg", "lape", "language-specific-neurons", "sparse-fine-tuning"]}
    # Only a mask's registry NAME or repo is published, never a local path.
    mask_source = source.get("repo") or (Path(source["registry"]).name if source.get("registry") else None) \
        or source.get("file") or "-"
    return render(
        "delta_card.md.j2", front_matter=front_matter(metadata), repo_id=repo_id, base_name=base.name,
        base_id=base.id, base_revision=base.revision, language=config.language, merged=merged, subset=config.subset,
        subset_text=subset_text, neurons=config.neurons.total if config.neurons else None,
        per_layer=" ".join(map(str, config.neurons.per_layer)) if config.neurons else "",
        trainable=f"{config.trainable_parameters:,}", share=f"{100 * config.trainable_share:.3f}%",
        mask_source=mask_source, steps=training.steps, batch=training.batch_size * training.grad_accum,
        seq_len=training.seq_len, lr=training.lr, weight_decay=training.weight_decay, clip=training.clip,
        schedule=training.schedule, seed=training.seed, dtype=training.dtype,
        first_loss=f"{curve[0].get('val_loss', float('nan')):.4f}",
        best_loss="-" if config.best_val_loss is None else f"{config.best_val_loss:.4f}",
        best_step=config.best_step, tool_version=config.tool_version)


def release(folder: str | Path, repo_id: str, *, merged: bool = False, private: bool = False,
            token: str | None = None, message: str | None = None) -> ReleaseResult:
    """Upload a finished run. A dense baseline (``ffn``/``full``) uploads its full weights instead of a delta."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    config = read_run_config(folder)
    if config.best_step is None or config.best_val_loss is None or not math.isfinite(config.best_val_loss):
        raise FinetuneError(f"{folder} has no finite best validation step; there is nothing worth releasing.",
                            fix="diverged")
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # The published config names the base model and its fingerprint, never a local path.
        public = tmp / CONFIG_FILE
        public.write_text(json.dumps(config.public(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        files[CONFIG_FILE] = public
        if not config.dense:
            if not (folder / DELTA_FILE).is_file():
                raise FinetuneError(f"{folder} has no {DELTA_FILE}; the run did not finish.", fix="run_folder")
            files[DELTA_FILE] = folder / DELTA_FILE
        full = None
        if config.dense:
            full = folder / FULL_MODEL_DIR
        elif merged:
            full = folder / MERGED_DIR
            if not full.is_dir():
                from .loading import apply_run_delta, load_base_model
                from .training import save_pretrained

                base = load_base_model(folder, device="cpu", tokenizer=True)
                apply_run_delta(base.model, folder, merge=True)
                full = tmp / "merged"
                save_pretrained(base.model, base.tokenizer, full)
        if full is not None:
            if not full.is_dir():
                raise FinetuneError(f"{folder} has no {full.name}/ folder; the run did not finish.", fix="run_folder")
            for path in sorted(full.iterdir()):
                if path.is_file() and not path.is_symlink() and path.name not in ("README.md", CONFIG_FILE):
                    files[path.name] = path
        card = tmp / "README.md"
        card.write_text(delta_card(config, repo_id, merged or config.dense), encoding="utf-8")
        files["README.md"] = card
        api = HfApi(token=token)
        with hub_errors(repo_id):
            api.create_repo(repo_id, repo_type=REPO_TYPE, private=private, exist_ok=True)
            commit = api.create_commit(
                repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                          for name, path in sorted(files.items())],
                repo_type=REPO_TYPE,
                commit_message=message or f"Release {config.language.code} {config.subset} fine-tune "
                                          f"of {config.base_model.name} (neuronreg)")
    return ReleaseResult(repo_id, commit.oid, commit.commit_url, sorted(files))
