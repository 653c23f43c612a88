"""How a model is loaded: one value (:class:`LoadOptions`) that every function loading a model takes, the
same options the command line declares once (``--dtype``, ``--device``, ``--device-map``, ``--token``,
``--trust-remote-code``). Nothing here imports torch."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .errors import SettingsError

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
DEVICE_MAPS = ("auto",)


@dataclass(frozen=True)
class LoadOptions:
    """``dtype``: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16; ``device``: cpu,
    cuda, cuda:1, mps (default: CUDA when present); ``device_map="auto"``: accelerate spreads a model too
    large for one GPU over the GPUs; ``token``: a Hub token (default: HF_TOKEN or the Hub login; never
    shown, not even in ``repr``); ``trust_remote_code``: run a model repository's own code (off)."""

    dtype: str | None = None
    device: str | None = None
    device_map: str | None = None
    token: str | None = field(default=None, repr=False)
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES + ("fp32", "bf16", "fp16"):
            raise SettingsError(f"Unknown dtype {self.dtype!r}; use one of {', '.join(DTYPE_CHOICES)}.")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise SettingsError(f"Unknown device_map {self.device_map!r}; use 'auto'.")
        if not isinstance(self.trust_remote_code, bool):
            raise SettingsError("trust_remote_code must be True or False.")

    def but(self, **changes) -> LoadOptions:
        """A copy with ``changes`` (``options.but(device="cpu")``)."""
        return replace(self, **changes)


def load_options(options: LoadOptions | None) -> LoadOptions:
    return options if options is not None else LoadOptions()
