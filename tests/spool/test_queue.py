"""The spool's state machine, durability bookkeeping and admin operations."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest

from gateway.config import Route, SpoolConfig
from gateway.header import InstanceHeader
from gateway.spool.copies import Copies
from gateway.spool.db import MIGRATIONS
from gateway.spool.queue import Outcome, Spool, SpoolFull
from gateway.spool.record import Sender
from gateway.sqlite import connect, migrate
from tests.support.corpus import sample_files

STUDY = "1.2.3.4"


def header(n: int, study: str = STUDY) -> InstanceHeader:
    return InstanceHeader(f"1.2.3.4.5.{n}", "1.2.840.10008.5.1.4.1.1.2", study, "1.2.3.4.6", "1.2.840.10008.1.2.1")


def received(spool: Spool, n: int, size: int = 100) -> Path:
    path = spool.incoming / f"tmp{n}.dcm"
    path.write_bytes(b"x" * size)
    return path


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, max_attempts=3))
    yield s
    s.close()


def test_enqueue_moves_file_and_claims_by_study(spool: Spool) -> None:
    ids = [spool.enqueue(received(spool, i), header(i), Sender("MOD")) for i in range(3)]
    other = spool.enqueue(received(spool, 9), header(9, "9.9"), Sender("MOD"))
    assert not any(spool.incoming.iterdir())
    batch = spool.claim(max_instances=10, max_bytes=10_000)
    assert [i.id for i in batch] == ids
    assert all(i.path.exists() and i.path.is_relative_to(spool.objects) for i in batch)
    assert spool.status()["counts"]["sending"] == 3
    assert [i.id for i in spool.claim(10, 10_000)] == [other]
    assert spool.claim(10, 10_000) == []


def test_batch_limits(spool: Spool) -> None:
    for i in range(5):
        spool.enqueue(received(spool, i, size=400), header(i), Sender("MOD"))
    assert len(spool.claim(max_instances=2, max_bytes=10_000)) == 2
    assert len(spool.claim(max_instances=10, max_bytes=1000)) == 2  # 800 bytes fit, 1200 do not
    assert len(spool.claim(max_instances=10, max_bytes=10)) == 1  # always at least one


def test_file_names_never_come_from_uids(spool: Spool) -> None:
    evil = InstanceHeader("../../etc/passwd", "1.2", "../../../tmp", "..", "1.2")
    row = spool.enqueue(received(spool, 1), evil, Sender("MOD"))
    (inst,) = spool.claim(1, 10_000)
    assert inst.id == row and inst.path.resolve().is_relative_to(spool.objects.resolve())
    assert ".." not in inst.path.name


def test_retry_backoff_then_dead(spool: Spool) -> None:
    spool.enqueue(received(spool, 1), header(1), Sender("MOD"))
    for attempt in range(1, 4):
        (inst,) = spool.claim(1, 10_000)
        assert inst.attempts == attempt
        states = spool.record([inst], [Outcome(inst.id, "retry", "HTTP 503")])
        if attempt < 3:
            assert states[inst.id] == "failed"
            assert spool.claim(1, 10_000) == []  # not due yet
            with spool.db.connection() as db:
                db.execute("UPDATE instances SET next_attempt_at = 0")
    assert states[inst.id] == "dead"
    (row,) = spool.list_rows("dead")
    assert "gave up after 3 attempts: HTTP 503" in row["last_error"]
    assert spool.retry(dead=True) == 1
    assert spool.claim(1, 10_000)[0].attempts == 1


def test_retry_after_is_honoured(spool: Spool) -> None:
    spool.enqueue(received(spool, 1), header(1), Sender("MOD"))
    (inst,) = spool.claim(1, 10_000)
    spool.record([inst], [Outcome(inst.id, "retry", "429", retry_after=120)])
    assert 100 < (spool.next_due_in() or 0) <= 120


def test_rejected_is_dead_at_once(spool: Spool) -> None:
    spool.enqueue(received(spool, 1), header(1), Sender("MOD"))
    (inst,) = spool.claim(1, 10_000)
    assert spool.record([inst], [Outcome(inst.id, "rejected", "HTTP 400")]) == {inst.id: "dead"}


def test_configuration_refusal_uses_no_attempt_and_never_kills(spool: Spool) -> None:
    """A 401/404 is the gateway's problem: held rows stay due, past max_attempts (3)."""
    row = spool.enqueue(received(spool, 1), header(1), Sender("MOD"))
    for _ in range(5):
        (inst,) = spool.claim(1, 10_000)
        assert spool.record([inst], [Outcome(inst.id, "config", "HTTP 401")]) == {row: "failed"}
    (stored,) = spool.list_rows()
    assert (stored["state"], stored["attempts"], stored["last_error"]) == ("failed", 0, "HTTP 401")
    assert spool.next_due_in() == 0.0


