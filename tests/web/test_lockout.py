"""Failed authentications per address: the limit within a sliding minute, the wait
until the oldest failure ages out, addresses apart, and the memory bound."""

from __future__ import annotations

from gateway import lockout
from gateway.lockout import FailedLogins


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_turned_away_at_the_limit_until_its_oldest_failure_is_a_minute_old() -> None:
    clock = Clock()
    failures = FailedLogins(3, clock)
    assert [failures.failed("10.0.0.1") for _ in range(2)] == [False, False]
    clock.now += 20
    assert failures.blocked_for("10.0.0.1") == 0
    assert failures.failed("10.0.0.1") is True  # the third within a minute
    assert failures.blocked_for("10.0.0.1") == 40  # the first failure ages out in 40 s
    assert failures.blocked_for("10.0.0.2") == 0  # others are not affected
    clock.now += 40
    assert failures.blocked_for("10.0.0.1") == 0  # the first two aged out: may try again
    assert failures.failed("10.0.0.1") is False
    assert failures.failed("10.0.0.1") is True and failures.blocked_for("10.0.0.1") == 20


def test_no_limit_counts_nothing() -> None:
    failures = FailedLogins(0, Clock())
    assert not any(failures.failed("a") for _ in range(100)) and failures.blocked_for("a") == 0


def test_a_scan_from_many_addresses_stays_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(lockout, "MAX_ADDRESSES", 50)
    clock = Clock()
    failures = FailedLogins(5, clock)
    for n in range(200):
        failures.failed(f"10.1.{n // 250}.{n % 250}")
        clock.now += 0.1
    assert len(failures._failures) <= 50
