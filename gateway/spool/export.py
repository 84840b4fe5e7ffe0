"""Instances copied out of the spool as plain Part 10 files, for an admin.

When the archive refuses an instance (dead in the spool) or a study must go another
way (burned to a disc, sent to another PACS by hand), the admin needs the files
themselves. A spool record is a Part 10 file whose preamble holds its length and
checksum, possibly in a longer preallocated blank: each is verified against its
checksum, cut to its length and given a zero preamble, so ``dcmdump`` or ``storescu``
take it as any other file. Files are created 0600 in a directory created 0700 (they
hold patient data) and never overwrite one already there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.spool.queue import Spool
from gateway.spool.record import PREAMBLE, CorruptRecord, verify
from gateway.uids import is_valid_uid

COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Exported:
    """What one export wrote, and what it could not (a row id and why)."""

    written: list[tuple[dict[str, Any], Path]]
    problems: list[tuple[int, str]]


def export_rows(spool: Spool, rows: list[dict[str, Any]], directory: Path) -> Exported:
    """Each row's instance as ``<SOPInstanceUID>.dcm`` in ``directory``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    written: list[tuple[dict[str, Any], Path]] = []
    problems: list[tuple[int, str]] = []
    for row in rows:
        inst = spool.instance_of(row)
        name = inst.sop_instance_uid if is_valid_uid(inst.sop_instance_uid) else f"spool-{inst.id}"
        target = directory / f"{name}.dcm"
        try:
            fd = os.open(inst.path, os.O_RDONLY)
        except OSError as exc:
            problems.append((inst.id, f"spool file unreadable: {exc.strerror or exc} (purged?)"))
            continue
        try:
            verify(fd)
            _copy(fd, inst.size, target)
        except CorruptRecord as exc:
            problems.append((inst.id, f"spool record damaged, not exported: {exc}"))
        except FileExistsError:
            problems.append((inst.id, f"{target} exists already; left alone"))
        except OSError as exc:
            problems.append((inst.id, f"cannot write {target}: {exc.strerror or exc}"))
        else:
            written.append((row, target))
        finally:
            os.close(fd)
    return Exported(written, problems)


def _copy(fd: int, size: int, target: Path) -> None:
    """The record's bytes after its preamble, behind a zero preamble, into a new file."""
    out = os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")
    try:
        with out:
            out.write(bytes(PREAMBLE))
            offset = PREAMBLE
            while offset < size:
                chunk = os.pread(fd, min(COPY_CHUNK, size - offset), offset)
                if not chunk:
                    raise CorruptRecord(f"the file ends at {offset} of {size} bytes")
                out.write(chunk)
                offset += len(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