def test_answer_waiters_while_held(spool: Spool) -> None:
    row = spool.enqueue(received(spool, 1), header(1), Sender("MOD"), watch=True)
    spool.answer_waiters("config", "held")
    outcome = spool.wait_outcome(row, timeout=0.1)
    assert outcome is not None and outcome.kind == "config"
    assert spool.status()["counts"]["queued"] == 1


def test_recover_requeues_sending_and_drops_partial_files(spool: Spool) -> None:
    spool.enqueue(received(spool, 1), header(1), Sender("MOD"))
    spool.claim(1, 10_000)
    (spool.incoming / "half-received.dcm").write_bytes(b"partial")
    assert spool.recover() == (1, 0)
    assert spool.status()["counts"]["queued"] == 1
    assert not any(spool.incoming.iterdir())


def test_recover_adopts_files_whose_rows_were_lost(spool: Spool) -> None:
    """The row commit is not fsynced: after a power cut a durable file may have no row."""
    sample = sample_files()[0]
    shutil.copy(sample, spool.objects / "ab" / "lost.dcm")
    (spool.objects / "ab" / "junk.dcm").write_bytes(b"not dicom")
    assert spool.recover() == (0, 1)
    (row,) = spool.list_rows("queued")
    assert row["sop_instance_uid"] == str(pydicom.dcmread(sample, stop_before_pixels=True).SOPInstanceUID)
    assert (spool.objects / "ab" / "junk.unreadable").exists()
    assert spool.recover() == (0, 0)


def test_space_floor_refuses_and_removes_file(tmp_path: Path) -> None:
    s = Spool(SpoolConfig(directory=tmp_path / "s", min_free_mb=10**9))
    path = received(s, 1)
    with pytest.raises(SpoolFull):
        s.enqueue(path, header(1), Sender("MOD"))
    assert not path.exists()
    assert s.status()["counts"]["queued"] == 0
    s.close()


def test_purge_delivered(spool: Spool) -> None:
    spool.enqueue(received(spool, 1), header(1), Sender("MOD"))
    (inst,) = spool.claim(1, 10_000)
    spool.record([inst], [Outcome(inst.id, "delivered")])
    assert spool.purge_delivered(older_than_seconds=3600) == 0
    assert spool.purge_delivered() == 1
    assert not inst.path.exists()


def test_wait_outcome_for_ack_delivered(spool: Spool) -> None:
    row = spool.enqueue(received(spool, 1), header(1), Sender("MOD"), watch=True)

    def deliver() -> None:
        time.sleep(0.1)
        (inst,) = spool.claim(1, 10_000)
        spool.record([inst], [Outcome(inst.id, "delivered")])

    threading.Thread(target=deliver).start()
    outcome = spool.wait_outcome(row, timeout=5)
    assert outcome is not None and outcome.kind == "delivered"


