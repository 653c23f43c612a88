"""Loading what a fine-tuning run made: its base model, and the base with the run's delta (or PEFT
adapter) applied, unmerged or merged."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FinetuneError, UnknownModel
from ..hubcalls import hub_errors
from ..resolve import ModelRef
from .config import (
    ADAPTER_DIR,
    ADAPTER_FILES,
    CONFIG_FILE,
    DELTA_FILE,
    FULL_MODEL_DIR,
    MERGE_DTYPES,
    RunConfig,
    read_run_config,
)

log = logging.getLogger("neuronreg")
REPO_TYPE = "model"


def base_ref(config: RunConfig, *, base: str | Path | None = None, allow_other_base: bool = False) -> ModelRef:
    """Where the run's base model is: ``base`` when given, else its recorded local folder while it still
    exists, else the Hub id at the recorded revision. A local base must hold the very weights the run
    trained on (its content fingerprint is checked), unless ``allow_other_base``."""
    from ..models import local_fingerprint, older_fingerprint

    info = config.base_model
    recorded = info.revision or ""
    folder = Path(base) if base is not None and Path(base).is_dir() else None
    if folder is None and base is None and config.base_path and Path(config.base_path).is_dir():
        folder = Path(config.base_path)
    if folder is not None:
        now = local_fingerprint(folder)
        if now != recorded:
            older = older_fingerprint(folder, recorded, "the run trained with")
            message = f"The run names its base model by fingerprint {older}" if older else (
                f"The base model folder {folder.name} holds other weights, config or tokenizer than the run "
                f"trained on (fingerprint {recorded or 'unknown'}, this folder {now}).")
            if not allow_other_base:
                raise FinetuneError(message, fix="other_base", advice="Pass allow_other_base=True to apply it anyway.")
            log.warning("%s Applying the delta anyway, as asked.", message)
        return ModelRef(info.name, str(folder.resolve()), None, True)
    if base is not None:
        return ModelRef(info.name, str(base), None if recorded.startswith("local-") else recorded or None, False)
    if recorded.startswith("local-") or info.id is None:
        raise UnknownModel(f"The base model of this run was a local folder ({info.id}), which is not here.",
                           fix="base", advice="Pass base= the folder of that model.")
    return ModelRef(info.name, info.id, recorded or None, False)


def load_base_model(folder: str | Path, *, dtype: str | None = None, device: str | None = None,
                    token: str | None = None, trust_remote_code: bool = False, allow_other_base: bool = False,
                    tokenizer: bool = False, base: str | Path | None = None):
    """The run's base model, without its delta (a LoadedModel)."""
    from ..models import load_model

    config = read_run_config(folder)
    ref = base_ref(config, base=base, allow_other_base=allow_other_base)
    return load_model(ref, dtype=dtype or config.training.dtype, device=device, token=token,
                      trust_remote_code=trust_remote_code, revision=ref.revision, tokenizer=tokenizer, quiet=True)


def run_folder(folder: str | Path, *, token: str | None = None) -> Path:
    """A local run folder, or a Hub repo made by ``release`` (``org/name``), downloaded."""
    path = Path(folder)
    if path.is_dir():
        return path
    text = str(folder)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return download_run(text, token=token)
    raise FinetuneError(f"{folder} is neither a run folder nor a released Hub repo (org/name).", fix="run_folder")


def load_sparse_model(folder: str | Path, *, merge: bool = False, dtype: str | None = None,
                      device: str | None = None, token: str | None = None, trust_remote_code: bool = False,
                      base: str | Path | None = None, allow_other_base: bool = False,
                      merge_dtype: str | None = None):
    """The base model of a ``neuronreg finetune`` run with the run's delta (or adapter) applied.

    The base comes from the local folder recorded in the run when it still exists (and still holds the
    same weights), else from the Hub id at the recorded revision. Without ``merge`` the deltas stay
    separate (wrappers around the projections, exact in any dtype); a ``lora`` / ``ia3`` run comes back
    as a ``peft.PeftModel`` with its float32 adapter attached. With ``merge=True`` the change is added
    into the weights (stored in ``merge_dtype``, default the model's; see :func:`merge_run` for what the
    rounding loses) and the result is a plain ``transformers`` model (``save_pretrained`` works).
    Runs of the dense baselines (``ffn`` / ``full``) load their saved weights. ``folder`` may also be
    a Hub repo made by ``neuronreg release`` (``org/name``): its delta (or adapter) and JSON are
    downloaded. ``base`` names the base model (a folder or Hub id) where the recorded one is not at
    hand, for example a released run of a local model: its weights are checked against the recorded
    fingerprint.
    """
    from ..models import load_model

    folder = run_folder(folder, token=token)
    config = read_run_config(folder)
    if config.dense:
        weights = folder / FULL_MODEL_DIR if (folder / FULL_MODEL_DIR).is_dir() else folder
        ref = ModelRef(config.base_model.name, str(weights.resolve()), None, True)
        return load_model(ref, dtype=dtype or config.training.dtype, device=device, token=token,
                          trust_remote_code=trust_remote_code, tokenizer=False, quiet=True).model
    if merge:
        return merge_run(folder, merge_dtype=merge_dtype, dtype=dtype, device=device, token=token,
                         trust_remote_code=trust_remote_code, base=base, allow_other_base=allow_other_base)[0].model
    model = load_base_model(folder, dtype=dtype, device=device, token=token, trust_remote_code=trust_remote_code,
                            allow_other_base=allow_other_base, base=base).model
    attached = apply_run_delta(model, folder)
    return attached if config.is_adapter else model


