"""Training tiny runs in tests: keyword arguments split into the run's settings, the method's options and
how the model is loaded, as the library takes them."""

from neuronreg.finetune.config import FinetuneSettings
from neuronreg.options import LoadOptions

LOAD_KEYS = ("dtype", "device", "device_map", "token", "trust_remote_code")
OPTION_KEYS = {"lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules"}


def finetune_settings(**kw) -> tuple[FinetuneSettings, LoadOptions]:
    """``FinetuneSettings(...)`` and the ``LoadOptions`` from one set of keywords (``lora_r=4``, ``dtype=...``,
    ``gradient_checkpointing=True`` as the command line spells them)."""
    load = {key: kw.pop(key) for key in LOAD_KEYS if key in kw}
    options = dict(kw.pop("options", {}))
    options.update({name: kw.pop(key) for key, name in OPTION_KEYS.items() if key in kw})
    if kw.pop("gradient_checkpointing", False):
        kw["checkpointing"] = "full"
    return FinetuneSettings(**kw, options=options), LoadOptions(**load)
