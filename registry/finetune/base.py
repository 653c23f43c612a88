"""A run's base model: where it is (its recorded local folder while it holds the same weights, else the
Hub id at the recorded revision, or a folder given) and loading it."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import FinetuneError, UnknownModel
from ..options import LoadOptions, load_options
from ..resolve import ModelRef
from ..runs import RunConfig, read_run_config

log = logging.getLogger("neuronreg")


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


def load_base_model(folder: str | Path, load: LoadOptions | None = None, *, allow_other_base: bool = False,
                    tokenizer: bool = False, base: str | Path | None = None):
    """The run's base model, without the run (a LoadedModel), in the run's dtype unless ``load`` says."""
    from ..models import load_model

    config = read_run_config(folder)
    ref = base_ref(config, base=base, allow_other_base=allow_other_base)
    load = load_options(load)
    return load_model(ref, load.but(dtype=load.dtype or config.training.dtype), revision=ref.revision,
                      tokenizer=tokenizer)
