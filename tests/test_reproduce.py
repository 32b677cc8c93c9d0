"""The `reproduce` task's arithmetic: the log-log slope fit and the slopes per method
(no training; the task's runs are the other tasks', tested in test_experiments.py)."""

import math

import numpy as np
import pytest

from gqdiffrax_experiments import reproduce


def test_loglog_slope_recovers_a_power_law():
    x = np.array([5.0, 20.0, 100.0, 500.0, 2000.0])
    assert reproduce.loglog_slope(x, 3.0 * x**1.5) == pytest.approx(1.5)
    # A constant part at small x: the slope over large x only is the power's.
    y = 1.0 + 1e-3 * x**2
    assert reproduce.loglog_slope(x, y) < 1.5
    assert reproduce.loglog_slope(x, y, min_x=500) == pytest.approx(1.99, abs=0.02)


def test_loglog_slope_skips_bad_points_and_needs_two_widths():
    x = [1.0, 10.0, 100.0, 0.0]
    y = [2.0, 20.0, math.nan, 5.0]
    assert reproduce.loglog_slope(x, y) == pytest.approx(1.0)
    assert reproduce.loglog_slope([10.0, 10.0], [1.0, 2.0]) is None
    assert reproduce.loglog_slope([1.0, 10.0], [1.0, 2.0], min_x=5) is None


def test_scaling_slopes_per_method():
    rows = [
        dict(method=m, width=w, seed=s, s_per_epoch=c * w**p, final_metric=1.0)
        for m, c, p in (("direct", 1.0, 0.5), ("adjoint", 2.0, 1.0))
        for w in (5, 100, 1000)
        for s in (0, 1)
    ]
    slopes = reproduce.scaling_slopes({"task": rows})["task"]
    assert slopes["direct"]["slope"] == pytest.approx(0.5)
    assert slopes["adjoint"]["slope_large"] == pytest.approx(1.0)
    assert slopes["adjoint"]["widths"] == [5, 100, 1000]
    assert "0.50 / 0.50" in reproduce.slope_table({"task": slopes})
