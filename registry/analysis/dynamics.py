"""Training dynamics: a run's per-step log as aligned series, and what a reader wants to know of each.

A log is a list of dicts, one per logged step: ``step`` (an int, required) and any of ``train_loss``,
``val_loss``, ``grad_norm``, ``lr`` (older runs log only some: a missing key, or None, is "not logged
at this step"). Entries for the same step are merged, a later entry's values replacing an earlier's
(a resumed run may log a step again). :func:`run_curve` gives a :class:`RunCurve`: the sorted steps
and, per key, a value or None at each of them. :func:`summarize_curve` gives per key a
:class:`MetricSummary`:

* ``start``, ``end``: the value at the first and the last step that has one;
* ``minimum``/``maximum`` with the first step that reaches them, ``mean`` (of the logged values, each
  counted once, not weighted by the steps between them);
* ``improvement`` = start - end (positive when a loss went down);
* ``step_90``: the first logged step whose value has covered at least 90% of the way from start to end
  (for a falling loss: value <= start - 0.9 * (start - end)); None when end equals start.

Non-finite values (a diverging run's NaN) stay in the series and are left out of the summaries.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from ..errors import RecordError

KEYS = ("val_loss", "train_loss", "grad_norm", "lr")
REACHED = 0.9  # step_90: the share of the way from start to end


@dataclass
class RunCurve:
    """One run's log: ``steps`` sorted, and per key a value (or None) at each step."""

    label: str
    steps: list[int]
    values: dict[str, list[float | None]]

    def points(self, key: str) -> tuple[list[int], list[float]]:
        """The steps that have a value of ``key``, and those values."""
        pairs = [(s, v) for s, v in zip(self.steps, self.values.get(key, [])) if v is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def rows(self) -> list[dict]:
        """One dict per step: run, step and every key (None where not logged): a CSV's rows."""
        return [{"run": self.label, "step": step, **{k: self.values[k][i] for k in self.values}}
                for i, step in enumerate(self.steps)]

    def to_dict(self) -> dict:
        return {"label": self.label, "steps": list(self.steps), "values": {k: list(v) for k, v in self.values.items()}}


def _number(value, key: str, step, label: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"The log of {label} has {key}={value!r} at step {step}; it should be a number.")
    return float(value)


def run_curve(label: str, log: Iterable[dict], keys: Sequence[str] = KEYS) -> RunCurve:
    """The :class:`RunCurve` of one run's log (see the module's rules); RecordError for an entry
    without a whole, non-negative ``step`` or with a value that is not a number."""
    merged: dict[int, dict[str, float | None]] = {}
    for entry in log:
        step = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise RecordError(f"The log of {label} has an entry without a whole, non-negative step: {entry!r}.")
        values = merged.setdefault(step, {})
        for key in keys:
            value = _number(entry.get(key), key, step, label)
            if value is not None:
                values[key] = value
    steps = sorted(merged)
    return RunCurve(label, steps, {key: [merged[s].get(key) for s in steps] for key in keys})


def align_curves(curves: Sequence[RunCurve], key: str) -> tuple[list[int], dict[str, list[float | None]]]:
    """Every step any run logged (sorted), and per run its value of ``key`` at each (None where it has none)."""
    steps = sorted({s for curve in curves for s in curve.steps})
    table = {}
    for curve in curves:
        at = dict(zip(curve.steps, curve.values.get(key, [None] * len(curve.steps))))
        table[curve.label] = [at.get(s) for s in steps]
    return steps, table


@dataclass(frozen=True)
class MetricSummary:
    """One key of one run's log (see the module's definitions)."""

    metric: str
    points: int  # finite logged values
    first_step: int
    last_step: int
    start: float
    end: float
    minimum: float
    minimum_step: int
    maximum: float
    maximum_step: int
    mean: float
    improvement: float  # start - end
    step_90: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_series(metric: str, steps: Sequence[int], values: Sequence[float | None]) -> MetricSummary | None:
    """:class:`MetricSummary` of one series (None when it has no finite value)."""
    pairs = [(s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
    if not pairs:
        return None
    start, end = pairs[0][1], pairs[-1][1]
    low = min(pairs, key=lambda p: p[1])  # min/max keep the first of equal values: the first step to reach it
    high = max(pairs, key=lambda p: p[1])
    step_90 = None
    if end != start:
        target = start + REACHED * (end - start)
        # The last point always qualifies (up to rounding of the target): it is the default.
        step_90 = next((s for s, v in pairs if (v <= target if end < start else v >= target)), pairs[-1][0])
    return MetricSummary(metric, len(pairs), pairs[0][0], pairs[-1][0], start, end, low[1], low[0], high[1], high[0],
                         math.fsum(v for _, v in pairs) / len(pairs), start - end, step_90)


def summarize_curve(curve: RunCurve) -> dict[str, MetricSummary]:
    """Per key that has at least one finite value, its :class:`MetricSummary`."""
    out = {}
    for key in curve.values:
        summary = summarize_series(key, *curve.points(key))
        if summary is not None:
            out[key] = summary
    return out