def merge_run(folder: str | Path, *, merge_dtype: str | None = None, dtype: str | None = None,
              device: str | None = None, token: str | None = None, trust_remote_code: bool = False,
              base: str | Path | None = None, allow_other_base: bool = False, tokenizer: bool = False):
    """The run's base model with its delta or adapter merged in, and what merging lost (a ``MergeInfo``).

    Each changed weight is base + change summed in float32 and rounded once into ``merge_dtype``
    (float32, bfloat16 or float16; None: the model's dtype); the whole model is stored in that dtype.
    Returns ``(LoadedModel, MergeInfo)``; a warning is logged when more than 1% of the change's
    elements round away or the relative error passes 1e-3."""
    from ..models import DTYPES
    from .merging import parse_merge_dtype

    if merge_dtype is not None and merge_dtype not in MERGE_DTYPES:
        raise FinetuneError(f"Unknown merge_dtype {merge_dtype!r}; use one of {', '.join(MERGE_DTYPES)}.")
    folder = run_folder(folder, token=token)
    config = read_run_config(folder)
    if config.dense:
        raise FinetuneError(f"{folder} is a {config.subset} run: its trained weights are the model; there is "
                            "nothing to merge.")
    loaded = load_base_model(folder, dtype=dtype, device=device, token=token, trust_remote_code=trust_remote_code,
                             allow_other_base=allow_other_base, tokenizer=tokenizer, base=base)
    info = apply_run_delta(loaded.model, folder, merge=True,
                           merge_dtype=parse_merge_dtype(merge_dtype, DTYPES[loaded.dtype]))
    return loaded, info


def apply_run_delta(model, folder: Path, *, merge: bool = False, merge_dtype=None):
    """Put a run's saved delta (or adapter) on ``model``, frozen. Unmerged: returns the delta wrappers
    (a list of LayerDelta), or for a lora / ia3 run the ``peft.PeftModel`` around ``model`` (whose own
    projections now carry the adapter). ``merge``: added into the weights, stored in ``merge_dtype``
    (a torch dtype; None: the model's), and returns what the rounding lost (a MergeInfo)."""
    config = read_run_config(folder)
    if config.is_adapter:
        from .adapters import load_adapter, merge_adapter

        wrapped = load_adapter(model, Path(folder))
        if not merge:
            return wrapped
        _, info = merge_adapter(wrapped, merge_dtype)
        return info
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .deltas import apply_delta_tensors

    path = Path(folder) / DELTA_FILE
    if not path.is_file():
        raise FinetuneError(f"{folder} has no {DELTA_FILE}; the run did not finish.", fix="run_folder")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FinetuneError(f"{path} is damaged ({type(exc).__name__}).") from exc
    applied = apply_delta_tensors(model, tensors, merge=merge, dtype=merge_dtype)
    if merge and merge_dtype is not None:
        from .merging import cast_model

        cast_model(model, merge_dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return applied


def download_run(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """The run files of a released repo (delta or adapter, and JSON only), through the Hub cache."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id):
        path = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, token=token,
                                      allow_patterns=[CONFIG_FILE, DELTA_FILE, *ADAPTER_FILES,
                                                      *(f"{ADAPTER_DIR}/{name}" for name in ADAPTER_FILES)]))
    if read_run_config(path).dense:
        with hub_errors(repo_id):
            path = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, token=token))
    return path