def test_concurrent_enqueue_from_many_threads(spool: Spool) -> None:
    def worker(base: int) -> None:
        for i in range(25):
            spool.enqueue(received(spool, base + i), header(base + i), Sender("MOD"))

    threads = [threading.Thread(target=worker, args=(n * 1000,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert spool.status()["counts"]["queued"] == 200


def test_objects_subdirectories_are_made_at_open(spool: Spool) -> None:
    """enqueue never creates a directory: all 256 exist (and were fsynced) at open."""
    assert sorted(p.name for p in spool.objects.iterdir()) == [f"{n:02x}" for n in range(256)]


def test_spool_database_full_is_spool_full(spool: Spool) -> None:
    """SQLITE_FULL on the insert (decided on the error code, which a failed rollback
    must not mask) refuses the instance and removes its file."""
    with spool.db.connection() as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(SpoolFull):
        # A row too big for the pages left (a long calling AE title stands in for a
        # database that grew to the end of the disk).
        spool.enqueue(received(spool, 1), header(1), Sender("MOD" * 2000))
    assert not list(spool.objects.glob("*/*.dcm")) and not any(spool.incoming.iterdir())
    assert spool.status()["counts"]["queued"] == 0


def test_cap_counts_files_being_received_and_eviction_takes_only_delivered_oldest_first(tmp_path: Path) -> None:
    """``max_size_mb``: the instances spooled plus those still arriving in incoming/;
    eviction goes by delivery time down to 80 % of the cap and never touches a row
    that is not delivered, however old."""
    s = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, max_size_mb=1))
    try:
        chunk = 240 * 1024
        ids = [s.enqueue(received(s, i, size=chunk), header(i), Sender("MOD")) for i in range(4)]
        assert s.used_bytes() == 4 * chunk and s.space_problem() is None
        assert s.limits_near() == {"floor": False, "cap": True}  # 94 % of the cap
        partial = received(s, 99, size=100 * 1024)  # a C-STORE still arriving
        assert s.used_bytes() == 5 * chunk - 140 * 1024
        assert "over its cap of 1 MiB" in (s.space_problem() or "")
        with pytest.raises(SpoolFull, match="over its cap"):
            s.enqueue(partial, header(99), Sender("MOD"))
        assert not partial.exists() and s.used_bytes() == 4 * chunk

        # ids[0], received first, is still being sent; ids[3] was delivered first.
        batch = {i.id: i for i in s.claim(10, 10**9)}
        for row_id in (ids[3], ids[1], ids[2]):
            s.record([batch[row_id]], [Outcome(row_id, "delivered")])
            time.sleep(0.01)
        assert s.evict_delivered() == 1
        left = {row["id"]: row["state"] for row in s.list_rows()}
        assert left == {ids[0]: "sending", ids[1]: "delivered", ids[2]: "delivered"}
        assert not batch[ids[3]].path.exists() and batch[ids[0]].path.exists()
        assert s.used_bytes() == 3 * chunk <= 0.8 * 2**20
        assert s.evict_delivered() == 0
    finally:
        s.close()


def test_a_spool_from_before_the_tallies_is_counted_when_opened(tmp_path: Path) -> None:
    """A spool written by a version before migration v11 holds rows and copies: the
    migration fills the tallies from them, and the status reads what a count says
    (the package's conftest compares every tally with the rows when it closes)."""
    directory = tmp_path / "spool"
    directory.mkdir()
    db = connect(directory / "spool.sqlite")
    migrate(db, MIGRATIONS[:10])
    db.conn.executemany(
        "INSERT INTO instances (sop_instance_uid, study_uid, file, size, received_at, state) VALUES (?,?,?,?,?,?)",
        [(f"1.2.3.{n}", STUDY, f"objects/{n}", 10 + n, 1e9, state) for n, state in enumerate(["queued", "dead", "delivered", "delivered"])],
    )
    db.execute("INSERT INTO copies (instance_id, destination, state) VALUES (3, 'AI', 'failed'), (4, 'AI', 'delivered')")
    db.conn.commit()
    db.close()
    spool = Spool(SpoolConfig(directory=directory, min_free_mb=0))
    try:
        status = spool.status()
        assert status["counts"] == {"queued": 1, "sending": 0, "delivered": 2, "failed": 0, "dead": 1}
        assert status["bytes"] == {"queued": 10, "sending": 0, "delivered": 25, "failed": 0, "dead": 11}
        assert status["routes"]["AI"]["counts"] == {"queued": 0, "sending": 0, "delivered": 1, "failed": 1, "dead": 0}
    finally:
        spool.close()


def test_study_in_spool_groups_by_series_state_sender_and_reason(spool: Spool) -> None:
    """What `dicom-gateway study` shows of the spool: per series, counts per state, the
    senders, and each reason of a failed or dead instance with how many it holds."""
    from gateway.spool.study import study_in_spool

    def in_series(n: int, series: str) -> InstanceHeader:
        return InstanceHeader(f"1.2.3.4.5.{n}", "1.2.840.10008.5.1.4.1.1.2", STUDY, series, "1.2.840.10008.1.2.1")

    for n in range(4):
        spool.enqueue(received(spool, n), in_series(n, "1.2.3.4.6"), Sender("CT01" if n < 3 else "MR01"))
    spool.enqueue(received(spool, 9), in_series(9, "1.2.3.4.7"), Sender("CT01"))
    spool.enqueue(received(spool, 10), header(10, "9.9"), Sender("CT01"))  # another study
    batch = spool.claim(10, 10_000)
    outcomes = {0: Outcome(batch[0].id, "delivered"), 1: Outcome(batch[1].id, "rejected", "HTTP 400"),
                2: Outcome(batch[2].id, "rejected", "HTTP 400"), 3: Outcome(batch[3].id, "retry", "HTTP 503")}
    spool.record(batch[:4], list(outcomes.values()))
    spool.release(batch[4:])

    first, second = study_in_spool(spool.db, STUDY)
    assert first.series_uid == "1.2.3.4.6" and second.series_uid == "1.2.3.4.7"
    assert first.states == {"queued": 0, "sending": 0, "delivered": 1, "failed": 1, "dead": 2}
    assert first.calling_aes == {"CT01": 3, "MR01": 1} and first.instances == 4
    assert first.errors == {("dead", "HTTP 400"): 2, ("failed", "HTTP 503"): 1}
    assert first.last_delivered is not None and first.first_received <= first.last_received
    assert second.states["queued"] == 1 and second.errors == {} and second.last_delivered is None
    assert study_in_spool(spool.db, "7.7.7") == []


def test_discard_takes_undelivered_rows_and_files_but_not_one_being_sent(spool: Spool) -> None:
    ids = [spool.enqueue(received(spool, n), header(n), Sender("MOD")) for n in range(4)]
    other = spool.enqueue(received(spool, 9), header(9, "9.9"), Sender("MOD"))
    sending = spool.claim(1, 10_000)  # the first row, on its way
    (dead,) = [i for i in spool.claim(1, 10_000)]
    spool.record([dead], [Outcome(dead.id, "rejected", "HTTP 400")])
    files = {r["id"]: spool.directory / r["file"] for r in spool.list_rows(limit=10)}

    assert spool.discard(STUDY) == {"queued": 2, "failed": 0, "dead": 1, "sending": 1, "copies": 0, "copies_sending": 0}
    assert len(spool.list_rows(study_uid=STUDY)) == 4  # a dry run changes nothing

    assert spool.discard(STUDY, dry_run=False) == {"queued": 2, "failed": 0, "dead": 1, "sending": 1, "copies": 0, "copies_sending": 0}
    left = spool.list_rows(limit=10)
    assert {r["id"] for r in left} == {sending[0].id, other}
    assert [files[i].exists() for i in ids] == [True, False, False, False]
    assert spool.status()["bytes"]["queued"] == 100  # the other study's


def test_routes_make_copies_that_keep_their_file_until_delivered(tmp_path: Path) -> None:
    routes = (Route("AI", frozenset({"CT01"})), Route("OLD", sop_classes=frozenset({"1.2.840.10008.5.1.4.1.1.4"})))
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, max_attempts=3), routes)
    copies = Copies(spool)
    try:
        routed = spool.enqueue(received(spool, 1), header(1), Sender("CT01"))  # CT: AI only
        spool.enqueue(received(spool, 2), header(2), Sender("MR01"))  # neither
        assert spool.status()["routes"]["AI"]["counts"]["queued"] == 1 and "OLD" not in spool.status()["routes"]
        assert copies.claim("OLD", 10) == []
        for inst in spool.claim(10, 10_000):
            spool.record([inst], [Outcome(inst.id, "delivered")])
        assert spool.purge_delivered() == 1  # the unrouted one; the routed file waits for its copy
        (copy,) = copies.claim("AI", 10)
        assert spool.recover() == (1, 0)  # a crash while it was being sent: queued again
        (copy,) = copies.claim("AI", 10)
        assert copy.instance.id == routed and copy.instance.path.exists() and copy.instance.attempts == 2
        assert copies.record([(copy, "retry", "destination down")]) == {copy.id: "failed"}
        assert copies.claim("AI", 10) == []  # not due yet
        assert copies.retry(dead=True) == 0
        with spool.db.connection() as db:
            db.execute("UPDATE copies SET next_attempt_at = 0")
        (copy,) = copies.claim("AI", 10)
        assert copies.record([(copy, "retry", "destination down")]) == {copy.id: "dead"}  # max_attempts = 3
        assert "gave up after 3 attempts" in spool.status()["routes"]["AI"]["last_error"]
        assert spool.purge_delivered() == 0
        assert copies.retry(dead=True) == 1
        (copy,) = copies.claim("AI", 10)
        assert copies.record([(copy, "delivered", "")]) == {copy.id: "delivered"}
        assert spool.purge_delivered() == 1 and spool.status()["routes"] == {}
        assert not copy.instance.path.exists()
    finally:
        spool.close()


