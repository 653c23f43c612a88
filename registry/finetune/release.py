"""Publishing a finetune run to a Hub model repo: the delta (or the PEFT adapter), its JSON and a model
card (and, with ``merged``, the merged full model at the repo root) in ONE commit.

A ``lora`` / ``ia3`` run is published as a standard PEFT adapter repo (``adapter_config.json`` naming
the base's Hub id, ``adapter_model.safetensors``; card metadata ``library_name: peft``,
``base_model_relation: adapter``), so ``peft.PeftModel.from_pretrained(base, repo)`` loads it. With
``merged`` the merged model takes the repo root (transformers would otherwise load the adapter) and
the adapter moves to ``adapter/``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError, HubError, NeuronregError
from ..hubcalls import check_new_tag, check_repo_id, hub_errors, repo_for_commit
from ..store.cards import front_matter, render
from .config import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_DIR,
    ADAPTER_WEIGHTS_FILE,
    CONFIG_FILE,
    DELTA_FILE,
    FULL_MODEL_DIR,
    MERGE_DTYPES,
    MERGED_DIR,
    MergeInfo,
    RunConfig,
    read_run_config,
)

log = logging.getLogger("neuronreg")
REPO_TYPE = "model"


@dataclass
class ReleaseResult:
    repo_id: str
    commit: str
    url: str | None
    files: list[str]
    merge: MergeInfo | None = None  # what merging (or a dense run's save) lost to rounding
    pr_url: str | None = None  # with create_pr: the pull request opened


def base_hub_id(config: RunConfig) -> str | None:
    """The base model's Hub id, or None for a local base (whose path is never published)."""
    base = config.base_model
    return None if config.base_path or (base.revision or "").startswith("local-") else base.id


def evaluation_table(folder: Path, repo_id: str) -> tuple[list[dict], list[dict]]:
    """The run's scores next to its base model's (what ``evaluate`` saved in the run folder), as card
    rows, and as ``model-index`` metadata; both empty when the run was not evaluated."""
    from ..evaluation.report import card_rows, model_index

    try:
        run_row, base_row = card_rows(folder)
        index = model_index(folder, name=repo_id.split("/")[-1])
    except NeuronregError as exc:  # a card without scores is still a card
        log.warning("The card gets no scores: %s", exc.message)
        return [], []
    rows = []
    for metric in sorted(set(run_row.metrics) | set(base_row.metrics)):
        base, tuned = base_row.metrics.get(metric), run_row.metrics.get(metric)
        change = tuned - base if base is not None and tuned is not None else None
        rows.append({"metric": metric, "base": "-" if base is None else f"{base:.4g}",
                     "tuned": "-" if tuned is None else f"{tuned:.4g}",
                     "change": "-" if change is None else f"{change:+.4g}"})
    return rows, index


def delta_card(config: RunConfig, repo_id: str, merged: bool, folder: Path | None = None) -> str:
    base, training = config.base_model, config.training
    curve = config.validation_curve or [{}]
    source = config.mask.source if config.mask else {}
    adapter = config.adapter
    subset_text = {
        "lape": "the gate and up rows and down columns of its LAPE neurons, nothing else",
        "random": "a random neuron subset with the LAPE mask's count per layer (a control)",
        "ffn": "every MLP weight (a baseline)", "full": "every weight (a baseline)",
        "lora": "a LoRA adapter (a baseline)",
        "ia3": "an IA3 adapter (a baseline)"}[config.subset]
    hub_id = base_hub_id(config)
    kind = "dense" if config.dense else "adapter" if config.is_adapter else "delta"
    library = "peft" if kind == "adapter" and not merged else "transformers" if merged else None
    # The Hub's words for how this repo derives from its base model.
    relation = "finetune" if kind == "dense" else "merge" if merged else "adapter" if kind == "adapter" else None
    metadata = {**({"base_model": hub_id} if hub_id else {}),
                **({"base_model_relation": relation} if hub_id and relation else {}),
                "language": [config.language.code], **({"library_name": library} if library else {}),
                "tags": ["neuronreg", "lape", "language-specific-neurons", "sparse-fine-tuning",
                         *([config.subset, "peft"] if kind == "adapter" else [])]}
    scores, index = evaluation_table(folder, repo_id) if folder is not None else ([], [])
    if index:
        metadata["model-index"] = index
    adapter_text = ""
    if adapter is not None:
        adapter_text = ", ".join(adapter.target_modules) + (
            f"; r {adapter.r}, alpha {adapter.alpha:g}, dropout {adapter.dropout:g}" if adapter.method == "lora"
            else f"; feed-forward {', '.join(adapter.feedforward_modules or [])}")
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
        best_step=config.best_step, tool_version=config.tool_version, kind=kind, adapter_text=adapter_text,
        master_dtype=training.master_dtype or "",
        adapter_subfolder=ADAPTER_DIR if kind == "adapter" and merged else "",
        merge_text=config.merge.describe() if config.merge and (merged or config.dense) else "", scores=scores)


