"""When a discard still takes an instance whose row is written after it."""

from __future__ import annotations

from gateway.spool.discards import BOOT_ID, Mark


def test_an_instance_sealed_in_this_boot_is_ordered_by_the_boot_clock_not_the_wall_clock() -> None:
    mark = Mark(wall=1000.0, boot_id=BOOT_ID, boot=50.0)
    assert mark.takes(49.0, received_at=2000.0)  # the wall clock was set ahead since
    assert not mark.takes(51.0, received_at=900.0)  # set back: still after the discard


def test_a_discard_of_an_earlier_boot_takes_nothing_this_boot_sealed() -> None:
    assert not Mark(wall=1000.0, boot_id="another boot", boot=1e9).takes(1.0, received_at=10.0)


def test_a_record_adopted_at_start_up_is_ordered_by_its_modification_time() -> None:
    mark = Mark(wall=1000.0, boot_id=BOOT_ID, boot=50.0)
    assert mark.takes(None, received_at=999.0) and not mark.takes(None, received_at=1001.0)