def test_a_copy_being_sent_when_its_study_is_discarded_is_never_tried_again(tmp_path: Path) -> None:
    """A study sent under the wrong patient, discarded while a route sends one of its
    copies to a destination that is down: that send fails, and the copy must not be
    tried again once the destination is back (it went back to the queue before). The
    discard counts it; one that arrives meanwhile is still reported delivered."""
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, max_attempts=3), (Route("AI", frozenset({"CT01"})),))
    copies = Copies(spool)
    try:
        for n in range(3):
            spool.enqueue(received(spool, n), header(n), Sender("CT01"))
        for inst in spool.claim(10, 10_000):
            spool.record([inst], [Outcome(inst.id, "delivered")])
        failing, arriving = copies.claim("AI", 2)  # on their way when the discard runs
        assert spool.discard(STUDY) == {"queued": 0, "failed": 0, "dead": 0, "sending": 0, "copies": 3, "copies_sending": 2}
        assert spool.discard(STUDY, dry_run=False)["copies_sending"] == 2
        assert copies.record([(failing, "retry", "destination down"), (arriving, "delivered", "")]) == {
            failing.id: "withdrawn", arriving.id: "delivered",
        }
        with spool.db.connection() as db:
            db.execute("UPDATE copies SET next_attempt_at = 0")
        assert copies.claim("AI", 10) == [] and copies.next_due_in("AI") is None
        assert copies.retry(study_uid=STUDY) == 0
        assert spool.status()["routes"] == {}  # nothing left for AI: the copies' files may go
    finally:
        spool.close()


