"""The facade's memory of series whose frames the archive refused: kept for a while and
for a bounded number of series, then asked of the archive again."""

from __future__ import annotations

import time

from gateway.web.refusals import RefusedSeries


def test_a_refusal_is_remembered_for_a_while() -> None:
    refusals = RefusedSeries(seconds=0.2)
    assert not refusals.refused("1.2/3.4@")
    refusals.remember("1.2/3.4@")
    assert refusals.refused("1.2/3.4@") and not refusals.refused("1.2/3.5@")
    time.sleep(0.25)
    assert not refusals.refused("1.2/3.4@")  # RetrieveFrames is tried again


def test_the_oldest_series_are_forgotten_first() -> None:
    refusals = RefusedSeries(seconds=60, kept=2)
    for key in ("a", "b", "a", "c"):  # "a" remembered again: "b" is now the oldest
        refusals.remember(key)
    assert [refusals.refused(k) for k in ("a", "b", "c")] == [True, False, True]
