"""C-STORE SCP: validate a received instance and make it durable before answering.

pynetdicom has already written the data set, exactly as received, to a file in the
spool's ``incoming/`` directory (``STORE_RECV_CHUNKED_DATASET``), so large instances
never sit in memory. This handler reads only the header, checks that it is an
instance we can forward, and hands the file to the spool. Statuses follow PS3.4 B.2.3.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import events

from gateway.config import Config
from gateway.dimse.stats import stats_for
from gateway.spool.queue import InstanceHeader, Spool, SpoolFull
from gateway.uids import is_valid_uid

log = logging.getLogger("gateway.dimse")

SUCCESS = 0x0000
REFUSED_NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class StoreHandler:
    """The EVT_C_STORE handler, with its dependencies bound (no globals)."""

    config: Config
    spool: Spool

    def __call__(self, event: events.Event) -> Dataset:
        assoc_stats = stats_for(event.assoc)
        calling = event.assoc.requestor.ae_title
        temp = Path(event.dataset_path)
        status, comment = self._store(event, temp, calling)
        if status == SUCCESS:
            assoc_stats.stored += 1
        else:
            assoc_stats.failed += 1
            temp.unlink(missing_ok=True)
        rsp = Dataset()
        rsp.Status = status
        if comment:
            rsp.ErrorComment = comment[:64]
        return rsp

    def _store(self, event: events.Event, temp: Path, calling: str) -> tuple[int, str]:
        req = event.request
        peer = self.config.peer(calling)
        if peer is not None and "store" not in peer.permissions:
            log.warning("C-STORE from %s refused: peer has no store permission", calling)
            return REFUSED_NOT_AUTHORIZED, "calling AE may not store"

        affected_uid = str(req.AffectedSOPInstanceUID or "")
        header, problem = read_header(temp, str(req.AffectedSOPClassUID or ""), affected_uid)
        if header is None:
            log.warning(
                "C-STORE from %s of %s rejected: %s", calling, affected_uid[:64] or "?", problem
            )
            code = DATASET_DOES_NOT_MATCH if problem.startswith("SOP Class") else CANNOT_UNDERSTAND
            return code, problem

        watch = self.config.dimse.ack == "delivered"
        try:
            row_id = self.spool.enqueue(temp, header, calling, watch=watch)
        except SpoolFull as exc:
            log.error("C-STORE of %s refused: %s", header.sop_instance_uid, exc)
            return OUT_OF_RESOURCES, "spool full"
        except Exception as exc:  # noqa: BLE001 - never ack what is not stored
            log.exception("C-STORE of %s could not be spooled", header.sop_instance_uid)
            return OUT_OF_RESOURCES, f"spool error: {type(exc).__name__}"
        log.debug("spooled %s as id %d", header.sop_instance_uid, row_id)

        if not watch:
            return SUCCESS, ""
        outcome = self.spool.wait_outcome(row_id, self.config.dimse.ack_timeout)
        if outcome is None:
            return OUT_OF_RESOURCES, "not delivered in time; still queued"
        if outcome.kind == "delivered":
            return SUCCESS, ""
        if outcome.kind == "rejected":
            return CANNOT_UNDERSTAND, f"archive refused: {outcome.error}"
        return OUT_OF_RESOURCES, "archive unavailable; still queued"


def read_header(
    path: Path, sop_class_uid: str, sop_instance_uid: str
) -> tuple[InstanceHeader | None, str]:
    """Parse the received file's header and check what forwarding needs.

    Returns the header, or None and a short reason (no PHI: only UIDs and keywords).
    Large elements are deferred so that an encapsulated 100 MB PDF is not read.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size="256 KB")
        uids = {
            kw: ds.get(kw)
            for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        return None, f"unreadable data set ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - any parser failure is the sender's malformed data
        return None, f"unreadable data set ({type(exc).__name__})"
    for kw, value in uids.items():
        if value is None or value == "":
            return None, f"{kw} missing"
        if not is_valid_uid(str(value)):
            return None, f"{kw} is not a valid UID"
    if str(uids["SOPClassUID"]) != sop_class_uid:
        return None, "SOP Class UID differs from the request"
    if str(uids["SOPInstanceUID"]) != sop_instance_uid:
        return None, "SOP Instance UID differs from the request"
    return (
        InstanceHeader(
            sop_instance_uid=str(uids["SOPInstanceUID"]),
            sop_class_uid=str(uids["SOPClassUID"]),
            study_uid=str(uids["StudyInstanceUID"]),
            series_uid=str(uids["SeriesInstanceUID"]),
            transfer_syntax=transfer_syntax,
        ),
        "",
    )
