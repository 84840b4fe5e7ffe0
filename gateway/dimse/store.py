"""C-STORE SCP: validate a received instance and make it durable before answering.

The association has already written the data set, exactly as received, into its
spool file (a `Receipt`), so large instances never sit in memory. This handler reads
only the header, checks that it is an instance we can forward, and has the spool seal
it; or, when the association could not store it (spool below its free-space floor,
disk full), answers 0xA700 at once. Statuses follow PS3.4 B.2.3.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from gateway.config import Config
from gateway.dimse.association import Association, Message
from gateway.dimse.command import C_STORE_RSP, response
from gateway.header import InstanceHeader
from gateway.spool.ingest import Verdict, ingest
from gateway.spool.record import Sender
from gateway.spool.queue import Spool

log = logging.getLogger("gateway.dimse")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000

# PS3.4 B.2.3: 0xA700 tells the sender to keep the instance and try again; 0xA900 and
# 0xC000 that this data set will never be taken. A refused instance is 0xC000 too: the
# archive's verdict on it will not change.
STATUS = {
    Verdict.STORED: SUCCESS,
    Verdict.DELIVERED: SUCCESS,
    Verdict.UNREADABLE: CANNOT_UNDERSTAND,
    Verdict.MISMATCH: DATASET_DOES_NOT_MATCH,
    Verdict.NO_SPACE: OUT_OF_RESOURCES,
    Verdict.REFUSED: CANNOT_UNDERSTAND,
    Verdict.NOT_DELIVERED: OUT_OF_RESOURCES,
}


class StoreService:
    """The C-STORE service, with its dependencies bound (no globals).

    The blocking part (header parse, fsync, spool commit, and for ``ack = "delivered"``
    the wait for the archive) runs on a worker pool sized to the association limit,
    so the loop keeps serving other associations meanwhile.
    """

    def __init__(self, config: Config, spool: Spool) -> None:
        self.config = config
        self.spool = spool
        self.executor = ThreadPoolExecutor(
            max_workers=config.dimse.max_associations + 2, thread_name_prefix="c-store"
        )

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    async def __call__(self, assoc: Association, message: Message) -> None:
        if message.refused is not None:
            # The association did not store the data set (spool full, write error).
            log.error(
                "C-STORE of %s from %s refused: %s",
                str(message.command.get(0x1000, ""))[:64] or "?", assoc.peer, message.refused,
            )
            status, comment, header = OUT_OF_RESOURCES, message.refused, None
        elif message.receipt is None:
            # CommandDataSetType said no data set follows: nothing to store.
            log.warning(
                "C-STORE-RQ from %s of %s without a data set answered with 0xC000",
                assoc.calling_ae, str(message.command.get(0x1000, ""))[:64] or "?",
            )
            status, comment, header = CANNOT_UNDERSTAND, "C-STORE-RQ without a data set", None
        else:
            loop = asyncio.get_running_loop()
            status, comment, header = await loop.run_in_executor(
                self.executor, self._store, message, Sender(assoc.calling_ae, assoc.called_ae)
            )
        if status == SUCCESS:
            assoc.stats.stored += 1
            if header is not None:
                assoc.stats.studies.add(header.study_uid, header.sop_class_uid)
        else:
            assoc.stats.failed += 1
        if assoc.metrics is not None:
            assoc.metrics.store_answered(assoc.calling_ae, status == SUCCESS)
        extra: dict[int, int | str | tuple[int, ...]] = {0x0902: comment[:64]} if comment else {}
        await assoc.send_message(
            message.context.id, response(message.command, C_STORE_RSP, status, extra=extra)
        )

    def _store(self, message: Message, sender: Sender) -> tuple[int, str, InstanceHeader | None]:
        """Validate and spool one received file; returns (status, error comment, its UIDs
        when it could be read)."""
        assert message.receipt is not None
        command = message.command
        wait = self.config.dimse.ack_timeout if self.config.dimse.ack == "delivered" else None
        result = ingest(
            self.spool, message.receipt, sender,
            str(command.get(0x0002, "")), str(command.get(0x1000, "")), wait,
        )
        return STATUS[result.verdict], result.reason, result.header
