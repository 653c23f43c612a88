"""Runs that differ only in their seed: grouped, summarised per metric, and two groups compared.

A record is a flat dict of one run: the settings that make it what it is (``subset``, ``language``,
``top_rate`` ...), the keys that only repeat it (``seed``) and its metrics (``bits_per_character`` ...).
:func:`group_runs` puts records whose settings are equal (every key other than the repeat keys and the
metrics; a missing key counts as None) into one :class:`RunGroup`; :func:`compare_groups` compares
two groups on one metric with both tests of :mod:`.stats` (Welch's t and, when it fits, the exact
permutation test), as a :class:`GroupComparison`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import SettingsError
from .stats import MAX_SPLITS, PermutationTest, Summary, WelchTest, permutation_test, summarize, welch_test


@dataclass
class RunGroup:
    """Records with equal settings: the settings, the records, and a :class:`Summary` per metric
    (over the records that have a finite value of it)."""

    settings: dict
    records: list[dict]
    summaries: dict[str, Summary] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.records)

    def values(self, metric: str) -> list[float]:
        """The metric's finite values, in the records' order."""
        out = []
        for record in self.records:
            value = record.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out.append(float(value))
        return out

    def label(self, keys: Sequence[str] | None = None) -> str:
        """``key=value`` of the settings (only ``keys`` when given), joined by commas."""
        keys = list(self.settings) if keys is None else keys
        return ",".join(f"{k}={self.settings.get(k)}" for k in keys)

    def to_dict(self) -> dict:
        return {"settings": dict(self.settings), "n": self.n,
                "summaries": {metric: summary.to_dict() for metric, summary in self.summaries.items()}}


def _hashable(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def group_runs(records: Iterable[dict], metrics: Sequence[str], repeat_keys: Sequence[str] = ("seed",)
               ) -> list[RunGroup]:
    """Groups of records whose settings are equal: every key that is neither a metric nor one of
    ``repeat_keys``, with a missing key read as None. Groups come in the order of their first record;
    within a group, records keep their order. Each group summarises every metric in ``metrics`` that
    at least one of its records has."""
    ignored = set(metrics) | set(repeat_keys)
    records = list(records)
    keys = list(dict.fromkeys(k for record in records for k in record if k not in ignored))
    groups: dict[str, RunGroup] = {}
    for record in records:
        settings = {k: record.get(k) for k in keys}
        groups.setdefault(_hashable(settings), RunGroup(settings, [])).records.append(record)
    for group in groups.values():
        for metric in metrics:
            values = group.values(metric)
            if values:
                group.summaries[metric] = summarize(values)
    return list(groups.values())


def find_group(groups: Sequence[RunGroup], **settings) -> RunGroup:
    """The one group whose settings include ``settings``; SettingsError when none or several match."""
    found = [g for g in groups if all(g.settings.get(k) == v for k, v in settings.items())]
    wanted = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    if not found:
        raise SettingsError(f"No group of runs has {wanted}.")
    if len(found) > 1:
        raise SettingsError(f"{len(found)} groups of runs have {wanted}; name more settings to choose one.")
    return found[0]


@dataclass(frozen=True)
class GroupComparison:
    """Two groups on one metric: both summaries, the difference of means (first - second), Welch's
    t-test, and the exact permutation test (None when a group has fewer than 2 values for Welch, or
    when there are more than ``MAX_SPLITS`` splits for the permutation test)."""

    metric: str
    first: dict  # the first group's settings
    second: dict
    first_summary: Summary
    second_summary: Summary
    difference: float
    welch: WelchTest | None
    permutation: PermutationTest | None

    def to_dict(self) -> dict:
        return {"metric": self.metric, "first": dict(self.first), "second": dict(self.second),
                "first_summary": self.first_summary.to_dict(), "second_summary": self.second_summary.to_dict(),
                "difference": self.difference, "welch": self.welch.to_dict() if self.welch else None,
                "permutation": self.permutation.to_dict() if self.permutation else None}


def compare_groups(first: RunGroup, second: RunGroup, metric: str, max_splits: int = MAX_SPLITS
                   ) -> GroupComparison:
    """``first`` against ``second`` on ``metric`` (their finite values): summaries, mean(first) -
    mean(second), Welch's t-test and the exact permutation test where each applies."""
    a, b = first.values(metric), second.values(metric)
    for group, values in ((first, a), (second, b)):
        if not values:
            raise SettingsError(f"The runs {group.label()} have no value of {metric!r}.")
    welch = welch_test(a, b) if len(a) >= 2 and len(b) >= 2 else None
    permutation = permutation_test(a, b) if math.comb(len(a) + len(b), len(a)) <= max_splits else None
    summary_a, summary_b = summarize(a), summarize(b)
    return GroupComparison(metric, dict(first.settings), dict(second.settings), summary_a, summary_b,
                           summary_a.mean - summary_b.mean, welch, permutation)