def release(folder: str | Path, repo_id: str, *, merged: bool = False, private: bool = False,
            token: str | None = None, message: str | None = None, merge_dtype: str | None = None,
            revision: str | None = None, tag: str | None = None, create_pr: bool = False) -> ReleaseResult:
    """Upload a finished run. A dense baseline (``ffn``/``full``) uploads its full weights instead of a delta.

    ``merged``: the run's ``merged/`` folder when it was merged in ``merge_dtype`` (None: whatever dtype
    it was merged in), else a merge made now, in ``merge_dtype`` (None: the model's dtype); what the
    merge lost to rounding is in the result, the published config and the card. ``revision``: the
    branch to commit to (created from main if missing); ``create_pr``: open a pull request (against
    ``revision``) instead; ``tag``: tag the commit (a tag that exists already is refused before anything
    is committed). A repo created for the release is deleted again if the release fails."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)  # before a merge that may take minutes
    folder = Path(folder)
    config = read_run_config(folder)
    if config.best_step is None or config.best_val_loss is None or not math.isfinite(config.best_val_loss):
        raise FinetuneError(f"{folder} has no finite best validation step; there is nothing worth releasing.",
                            fix="diverged")
    if merge_dtype is not None:
        if merge_dtype not in MERGE_DTYPES:
            raise FinetuneError(f"Unknown merge_dtype {merge_dtype!r}; use one of {', '.join(MERGE_DTYPES)}.")
        saved = config.merge.dtype if config.merge else config.training.dtype
        if config.dense and merge_dtype != saved:
            raise FinetuneError(f"{folder} is a {config.subset} run whose weights were saved in {saved}; they "
                                f"cannot be released in {merge_dtype}. Release them as saved, or train again with "
                                f"{merge_dtype} as the merge dtype.")
        if not merged and not config.dense:
            raise FinetuneError("merge_dtype applies to a merged release only.", fix="merge_dtype",
                                advice="Pass merged=True, or leave merge_dtype out.")
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = None
        if config.dense:
            full = folder / FULL_MODEL_DIR
        elif merged:
            full = folder / MERGED_DIR
            if not full.is_dir() or config.merge is None or merge_dtype not in (None, config.merge.dtype):
                from .loading import merge_run
                from .training import save_pretrained

                base, config.merge = merge_run(folder, merge_dtype=merge_dtype, device="cpu", tokenizer=True)
                full = tmp / "merged"
                save_pretrained(base.model, base.tokenizer, full)
        # The published config names the base model and its fingerprint, never a local path.
        public = tmp / CONFIG_FILE
        public.write_text(json.dumps(config.public(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        files[CONFIG_FILE] = public
        if config.is_adapter:
            from .adapters import adapter_folder, public_adapter_config

            where = adapter_folder(folder)
            prefix = f"{ADAPTER_DIR}/" if merged else ""
            adapter_config = tmp / ADAPTER_CONFIG_FILE
            adapter_config.write_text(public_adapter_config(where, base_hub_id(config), config.base_model.revision),
                                      encoding="utf-8")
            files[prefix + ADAPTER_CONFIG_FILE] = adapter_config
            files[prefix + ADAPTER_WEIGHTS_FILE] = where / ADAPTER_WEIGHTS_FILE
        elif not config.dense:
            if not (folder / DELTA_FILE).is_file():
                raise FinetuneError(f"{folder} has no {DELTA_FILE}; the run did not finish.", fix="run_folder")
            files[DELTA_FILE] = folder / DELTA_FILE
        if full is not None:
            if not full.is_dir():
                raise FinetuneError(f"{folder} has no {full.name}/ folder; the run did not finish.", fix="run_folder")
            for path in sorted(full.iterdir()):
                if path.is_file() and not path.is_symlink() and path.name not in ("README.md", CONFIG_FILE):
                    files[path.name] = path
        card = tmp / "README.md"
        card.write_text(delta_card(config, repo_id, merged or config.dense, folder), encoding="utf-8")
        files["README.md"] = card
        api = HfApi(token=token)
        with repo_for_commit(api, repo_id, REPO_TYPE, private=private, what="this release"):
            if tag in check_new_tag(api, repo_id, REPO_TYPE, tag):
                raise HubError(f"{repo_id} already has the tag {tag!r}; nothing was released.", fix="tag",
                               advice="Choose another tag.")
            with hub_errors(repo_id):
                if revision and revision != "main" and not create_pr:
                    api.create_branch(repo_id, repo_type=REPO_TYPE, branch=revision, exist_ok=True)
                commit = api.create_commit(
                    repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                              for name, path in sorted(files.items())],
                    repo_type=REPO_TYPE, revision=revision, create_pr=create_pr,
                    commit_message=message or f"Release {config.language.code} {config.subset} fine-tune "
                                              f"of {config.base_model.name} (neuronreg)")
                if tag:
                    api.create_tag(repo_id, tag=tag, revision=commit.oid, repo_type=REPO_TYPE, exist_ok=False)
    return ReleaseResult(repo_id, commit.oid, commit.commit_url, sorted(files),
                         config.merge if merged or config.dense else None, commit.pr_url)
