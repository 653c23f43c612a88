"""Seed statistics (neuronreg.analysis.stats, .seeds) against scipy and brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from neuronreg.analysis import seeds, stats
from neuronreg.errors import SettingsError

scipy_stats = pytest.importorskip("scipy.stats")

DFS = [0.5, 1, 1.5, 2, 3, 4.7, 7, 10, 29.3, 100, 1e3, 1e5]
TS = [0.0, 1e-8, 0.01, 0.3, 1, 1.96, 2.5, 4, 10, 50, 1e3, -0.3, -2.2, -12]


@pytest.mark.parametrize("df", DFS)
def test_t_distribution_matches_scipy(df):
    for t in TS:
        if df == 1 and 0 < abs(t) < 1e-6:
            continue  # scipy 1.17's t.cdf is 1.6e-9 off there (mpmath agrees with us); checked in closed form below
        assert stats.t_cdf(t, df) == pytest.approx(float(scipy_stats.t.cdf(t, df)), abs=1e-10, rel=0)
        sf = float(2 * scipy_stats.t.sf(abs(t), df))
        # absolute 1e-10 everywhere, and relative 1e-9 in the far tail where p is tiny
        assert stats.t_two_sided(t, df) == pytest.approx(sf, abs=1e-10, rel=1e-9)
    for q in (0.5, 0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.025, 0.1):
        assert stats.t_quantile(q, df) == pytest.approx(float(scipy_stats.t.ppf(q, df)), abs=1e-10, rel=1e-10)


def test_t_distribution_closed_forms():
    """df 1 is the Cauchy distribution, df 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2))."""
    for t in [*TS, 1e-12, 3e-8]:
        assert stats.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-15, rel=1e-13)
        assert stats.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-15, rel=1e-13)


def test_regularized_beta_matches_scipy():
    special = pytest.importorskip("scipy.special")
    for a, b in [(0.5, 0.5), (2, 3), (10, 0.5), (0.1, 7), (50, 40), (500, 0.5)]:
        for x in (0.0, 1e-6, 0.1, 0.5, 0.9, 0.999999, 1.0):
            assert stats.regularized_beta(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), abs=1e-12)


def _summary_by_hand(values):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return n, mean, sd


def test_summary_matches_scipy():
    rng = random.Random(1)
    for n in (2, 3, 5, 12):
        values = [rng.gauss(2.3, 0.01) for _ in range(n)]
        s = stats.summarize(values)
        count, mean, sd = _summary_by_hand(values)
        assert (s.n, s.mean, s.sd) == (count, pytest.approx(mean, rel=1e-14), pytest.approx(sd, rel=1e-12))
        assert s.sem == pytest.approx(float(scipy_stats.sem(values)), rel=1e-12)
        low, high = scipy_stats.t.interval(0.95, n - 1, loc=mean, scale=scipy_stats.sem(values))
        assert (s.ci_low, s.ci_high) == (pytest.approx(low, abs=1e-10), pytest.approx(high, abs=1e-10))
    one = stats.summarize([4.0])
    assert (one.n, one.mean, one.sd, one.sem, one.ci_low, one.ci_high) == (1, 4.0, None, None, None, None)


def test_welch_matches_scipy():
    rng = random.Random(2)
    for n_a, n_b in [(2, 2), (3, 3), (3, 5), (8, 4), (20, 30)]:
        a = [rng.gauss(0.0, 1.0) for _ in range(n_a)]
        b = [rng.gauss(0.7, 2.5) for _ in range(n_b)]
        ours = stats.welch_test(a, b)
        theirs = scipy_stats.ttest_ind(a, b, equal_var=False)
        assert ours.t == pytest.approx(float(theirs.statistic), rel=1e-12)
        assert ours.p == pytest.approx(float(theirs.pvalue), abs=1e-10)
        assert ours.df == pytest.approx(float(theirs.df), rel=1e-12)
        low, high = theirs.confidence_interval(0.95)
        assert ours.ci_low == pytest.approx(float(low), abs=1e-10)
        assert ours.ci_high == pytest.approx(float(high), abs=1e-10)
        assert ours.difference == pytest.approx(sum(a) / n_a - sum(b) / n_b, rel=1e-12)


def test_welch_without_spread_and_bad_input():
    assert stats.welch_test([1.0, 1.0], [2.0, 2.0]).p == 0.0
    assert math.isinf(stats.welch_test([1.0, 1.0], [2.0, 2.0]).t)
    assert math.isnan(stats.welch_test([1.0, 1.0], [1.0, 1.0]).p)
    with pytest.raises(SettingsError, match="at least 2 values"):
        stats.welch_test([1.0], [2.0, 3.0])
    with pytest.raises(SettingsError, match="finite"):
        stats.summarize([1.0, float("nan")])


def _permutation_brute_force(a, b):
    """Every ordering of the pooled values, the first len(a) as group A: each split counted
    len(a)! len(b)! times, so the share is the same as over splits."""
    pooled = a + b
    observed = abs(sum(a) / len(a) - sum(b) / len(b))
    hits = total = 0
    for order in itertools.permutations(pooled):
        x, y = order[:len(a)], order[len(a):]
        total += 1
        hits += abs(sum(x) / len(x) - sum(y) / len(y)) >= observed - 1e-12
    return hits / total


def test_permutation_test_matches_brute_force():
    rng = random.Random(3)
    for n_a, n_b in [(1, 2), (2, 2), (3, 3), (2, 4), (3, 4)]:
        for _ in range(3):
            a = [round(rng.gauss(0, 1), 3) for _ in range(n_a)]
            b = [round(rng.gauss(0.5, 1), 3) for _ in range(n_b)]
            result = stats.permutation_test(a, b)
            assert result.splits == math.comb(n_a + n_b, n_a)
            assert result.p == pytest.approx(_permutation_brute_force(a, b), abs=1e-15)
            assert result.p == result.as_extreme / result.splits
    # Fully separated groups of 3 and 3: the observed split and its mirror are the only extreme ones.
    separated = stats.permutation_test([1.0, 1.1, 1.2], [2.0, 2.1, 2.2])
    assert (separated.as_extreme, separated.splits, separated.p) == (2, 20, 0.1)
    # Ties by symmetry (0.1 + 0.2 != 0.3 in floats) still count as "as extreme".
    tied = stats.permutation_test([0.1, 0.2], [0.3, 0.0])
    assert tied.as_extreme == _permutation_brute_force([0.1, 0.2], [0.3, 0.0]) * tied.splits
    with pytest.raises(SettingsError, match="Welch"):
        stats.permutation_test(list(range(13)), list(range(13)))


def test_group_runs_and_compare():
    records = [
        {"subset": "lape", "language": "sw", "seed": 0, "bpc": 2.10, "loss": 1.0},
        {"subset": "random", "language": "sw", "seed": 0, "bpc": 2.20},
        {"subset": "lape", "language": "sw", "seed": 1, "bpc": 2.12, "loss": 1.1},
        {"subset": "random", "language": "sw", "seed": 1, "bpc": 2.25},
        {"subset": "lape", "language": "sw", "seed": 2, "bpc": 2.11, "loss": float("nan")},
        {"subset": "random", "language": "sw", "seed": 2, "bpc": 2.23},
        {"subset": "random", "language": "yo", "seed": 0, "bpc": 3.0},
    ]
    groups = seeds.group_runs(records, metrics=["bpc", "loss"])
    assert [g.settings for g in groups] == [{"subset": "lape", "language": "sw"},
                                            {"subset": "random", "language": "sw"},
                                            {"subset": "random", "language": "yo"}]
    lape = seeds.find_group(groups, subset="lape")
    random_sw = seeds.find_group(groups, subset="random", language="sw")
    assert lape.n == 3 and lape.values("loss") == [1.0, 1.1]  # NaN left out
    assert lape.summaries["bpc"].mean == pytest.approx((2.10 + 2.12 + 2.11) / 3, rel=1e-14)
    assert "loss" not in random_sw.summaries
    with pytest.raises(SettingsError, match="2 groups"):
        seeds.find_group(groups, subset="random")
    comparison = seeds.compare_groups(lape, random_sw, "bpc")
    a, b = [2.10, 2.12, 2.11], [2.20, 2.25, 2.23]
    assert comparison.welch.p == pytest.approx(float(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue), abs=1e-10)
    assert comparison.permutation.p == pytest.approx(_permutation_brute_force(a, b), abs=1e-15)
    assert comparison.difference == pytest.approx(sum(a) / 3 - sum(b) / 3, rel=1e-12)
    data = comparison.to_dict()
    assert data["welch"]["test"] == "welch" and data["permutation"]["test"] == "permutation"
    assert data["first"] == {"subset": "lape", "language": "sw"}
    single = seeds.compare_groups(seeds.find_group(groups, language="yo"), lape, "bpc")
    assert single.welch is None and single.permutation.splits == 4
