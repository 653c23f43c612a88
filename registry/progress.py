"""The one progress-bar helper, on stderr, and the one switch that silences it.

Progress is silenced globally, as ``huggingface_hub`` and ``datasets`` do it (no ``quiet`` argument on
every function): :func:`disable_progress_bars` (the command line's ``-q``), or ``HF_HUB_DISABLE_PROGRESS_BARS``
read by huggingface_hub's own helper, so the rule cannot drift from the Hub client's. Disabling ours
disables the Hub client's, ``datasets``' and ``transformers``' bars too.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

_disabled: bool | None = None  # None: as huggingface_hub says (HF_HUB_DISABLE_PROGRESS_BARS)


def disable_progress_bars() -> None:
    """Silence every progress bar neuronreg and the libraries under it draw."""
    global _disabled
    _disabled = True
    _apply(False)


def enable_progress_bars() -> None:
    global _disabled
    _disabled = False
    _apply(True)


def progress_bars_disabled() -> bool:
    """Our switch when it was set; else huggingface_hub's (its own switch and the variable as it read it at
    import), or the variable as it is now, read by the Hub client's own rule (set after import, in tests)."""
    if _disabled is not None:
        return _disabled
    import os

    from huggingface_hub.constants import _is_true
    from huggingface_hub.utils import are_progress_bars_disabled

    return are_progress_bars_disabled() or _is_true(os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"))


def _apply(enabled: bool) -> None:
    """The same switch in the libraries neuronreg calls (only those already imported: the switch stays cheap)."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import utils

        (utils.enable_progress_bars if enabled else utils.disable_progress_bars)()
    if "datasets" in sys.modules:
        import datasets

        (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


def progress(total: int | None, desc: str, unit: str = "tok", initial: int = 0, show: bool = True) -> tqdm:
    """A bar on stderr; ``show=False`` for a process that must not draw one (the ranks other than 0)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, initial=initial, file=sys.stderr,
                disable=not show or progress_bars_disabled(), dynamic_ncols=True, leave=True)


def input_ended(bar: tqdm) -> None:
    """The input ran out before the bar's total (less text than was asked for, or than was estimated): the
    total becomes what was done, so a finished bar ends at 100%, not part of the way."""
    if not bar.disable and bar.total is not None and bar.n < bar.total:
        bar.total = bar.n
        bar.refresh()


def duration(seconds: float | None) -> str:
    """A time span as people read it: '42.0 s', '3.5 min', '2.1 h' ('-' when unknown)."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
