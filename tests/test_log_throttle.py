"""The allowance of warnings any client can cause at will."""

from __future__ import annotations

import time

from gateway.log_throttle import Throttle, left_out


def test_a_burst_a_window_then_the_count_of_what_was_left_out() -> None:
    throttle = Throttle(burst=3, window=0.3)
    assert [throttle.admit() for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    time.sleep(0.35)
    assert throttle.admit() == (True, 2)
    assert throttle.admit() == (True, 0)


def test_the_words_for_lines_left_out() -> None:
    assert left_out(0) == ""
    assert left_out(7) == " (7 more like it not logged since the last one that was)"
