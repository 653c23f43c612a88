"""The one progress-bar helper: on stderr, silenced by quiet or HF_HUB_DISABLE_PROGRESS_BARS."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def bars_disabled(quiet: bool = False) -> bool:
    flag = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").strip().lower()
    return quiet or flag in {"1", "true", "yes", "on"}


def progress(total: int | None, desc: str, unit: str = "tok", quiet: bool = False, initial: int = 0) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, initial=initial, file=sys.stderr,
                disable=bars_disabled(quiet), dynamic_ncols=True, leave=True)


def duration(seconds: float | None) -> str:
    """A time span as people read it: '42.0 s', '3.5 min', '2.1 h' ('-' when unknown)."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
