"""Which instances a study's discard (`spool discard --study`) still takes after it ran.

A C-STORE is acknowledged once its record is sealed; the daemon writes its row
afterwards (`gateway.spool.indexer`), and start-up adopts a sealed record whose row
was never written. ``spool discard`` runs in another process and sees only rows, so
an instance of the study acknowledged just before the discard, whose row was still
waiting, would be delivered all the same. The discard therefore leaves a mark (the
study and when), and a row written later for an instance sealed before that moment
is withdrawn as it is written (`Spool._insert_many`): it never reaches the archive nor
a route. An instance received after the discard (the study sent again, corrected) is
kept.

"Before" is decided by the machine's boot clock when the instance was sealed by the
running daemon in the same boot as the discard: that clock never steps, so a wall
clock set back cannot make a new instance look older than the discard and drop it.
A record adopted at start-up carries only its file's modification time, compared
with the discard's wall-clock time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def _boot_id() -> str:
    try:
        return _BOOT_ID.read_text().strip()
    except OSError:
        return ""  # matches no mark: what the running daemon sealed is then always kept


BOOT_ID = _boot_id()


def boot_seconds() -> float:
    """Seconds on a clock shared by every process of this boot that never steps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Mark:
    """When a study was discarded, on both clocks."""

    wall: float
    boot_id: str
    boot: float

    @classmethod
    def now(cls) -> Mark:
        return cls(time.time(), BOOT_ID, boot_seconds())

    def takes(self, sealed_boot: float | None, received_at: float) -> bool:
        """Whether an instance sealed at ``sealed_boot`` (this boot's clock; None for a
        record adopted at start-up, known only by ``received_at``, wall clock) was in
        the spool when the discard ran."""
        if sealed_boot is None:
            return received_at <= self.wall
        if self.boot_id and self.boot_id == BOOT_ID:
            return sealed_boot <= self.boot
        return False  # discarded in an earlier boot: this boot's records came after it
