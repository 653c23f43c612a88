"""Loading what a fine-tuning run made: the base with the run applied, unmerged or merged. What differs
between methods (a delta, an adapter, a dense model) is the method's to do (:mod:`.method`); its base
model is found by :mod:`.base`; here is what every run shares, and run folders on the Hub."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FinetuneError
from ..hubcalls import hub_errors
from ..options import LoadOptions, load_options
from ..runs import ADAPTER_DIR, RUN_CONFIG_FILE, STEPS_FILE, read_run_config
from .base import load_base_model
from .config import MERGE_DTYPES
from .method import get_method, read_run

log = logging.getLogger("neuronreg")
REPO_TYPE = "model"


def run_folder(folder: str | Path, *, token: str | None = None) -> Path:
    """A local run folder, or a Hub repo made by ``release`` (``org/name``), downloaded."""
    path = Path(folder)
    if path.is_dir():
        return path
    text = str(folder)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return download_run(text, token=token)
    raise FinetuneError(f"{folder} is neither a run folder nor a released Hub repo (org/name).", fix="run_folder")


def load_sparse_model(folder: str | Path, *, merge: bool = False, load: LoadOptions | None = None,
                      base: str | Path | None = None, allow_other_base: bool = False,
                      merge_dtype: str | None = None):
    """The base model of a ``neuronreg finetune`` run with the run applied.

    The base comes from the local folder recorded in the run when it still exists (and still holds the
    same weights), else from the Hub id at the recorded revision. Without ``merge`` the change stays
    separate (delta wrappers around the projections, exact in any dtype; a ``lora`` / ``ia3`` run comes
    back as a ``peft.PeftModel`` with its float32 adapter attached). With ``merge=True`` the change is
    added into the weights (stored in ``merge_dtype``, default the model's; see :func:`merge_run` for
    what the rounding loses) and the result is a plain ``transformers`` model. Dense runs (``ffn`` /
    ``full``) load their saved weights. ``folder`` may also be a Hub repo made by ``neuronreg release``
    (``org/name``): its run files are downloaded. ``base`` names the base model (a folder or Hub id)
    where the recorded one is not at hand, for example a released run of a local model: its weights
    are checked against the recorded fingerprint.
    """
    load = load_options(load)
    folder = run_folder(folder, token=load.token)
    config, method = read_run(folder)
    if merge and method.kind != "dense":
        return merge_run(folder, merge_dtype=merge_dtype, load=load, base=base,
                         allow_other_base=allow_other_base)[0].model
    return method.tuned_model(folder, config, load, base=base, allow_other_base=allow_other_base)


def merge_run(folder: str | Path, *, merge_dtype: str | None = None, load: LoadOptions | None = None,
              base: str | Path | None = None, allow_other_base: bool = False, tokenizer: bool = False):
    """The run's base model with its change merged in, and what merging lost (a ``MergeInfo``).

    Each changed weight is base + change summed in float32 and rounded once into ``merge_dtype``
    (float32, bfloat16 or float16; None: the model's dtype); the whole model is stored in that dtype.
    Returns ``(LoadedModel, MergeInfo)``; a warning is logged when more than 1% of the change's
    elements round away or the relative error passes 1e-3."""
    from ..models import DTYPES
    from .merging import parse_merge_dtype

    if merge_dtype is not None and merge_dtype not in MERGE_DTYPES:
        raise FinetuneError(f"Unknown merge_dtype {merge_dtype!r}; use one of {', '.join(MERGE_DTYPES)}.")
    load = load_options(load)
    folder = run_folder(folder, token=load.token)
    config, method = read_run(folder)
    loaded = load_base_model(folder, load, allow_other_base=allow_other_base, tokenizer=tokenizer, base=base)
    model, info = method.merge(loaded.model, folder, config, parse_merge_dtype(merge_dtype, DTYPES[loaded.dtype]))
    loaded.model = model
    return loaded, info


def apply_run(model, folder: str | Path):
    """Put a run on ``model`` (its base), unmerged and frozen; returns the model to use (a PeftModel around
    ``model`` for an adapter run, else ``model`` itself with the delta wrappers in it)."""
    config, method = read_run(folder)
    wrapped = method.apply(model, Path(folder), config)
    return wrapped if wrapped is not None else model


def download_run(repo_id: str, *, revision: str | None = None, token: str | None = None) -> Path:
    """The run files of a released repo (its method's files and the JSON), through the Hub cache."""
    from huggingface_hub import snapshot_download

    from .method import method_names

    names = {name for method in method_names() for name in get_method(method).run_files}
    patterns = [RUN_CONFIG_FILE, STEPS_FILE, *names, *(f"{ADAPTER_DIR}/{name}" for name in names)]
    with hub_errors(repo_id):
        path = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, token=token,
                                      allow_patterns=patterns))
    if get_method(read_run_config(path).subset).kind == "dense":  # its weights are the repo's root
        with hub_errors(repo_id):
            path = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=revision, token=token))
    return path
