"""Training dynamics (neuronreg.analysis.dynamics) and the training-curves plot."""

from __future__ import annotations

import math
import struct

import pytest

from neuronreg.analysis import dynamics
from neuronreg.errors import RecordError
from neuronreg.plots import layer_profiles, training_curves

NEW_LOG = [  # a run that logs everything, out of order, with step 20 logged twice (a resumed run)
    {"step": 0, "val_loss": 3.0},
    {"step": 20, "train_loss": 2.6, "val_loss": 2.5, "grad_norm": 1.5, "lr": 1e-4},
    {"step": 10, "train_loss": 2.9, "val_loss": 2.8, "grad_norm": 2.0, "lr": 5e-5},
    {"step": 30, "train_loss": 2.4, "val_loss": 2.4, "grad_norm": 1.0, "lr": 5e-5},
    {"step": 20, "val_loss": 2.45, "grad_norm": None},
]
OLD_LOG = [{"step": 0, "val_loss": 3.1}, {"step": 15, "train_loss": 2.7, "val_loss": 2.9},
           {"step": 30, "train_loss": float("nan"), "val_loss": 2.95}]


def test_run_curve_aligns_and_merges():
    curve = dynamics.run_curve("new", NEW_LOG)
    assert curve.steps == [0, 10, 20, 30]
    assert curve.values["val_loss"] == [3.0, 2.8, 2.45, 2.4]  # the later entry for step 20 wins
    assert curve.values["grad_norm"] == [None, 2.0, 1.5, 1.0]  # None does not erase a logged value
    assert curve.values["train_loss"][0] is None
    assert curve.points("lr") == ([10, 20, 30], [5e-5, 1e-4, 5e-5])
    assert curve.rows()[2] == {"run": "new", "step": 20, "val_loss": 2.45, "train_loss": 2.6, "grad_norm": 1.5,
                               "lr": 1e-4}
    old = dynamics.run_curve("old", OLD_LOG)
    assert old.values["grad_norm"] == [None, None, None] and old.points("lr") == ([], [])
    steps, table = dynamics.align_curves([curve, old], "val_loss")
    assert steps == [0, 10, 15, 20, 30]
    assert table == {"new": [3.0, 2.8, None, 2.45, 2.4], "old": [3.1, None, 2.9, None, 2.95]}


def _summary_by_hand(pairs):
    finite = [(s, v) for s, v in pairs if v is not None and math.isfinite(v)]
    start, end = finite[0][1], finite[-1][1]
    goal = start - 0.9 * (start - end)
    step_90 = None
    if end != start:
        for s, v in finite:
            if (end < start and v <= goal) or (end > start and v >= goal):
                step_90 = s
                break
    lowest = min(v for _, v in finite)
    highest = max(v for _, v in finite)
    return {"start": start, "end": end, "minimum": lowest, "minimum_step": [s for s, v in finite if v == lowest][0],
            "maximum": highest, "maximum_step": [s for s, v in finite if v == highest][0],
            "mean": sum(v for _, v in finite) / len(finite), "improvement": start - end, "step_90": step_90,
            "points": len(finite), "first_step": finite[0][0], "last_step": finite[-1][0]}


@pytest.mark.parametrize("log", [NEW_LOG, OLD_LOG])
def test_summaries_match_a_reading_by_hand(log):
    curve = dynamics.run_curve("run", log)
    summaries = dynamics.summarize_curve(curve)
    for key, summary in summaries.items():
        expected = _summary_by_hand(list(zip(curve.steps, curve.values[key])))
        got = summary.to_dict()
        assert got.pop("metric") == key
        assert got.pop("step_90") == expected.pop("step_90")
        assert got == pytest.approx(expected, rel=1e-14)
    assert set(summaries) == {k for k in dynamics.KEYS if any(v is not None for v in curve.values[k])}


def test_step_90_of_a_falling_and_a_rising_curve():
    falling = dynamics.summarize_series("val_loss", [0, 1, 2, 3, 4], [10.0, 5.0, 1.2, 0.9, 0.0])
    assert falling.step_90 == 3  # 90% of the way from 10 to 0 is 1.0: 1.2 is not there yet, 0.9 is
    rising = dynamics.summarize_series("lr", [0, 5, 10], [0.0, 0.95, 1.0])
    assert rising.step_90 == 5 and rising.improvement == -1.0
    flat = dynamics.summarize_series("val_loss", [0, 5], [2.0, 2.0])
    assert flat.step_90 is None
    assert dynamics.summarize_series("val_loss", [0], [float("nan")]) is None


def test_bad_logs_are_refused():
    with pytest.raises(RecordError, match="without a whole, non-negative step"):
        dynamics.run_curve("r", [{"val_loss": 1.0}])
    with pytest.raises(RecordError, match="step"):
        dynamics.run_curve("r", [{"step": 1.5, "val_loss": 1.0}])
    with pytest.raises(RecordError, match="val_loss='low'"):
        dynamics.run_curve("r", [{"step": 1, "val_loss": "low"}])


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_training_curves_plot(tmp_path):
    runs = {}
    for label, log in (("new", NEW_LOG), ("old", OLD_LOG)):
        curve = dynamics.run_curve(label, log)
        runs[label] = {key: curve.points(key) for key in dynamics.KEYS}
    path = training_curves(runs, tmp_path / "curves.png", title="sw: lape and random")
    assert _png_size(path) == (1000, 700)
    again = training_curves(runs, tmp_path / "again.png", title="sw: lape and random")
    assert again.read_bytes() == path.read_bytes()  # no timestamp: the same curves give the same bytes
    only_old = training_curves({"old": runs["old"]}, tmp_path / "old.png", title="old run")
    assert _png_size(only_old) == (1000, 700)  # the empty gradient-norm and lr panels say "not recorded"


def test_layer_profiles_plot(tmp_path):
    path = layer_profiles({"base": [0.1, 0.3, None, 0.5], "lape": [0.2, 0.4, 0.45, 0.6]}, tmp_path / "layers.png",
                          title="retrieval", ylabel="top-1", layers=[-1, 0, 1, 2], chance=0.01)
    assert _png_size(path) == (800, 450)
