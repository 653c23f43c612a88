"""Publishing a finetune run to a Hub model repo: the delta (or the PEFT adapter), its JSON and a model
card (and, with ``merged``, the merged full model at the repo root) in ONE commit.

A ``lora`` / ``ia3`` run is published as a standard PEFT adapter repo (``adapter_config.json`` naming
the base's Hub id, ``adapter_model.safetensors``; card metadata ``library_name: peft``,
``base_model_relation: adapter``), so ``peft.PeftModel.from_pretrained(base, repo)`` loads it. With
``merged`` the merged model takes the repo root (transformers would otherwise load the adapter) and
the adapter moves to ``adapter/``.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import FinetuneError, NeuronregError
from ..hubcalls import check_ref_name, check_repo_id, commit_to, same_content
from ..options import LoadOptions
from ..runs import (
    ADAPTER_DIR,
    MERGED_DIR,
    RUN_CONFIG_FILE,
    STEPS_FILE,
    MergeInfo,
    RunConfig,
)
from ..store.cards import front_matter, render
from .config import MERGE_DTYPES
from .method import get_method, read_run

log = logging.getLogger("neuronreg")
REPO_TYPE = "model"


@dataclass
class ReleaseResult:
    repo_id: str
    commit: str
    url: str | None
    files: list[str]  # every file of the release
    merge: MergeInfo | None = None  # what merging (or a dense run's save) lost to rounding
    pr_url: str | None = None  # with create_pr: the pull request opened
    uploaded: list[str] | None = None  # the files sent (those the repo did not hold already)


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
    method = get_method(config.subset)
    text = method.card(config, merged)
    hub_id = base_hub_id(config)
    metadata = {**({"base_model": hub_id} if hub_id else {}),
                **({"base_model_relation": text.relation} if hub_id and text.relation else {}),
                "language": [config.language.code], **({"library_name": text.library} if text.library else {}),
                "tags": ["neuronreg", "lape", "language-specific-neurons", "sparse-fine-tuning",
                         *([config.subset, "peft"] if text.kind == "adapter" else [])]}
    scores, index = evaluation_table(folder, repo_id) if folder is not None else ([], [])
    if index:
        metadata["model-index"] = index
    # What the mask IS (its selection, repo, file name, seed), never where it lay.
    mask_source = config.mask.source.describe() if config.mask and config.mask.source else "-"
    return render(
        "delta_card.md.j2", front_matter=front_matter(metadata), repo_id=repo_id, base_name=base.name,
        base_id=base.id, base_revision=base.revision, language=config.language, merged=merged or text.kind == "dense",
        subset=config.subset, subset_text=text.trains, neurons=config.neurons.total if config.neurons else None,
        per_layer=" ".join(map(str, config.neurons.per_layer)) if config.neurons else "",
        trainable=f"{config.trainable_parameters:,}", share=f"{100 * config.trainable_share:.3f}%",
        mask_source=mask_source, steps=training.steps, batch=training.batch_size * training.grad_accum,
        seq_len=training.seq_len, lr=training.lr, weight_decay=training.weight_decay, clip=training.clip,
        schedule=training.schedule, seed=training.seed, dtype=training.dtype,
        first_loss=f"{curve[0].get('val_loss', float('nan')):.4f}",
        best_loss="-" if config.best_val_loss is None else f"{config.best_val_loss:.4f}",
        best_step=config.best_step, tool_version=config.tool_version, kind=text.kind, adapter_text=text.details,
        master_dtype=training.master_dtype or "",
        adapter_subfolder=ADAPTER_DIR if text.kind == "adapter" and merged else "",
        merge_text=config.merge.describe() if config.merge and (merged or text.kind == "dense") else "",
        scores=scores)


def check_release(folder: Path, config: RunConfig) -> None:
    """Everything a release would send, checked as loading the run checks it (before anything is uploaded):
    a finite best validation loss, and the method's files (finite, bounded values; neuron indices in range,
    unique and sorted; shapes that fit the base)."""
    if config.best_step is None or config.best_val_loss is None or not math.isfinite(config.best_val_loss):
        raise FinetuneError(f"{folder} has no finite best validation step; there is nothing worth releasing.",
                            fix="diverged")
    get_method(config.subset).check_run(folder, config)


def release(folder: str | Path, repo_id: str, *, merged: bool = False, private: bool = False,
            token: str | None = None, message: str | None = None, merge_dtype: str | None = None,
            revision: str | None = None, tag: str | None = None, create_pr: bool = False) -> ReleaseResult:
    """Upload a finished run. A dense run (``ffn``/``full``) uploads its full weights instead of a delta.

    ``merged``: the run's ``merged/`` folder when it was merged in ``merge_dtype`` (None: whatever dtype
    it was merged in), else a merge made now, in ``merge_dtype`` (None: the model's dtype); what the
    merge lost to rounding is in the result, the published config and the card. ``revision``: the
    branch to commit to (created from main if missing, and only when something is committed);
    ``create_pr``: open a pull request (against ``revision``) instead; ``tag``: tag the commit (a tag that
    exists already is refused before anything is committed). Everything is checked before anything is
    created: the repo id, branch and tag names, and the run (:func:`check_release`). Only files the repo
    does not hold already are sent; a repo created for the release is deleted again if it fails."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_repo_id(repo_id)  # before a merge that may take minutes
    check_ref_name(revision, "revision")
    check_ref_name(tag, "tag")
    folder = Path(folder)
    config, method = read_run(folder)
    check_release(folder, config)
    dense = method.kind == "dense"
    if merge_dtype is not None:
        if merge_dtype not in MERGE_DTYPES:
            raise FinetuneError(f"Unknown merge_dtype {merge_dtype!r}; use one of {', '.join(MERGE_DTYPES)}.")
        saved = config.merge.dtype if config.merge else config.training.dtype
        if dense and merge_dtype != saved:
            raise FinetuneError(f"{folder} is a {config.subset} run whose weights were saved in {saved}; they "
                                f"cannot be released in {merge_dtype}. Release them as saved, or train again with "
                                f"{merge_dtype} as the merge dtype.")
        if not merged and not dense:
            raise FinetuneError("merge_dtype applies to a merged release only.", fix="merge_dtype",
                                advice="Pass merged=True, or leave merge_dtype out.")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = method.release_files(folder, config, tmp, merged)
        if merged and not dense:
            files.update(_merged_files(folder, config, tmp, merge_dtype))
        # The published config names the base model and its fingerprint, never a local path.
        public = tmp / RUN_CONFIG_FILE
        public.write_text(config.to_json(public=True), encoding="utf-8")
        files[RUN_CONFIG_FILE] = public
        if (folder / STEPS_FILE).is_file():
            files[STEPS_FILE] = folder / STEPS_FILE
        card = tmp / "README.md"
        card.write_text(delta_card(config, repo_id, merged or dense, folder), encoding="utf-8")
        files["README.md"] = card
        with commit_to(HfApi(token=token), repo_id, REPO_TYPE, revision=revision, create_pr=create_pr, tag=tag,
                       private=private, what="this release") as target:
            send = {name: path for name, path in sorted(files.items())
                    if not same_content(target.files.get(name), path)}
            target.commit([CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                           for name, path in send.items()],
                          message or f"Release {config.language.code} {config.subset} fine-tune of "
                                     f"{config.base_model.name} (neuronreg)")
    return ReleaseResult(repo_id, target.result, target.url, sorted(files),
                         config.merge if merged or dense else None, target.pr_url, sorted(send))


def _merged_files(folder: Path, config: RunConfig, tmp: Path, merge_dtype: str | None) -> dict[str, Path]:
    """The merged model's files: the run's ``merged/`` when it was merged in the dtype asked for, else a
    merge made now (``config.merge`` then says what it lost)."""
    full = folder / MERGED_DIR
    if not full.is_dir() or config.merge is None or merge_dtype not in (None, config.merge.dtype):
        from .loading import merge_run
        from .merging import save_pretrained

        base, config.merge = merge_run(folder, merge_dtype=merge_dtype, load=LoadOptions(device="cpu"),
                                       tokenizer=True)
        full = tmp / "merged"
        save_pretrained(base.model, base.tokenizer, full)
    return {path.name: path for path in sorted(full.iterdir())
            if path.is_file() and not path.is_symlink() and path.name not in ("README.md", RUN_CONFIG_FILE)}
