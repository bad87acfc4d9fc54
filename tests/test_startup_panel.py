"""The cold-start panel's time left per stage (pages.common._Stage), by hand; the panel in a real browser is in
tests/test_browser.py::test_cold_start_shows_every_stage_with_time_left."""

from __future__ import annotations

import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the app's pages package

from pages.common import _Stage  # noqa: E402


def test_time_left_before_during_and_after_a_stage():
    s = _Stage("relevance", estimate=6.0)
    assert s.left(100.0) == 6.0  # not started: the estimate
    s.started = 100.0
    assert s.left(102.0) == pytest.approx(4.0)  # started, no parts yet: the estimate less the time spent
    assert s.left(110.0) == 0.0  # never below zero
    s.report(0, 1000, 103.0)  # the parts begin after 3 s of set-up, which is not counted per part
    assert s.left(104.0) == pytest.approx(2.0)  # still the estimate less the time spent: no rate yet
    s.report(250, 1000, 104.0)
    assert s.left(104.0) == pytest.approx(3.0)  # 1 s per 250 parts, 750 left
    s.report(500, 1000, 106.0)
    assert s.left(106.0) == pytest.approx(3 / 500 * 500)
    s.took = 6.5
    assert s.left(107.0) == 0.0


def test_unknown_without_estimate_until_parts_are_done():
    s = _Stage("baseline")
    assert s.left(0.0) is None
    s.started = 0.0
    assert s.left(1.0) is None
    s.report(100, 400, 1.0)
    assert s.left(2.0) is None  # one report gives no rate yet
    s.report(200, 400, 2.0)
    assert s.left(2.0) == pytest.approx(2.0)
