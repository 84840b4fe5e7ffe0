"""A facade DELETE against the spool: a batch on its way when the DELETE comes is
waited for, and what it delivered is deleted in the archive again."""

from __future__ import annotations

import asyncio

import pytest

from gateway.spool.queue import Outcome, Spool
from gateway.spool.record import Sender
from gateway.upstream.errors import NotFound, UpstreamUnavailable
from gateway.web import delete
from tests.spool.test_queue import STUDY, header, received, spool  # noqa: F401 - fixture


class Archive:
    """Records each DELETE; holds what ``held`` names (a study, series or instance)."""

    def __init__(self, held: set[tuple[str, ...]], down: bool = False) -> None:
        self.held = held
        self.down = down
        self.asked: list[tuple[str, ...]] = []

    async def _delete(self, *scope: str) -> None:
        self.asked.append(scope)
        if self.down:
            raise UpstreamUnavailable("archive unreachable")
        if scope not in self.held:
            raise NotFound("not there")

    async def delete_study(self, study: str) -> None:
        await self._delete(study)

    async def delete_series(self, study: str, series: str) -> None:
        await self._delete(study, series)

    async def delete_instance(self, study: str, series: str, instance: str) -> None:
        await self._delete(study, series, instance)


def test_a_batch_on_its_way_is_waited_for_and_deleted_again(spool: Spool) -> None:  # noqa: F811
    ids = [spool.enqueue(received(spool, n), header(n), Sender("MOD")) for n in range(3)]
    on_its_way = spool.claim(1, 10_000)
    archive = Archive(held={(STUDY,)})

    async def run() -> tuple[bool, int]:
        task = asyncio.create_task(delete._delete(spool, archive, (STUDY, None, None)))
        await asyncio.sleep(0.3)
        assert not task.done() and archive.asked == [(STUDY,)]  # deleted once, waiting for the batch
        spool.record(on_its_way, [Outcome(on_its_way[0].id, "delivered", "")])
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(run()) == (True, 2)
    assert archive.asked == [(STUDY,), (STUDY,)]  # again, for what the batch delivered
    assert [r["id"] for r in spool.list_rows(limit=10)] == [ids[0]]  # the delivered row, kept as delivered


def test_a_batch_that_fails_meanwhile_is_withdrawn_too(spool: Spool) -> None:  # noqa: F811
    for n in range(2):
        spool.enqueue(received(spool, n), header(n), Sender("MOD"))
    on_its_way = spool.claim(1, 10_000)
    archive = Archive(held=set())

    async def run() -> tuple[bool, int]:
        task = asyncio.create_task(delete._delete(spool, archive, (STUDY, None, None)))
        await asyncio.sleep(0.3)
        spool.record(on_its_way, [Outcome(on_its_way[0].id, "retry", "HTTP 503")])
        return await asyncio.wait_for(task, 5)

    assert asyncio.run(run()) == (False, 2)
    assert spool.list_rows(limit=10) == []


def test_an_archive_that_cannot_delete_leaves_the_spool_untouched(spool: Spool) -> None:  # noqa: F811
    for n in range(2):
        spool.enqueue(received(spool, n), header(n), Sender("MOD"))
    with pytest.raises(UpstreamUnavailable):
        asyncio.run(delete._delete(spool, Archive(held=set(), down=True), (STUDY, None, None)))
    assert len(spool.list_rows(limit=10)) == 2


def test_a_series_or_an_instance_is_withdrawn_alone(spool: Spool) -> None:  # noqa: F811
    spool.enqueue(received(spool, 0), header(0), Sender("MOD"))
    second = spool.enqueue(received(spool, 1), header(1), Sender("MOD"))
    instance = header(0)
    counts = spool.discard(STUDY, False, instance.series_uid, instance.sop_instance_uid, "deleted")
    assert counts["queued"] == 1
    assert [r["id"] for r in spool.list_rows(limit=10)] == [second]
    assert spool.discard(STUDY, False, "9.9.9", None, "deleted")["queued"] == 0  # another series: nothing