def test_a_record_adopted_after_a_power_cut_keeps_its_sender_and_its_routes(tmp_path: Path) -> None:
    cfg = SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0)
    instance = sample_files()[0].read_bytes()
    spool = Spool(cfg)
    receipt = spool.receive()
    receipt.write(instance[128:])
    receipt.seal(Sender("CT01", "GW_AI"))  # acknowledged; the power went before its row was written
    spool.close()

    routes = (Route("AI", frozenset({"CT01"})), Route("LAB", called_ae=frozenset({"GW_AI"})), Route("X", called_ae=frozenset({"GW_X"})))
    spool = Spool(cfg, routes)
    try:
        assert spool.recover() == (0, 1)
        (row,) = spool.list_rows("queued")
        assert (row["calling_ae"], row["called_ae"]) == ("CT01", "GW_AI")
        assert {d: r["counts"]["queued"] for d, r in spool.status()["routes"].items()} == {"AI": 1, "LAB": 1}
    finally:
        spool.close()


def test_a_route_on_the_called_ae_title_copies_only_what_was_sent_to_that_title(tmp_path: Path) -> None:
    routes = (Route("AI", called_ae=frozenset({"GW_AI"})),)
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0), routes)
    try:
        routed = spool.enqueue(received(spool, 1), header(1), Sender("CT01", "GW_AI"))
        spool.enqueue(received(spool, 2), header(2), Sender("CT01", "DICOMGW"))
        spool.enqueue(received(spool, 3), header(3), Sender("STOW-RS 127.0.0.1"))  # STOW-RS calls no AE title
        (copy,) = Copies(spool).claim("AI", 10)
        assert copy.instance.id == routed
        assert [r["id"] for r in spool.list_rows(called_ae="GW_AI")] == [routed]
    finally:
        spool.close()


def test_no_retry_waits_longer_than_retry_max_seconds(tmp_path: Path) -> None:
    """An archive's (or a proxy's) absurd Retry-After, and a wall clock set back after
    retries were scheduled (an NTP step at boot, a VM restored from a snapshot), both
    left instances parked for as long; a pause is never longer than retry_max_seconds."""
    routes = (Route("AI", frozenset({"MOD"})),)
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, retry_max_seconds=0.3), routes)
    copies = Copies(spool)
    try:
        first = spool.enqueue(received(spool, 1), header(1), Sender("MOD"))
        spool.enqueue(received(spool, 2), header(2), Sender("MOD"))
        (inst,) = spool.claim(1, 10_000)
        spool.record([inst], [Outcome(inst.id, "retry", "HTTP 503", retry_after=99_999_999)])
        with spool.db.connection() as db:
            (due,) = db.execute("SELECT next_attempt_at FROM instances WHERE id = ?", [inst.id]).fetchone()
        assert due <= time.time() + 0.3
        # every retry pushed ten days ahead: the clock has since been set back that much
        spool.claim(10, 10_000)
        with spool.db.connection() as db:
            db.execute("UPDATE instances SET state='failed', next_attempt_at=?", [time.time() + 10 * 86400])
            db.execute("UPDATE copies SET state='failed', next_attempt_at=?", [time.time() + 10 * 86400])
        assert spool.claim(10, 10_000) == [] and copies.claim("AI", 10) == []  # nothing due now...
        assert spool.next_due_in() <= 0.3 and copies.next_due_in("AI") <= 0.3  # ...but soon
        time.sleep(0.35)
        assert {i.id for i in spool.claim(10, 10_000)} == {first, first + 1}
        assert len(copies.claim("AI", 10)) == 2
    finally:
        spool.close()
