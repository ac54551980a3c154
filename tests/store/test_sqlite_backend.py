"""The StoreBackend suite bound to SQLite, plus the few behaviours only SQLite has."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
import threading
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from keel_core.errors import ErrorCategory
from store_service.backend import AppendResult, Expected, NewArtifact, NewEvent, StoreBackend
from store_service.group_commit import AppendJob, AppendOutcome
from store_service.sqlite import DATABASE_FILE, SqliteStoreBackend, translate
from store_service.sqlite.writer import COPIED_PAYLOAD_BYTES, ROWS_PER_STATEMENT, SqliteWriter
from tests.store.backend_suite import StoreBackendSuite, chunks_of, events, read_all


class SqliteTables:
    """Counts rows in the SQLite file of the test's tmp_path, on a connection of the test's own."""

    async def count_artifact_rows(self, request: pytest.FixtureRequest) -> tuple[int, int]:
        """(artifact rows, artifact chunk rows) in tmp_path/keel-store.sqlite3."""
        path = request.getfixturevalue("tmp_path") / DATABASE_FILE
        with contextlib.closing(sqlite3.connect(path)) as conn:
            artifacts = conn.execute("SELECT count(*) FROM artifacts").fetchone()[0]
            chunks = conn.execute("SELECT count(*) FROM artifact_chunks").fetchone()[0]
        return int(artifacts), int(chunks)


class TestSqliteBackend(SqliteTables, StoreBackendSuite):
    """Every contract test, on a SQLite file in the test's tmp_path."""

    def create_backend(self, request: pytest.FixtureRequest) -> StoreBackend:
        """A backend on tmp_path/keel-store.sqlite3 with full durability."""
        return SqliteStoreBackend.in_directory(request.getfixturevalue("tmp_path"), durability="full")


class TestSqliteNormalDurability(SqliteTables, StoreBackendSuite):
    """The same contract with synchronous=NORMAL: only crash durability differs, not semantics."""

    def create_backend(self, request: pytest.FixtureRequest) -> StoreBackend:
        """A backend on tmp_path with durability 'normal'."""
        return SqliteStoreBackend.in_directory(request.getfixturevalue("tmp_path"), durability="normal")


async def test_database_is_in_wal_mode_with_full_sync(tmp_path: object) -> None:
    """SQLite-specific: the file is WAL, the writer commits with synchronous=FULL (2)."""
    backend = SqliteStoreBackend.in_directory(str(tmp_path))
    await backend.open()
    try:
        await backend.append("s", Expected.any(), events("a"))
        assert await backend.synchronous() == 2
    finally:
        await backend.close()
    with sqlite3.connect(backend.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert backend.path.name == DATABASE_FILE


async def test_new_artifacts_chunks_are_keyed_in_the_order_they_were_stored(tmp_path: object) -> None:
    """SQLite-specific: blob ids sort by when they were made (UUIDv7's layout), so new chunk rows go
    to the end of artifact_chunks' key order (a random id put each on a page of its own)."""
    backend = SqliteStoreBackend.in_directory(str(tmp_path))
    await backend.open()
    try:
        for i in range(20):  # inline, on the writer thread or the loop's
            await backend.append(
                f"s{i}", Expected.any(), events("a"), artifacts=[NewArtifact("k", b"%d" % i)]
            )
        await backend.put_artifact("k", chunks_of(b"uploaded", 3))
    finally:
        await backend.close()
    with sqlite3.connect(backend.path) as conn:
        blob_ids = [str(row[0]) for row in conn.execute("SELECT blob_id FROM artifacts ORDER BY rowid")]
    assert len(set(blob_ids)) == len(blob_ids) == 21
    assert blob_ids == sorted(blob_ids)
    assert {uuid.UUID(blob_id).version for blob_id in blob_ids} == {7}


async def test_interrupted_upload_leaves_no_chunks_after_reopen(tmp_path: object) -> None:
    """SQLite-specific: staged chunks of an upload that never finished are swept on open."""
    backend = SqliteStoreBackend.in_directory(str(tmp_path))
    await backend.open()

    async def broken() -> AsyncIterator[bytes]:
        async for chunk in chunks_of(b"x" * (9 * 1024 * 1024), 1024 * 1024):
            yield chunk
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError):
        await backend.put_artifact("partial", broken())
    await backend.close()
    reopened = SqliteStoreBackend.in_directory(str(tmp_path))
    await reopened.open()
    await reopened.close()
    with sqlite3.connect(reopened.path) as conn:
        assert conn.execute("SELECT count(*) FROM artifact_chunks").fetchone()[0] == 0


OLD_SCHEMA = """
CREATE TABLE streams (sid INTEGER PRIMARY KEY, stream_id TEXT NOT NULL UNIQUE, head_seq INTEGER NOT NULL,
    status INTEGER NOT NULL DEFAULT 0, created_at_us INTEGER NOT NULL, updated_at_us INTEGER NOT NULL);
CREATE TABLE events (stream_id TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL,
    payload BLOB NOT NULL, recorded_at_us INTEGER NOT NULL, PRIMARY KEY (stream_id, seq));
INSERT INTO streams VALUES (1, 'old', 1, 1, 10, 10);
INSERT INTO events VALUES ('old', 1, 'a', x'61', 10);
"""


def older_store_file(directory: object, more_sql: str = "") -> str:
    """A store file as an older store left it (OLD_SCHEMA, then `more_sql`), in `directory`."""
    path = os.path.join(str(directory), DATABASE_FILE)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.executescript(OLD_SCHEMA + more_sql)
    return path


async def test_file_of_an_older_store_gains_stream_attributes(tmp_path: object) -> None:
    """SQLite-specific: a file written before attributes existed opens, keeps its streams, and
    takes attributes from then on."""
    path = older_store_file(tmp_path)
    backend = SqliteStoreBackend(path)
    await backend.open()
    try:
        listed = await backend.list_streams()
        assert [(s.stream_id, dict(s.attributes)) for s in listed.streams] == [("old", {})]
        await backend.append("old", Expected.exact(1), events("b"), attributes={"k": "v"})
        listed = await backend.list_streams(attributes={"k": "v"})
        assert [(s.stream_id, s.head_seq) for s in listed.streams] == [("old", 2)]
    finally:
        await backend.close()


async def test_file_of_an_older_store_gains_the_end_time_of_finished_streams(tmp_path: object) -> None:
    """SQLite-specific: a file written before streams had an end time gains the column; a stream
    that had already finished takes its last append's time, and appends keep it from then on."""
    path = older_store_file(tmp_path, "INSERT INTO streams VALUES (2, 'done', 1, 2, 10, 70);")
    backend = SqliteStoreBackend(path)
    await backend.open()
    try:
        listed = {s.stream_id: s for s in (await backend.list_streams()).streams}
        assert (listed["done"].ended_at_us, listed["old"].ended_at_us) == (70, 0)
        assert [s.stream_id for s in (await backend.list_streams(max_duration_us=60)).streams] == ["done"]
        await backend.append("done", Expected.exact(1), events("late"))
        listed = {s.stream_id: s for s in (await backend.list_streams()).streams}
        assert listed["done"].ended_at_us == 70
    finally:
        await backend.close()


async def test_file_of_an_older_store_gains_append_keys(tmp_path: object) -> None:
    """SQLite-specific: a file written before appends had keys gains the column and its unique
    index; its events keep no key, and keyed appends repeat from then on."""
    path = older_store_file(tmp_path)
    backend = SqliteStoreBackend(path)
    await backend.open()
    try:
        await backend.append("old", Expected.any(), events("b"), append_key="k")
        again = await backend.append("old", Expected.any(), events("b"), append_key="k")
        assert (again.first_seq, again.repeated) == (2, True)
        assert [e.type for e in await read_all(backend, "old")] == ["a", "b"]
    finally:
        await backend.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        indexes = [row[1] for row in conn.execute("PRAGMA index_list(events)") if row[2]]
        assert "events_by_append_key" in indexes
        with pytest.raises(sqlite3.IntegrityError):  # the index, not only the store's lookup
            conn.execute("INSERT INTO events VALUES ('old', 9, 'x', x'00', 1, 'k')")


async def test_a_group_stores_every_payload_as_a_blob_and_each_key_on_its_first_event(tmp_path: Path) -> None:
    """SQLite-specific: the writer binds small payloads as bytearrays and writes an unkeyed event's
    NULL key into its statement. One group of keyed and unkeyed appends, of one event and of
    several, with empty payloads and one over COPIED_PAYLOAD_BYTES, stores every payload as the BLOB
    it was sent as and each key on its append's first event only."""

    loop = asyncio.get_running_loop()
    appends = [
        ("a", [NewEvent("a1", b"\x00\xff"), NewEvent("a2", b""), NewEvent("a3", b"{}")], "ka"),
        ("b", [NewEvent("b1", b"")], None),
        ("c", [NewEvent("c1", b"1"), NewEvent("c2", b"\x02" * (COPIED_PAYLOAD_BYTES + 1))], None),
        ("d", [NewEvent("d1", b"")], "kd"),
        ("a", [NewEvent("a4", b"4")], "ka4"),
    ]
    jobs = [
        AppendJob(sid, Expected.any(), events, None, (), loop.create_future(), append_key=key)
        for sid, events, key in appends
    ]
    writer = SqliteWriter(tmp_path / "writer.sqlite3", "full")
    try:
        outcomes = writer.commit_appends(jobs)
        rows = writer.conn.execute(
            "SELECT stream_id, seq, type, typeof(payload), payload, append_key FROM events "
            "ORDER BY stream_id, seq"
        ).fetchall()
    finally:
        writer.close()
    assert [(o.first_seq, o.head_seq) for o in outcomes if isinstance(o, AppendResult)] == [
        (1, 3),
        (1, 1),
        (1, 2),
        (1, 1),
        (4, 4),
    ]
    assert rows == [
        ("a", 1, "a1", "blob", b"\x00\xff", "ka"),
        ("a", 2, "a2", "blob", b"", None),
        ("a", 3, "a3", "blob", b"{}", None),
        ("a", 4, "a4", "blob", b"4", "ka4"),
        ("b", 1, "b1", "blob", b"", None),
        ("c", 1, "c1", "blob", b"1", None),
        ("c", 2, "c2", "blob", b"\x02" * (COPIED_PAYLOAD_BYTES + 1), None),
        ("d", 1, "d1", "blob", b"", "kd"),
    ]


async def test_a_group_past_a_statements_rows_keeps_every_key_on_its_first_event(tmp_path: Path) -> None:
    """SQLite-specific: 250 keyed appends and a 450-event unkeyed one in one group take more than
    one statement of each row shape (ROWS_PER_STATEMENT); every event is stored once, each key on
    its append's first event, and a repeat of a key answers as the first."""
    assert ROWS_PER_STATEMENT < 250 < 450
    loop = asyncio.get_running_loop()
    jobs = [
        AppendJob(
            f"k{i}",
            Expected.any(),
            [NewEvent("a", b"1"), NewEvent("b", b"2")],
            None,
            (),
            loop.create_future(),
            append_key=f"key{i}",
        )
        for i in range(250)
    ]
    jobs.append(AppendJob("long", Expected.any(), events(*["e"] * 450), None, (), loop.create_future()))
    jobs.append(
        AppendJob("k7", Expected.any(), events("again"), None, (), loop.create_future(), append_key="key7")
    )
    writer = SqliteWriter(tmp_path / "writer.sqlite3", "full")
    try:
        outcomes = writer.commit_appends(jobs)
        keyed = writer.conn.execute(
            "SELECT stream_id, seq, append_key FROM events WHERE append_key IS NOT NULL ORDER BY stream_id"
        ).fetchall()
        counted = writer.conn.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        writer.close()
    assert sorted(keyed) == sorted((f"k{i}", 1, f"key{i}") for i in range(250))
    assert counted == 250 * 2 + 450
    repeat = outcomes[-1]
    assert isinstance(repeat, AppendResult)
    assert (repeat.first_seq, repeat.repeated) == (1, True)


def test_unknown_durability_is_refused(tmp_path: object) -> None:
    """A typo in the durability setting fails loudly instead of silently picking one."""
    with pytest.raises(ValueError, match="durability"):
        SqliteStoreBackend.in_directory(str(tmp_path), durability="fast")  # type: ignore[arg-type]


async def test_normal_durability_runs_with_synchronous_normal(tmp_path: object) -> None:
    """SQLite-specific: the 'normal' setting really is synchronous=NORMAL (1)."""
    backend = SqliteStoreBackend.in_directory(str(tmp_path), durability="normal")
    await backend.open()
    try:
        assert await backend.synchronous() == 1
    finally:
        await backend.close()


def test_driver_errors_become_keel_errors() -> None:
    """SQLite-specific: a busy or broken database is UNAVAILABLE (retryable), other faults INTERNAL."""
    busy = translate(sqlite3.OperationalError("database is locked"))
    assert (busy.code, busy.category, busy.retryable) == (
        "store_unavailable",
        ErrorCategory.UNAVAILABLE,
        True,
    )
    broken = translate(sqlite3.DatabaseError("file is not a database"))
    assert (broken.code, broken.category) == ("store_failed", ErrorCategory.INTERNAL)


async def test_hundred_mib_artifact_round_trips_in_bounded_memory(tmp_path: object) -> None:
    """SQLite-specific: put and get stream through chunk rows; Python never holds the whole artifact."""
    backend = SqliteStoreBackend.in_directory(str(tmp_path))
    await backend.open()
    block = os.urandom(1024 * 1024)
    sent = hashlib.sha256()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(100):
            chunk = i.to_bytes(4, "big") + block[4:]
            sent.update(chunk)
            yield chunk

    tracemalloc.start()
    try:
        put = await backend.put_artifact("model", chunks())
        got = await backend.get_artifact(put.artifact_id)
        received = hashlib.sha256()
        async for chunk in got.chunks:
            received.update(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await backend.close()
    assert put.size == got.info.size == 100 * 1024 * 1024
    assert put.artifact_id == "sha256:" + sent.hexdigest() == "sha256:" + received.hexdigest()
    assert peak < 16 * 1024 * 1024, f"peak Python memory {peak / 2**20:.1f} MiB"


async def test_put_cancelled_while_its_publish_commits_keeps_the_artifact_whole(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite-specific (its staged uploads): a put cancelled after publishing must not drop the chunks.

    The publish job is slowed on the writer thread so that the caller's cancellation lands while
    it commits; the clean-up queued by the cancellation must then leave the published chunks.
    """
    import threading

    from store_service.sqlite import writer as sqlite_writer

    publishing = threading.Event()
    real_publish = sqlite_writer.SqliteWriter.publish

    def slow_publish(self: sqlite_writer.SqliteWriter, **kwargs: object) -> bool:
        publishing.set()
        threading.Event().wait(0.3)  # a slow fsync, on the writer thread
        return real_publish(self, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_writer.SqliteWriter, "publish", slow_publish)
    backend = SqliteStoreBackend.in_directory(str(tmp_path))
    await backend.open()
    try:
        data = os.urandom(5 * 1024 * 1024 + 10)  # large enough to be staged before publishing
        put = asyncio.create_task(backend.put_artifact("blob", chunks_of(data, 1024 * 1024)))
        assert await asyncio.to_thread(publishing.wait, 30)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        await backend.append("after", Expected.any(), events("x"))  # the queued clean-up has run
        artifact_id = "sha256:" + hashlib.sha256(data).hexdigest()
        got = await backend.get_artifact(artifact_id)
        assert b"".join([chunk async for chunk in got.chunks]) == data
    finally:
        await backend.close()


class CommitThreads:
    """Records the thread each group of appends is committed on (SqliteWriter.commit_appends), and
    makes the backend's choice of thread independent of the machine's speed: every turn of the loop
    counts as idle, and a commit takes no time on the backend's clock unless `slow` says otherwise."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from store_service.sqlite import backend as sqlite_backend
        from store_service.sqlite import writer as sqlite_writer

        self.threads: list[int] = []
        self.lock_waits_ms: list[int] = []  # how long each would wait for another's write lock
        self.loop_thread = threading.get_ident()  # made by the test, on the event loop's thread
        self.slow: Callable[[bool], bool] = lambda on_loop: False  # whether a commit took long
        self._now = 0.0
        self._jump = 0.0
        real = sqlite_writer.SqliteWriter.commit_appends

        def recording(writer: sqlite_writer.SqliteWriter, group: Sequence[AppendJob]) -> list[AppendOutcome]:
            self.threads.append(threading.get_ident())
            self.lock_waits_ms.append(int(writer.conn.execute("PRAGMA busy_timeout").fetchone()[0]))
            outcomes = real(writer, group)
            if self.slow(self.threads[-1] == self.loop_thread):
                self._jump = 1.0  # the backend reads its clock next when the commit has returned
            return outcomes

        monkeypatch.setattr(sqlite_writer.SqliteWriter, "commit_appends", recording)
        monkeypatch.setattr(sqlite_backend, "BUSY_TURN_S", 3600.0)
        monkeypatch.setattr(sqlite_backend, "time", SimpleNamespace(perf_counter=self._perf_counter))

    def _perf_counter(self) -> float:
        self._now += self._jump
        self._jump = 0.0
        return self._now

    def on_loop(self) -> list[bool]:
        """For each commit so far, whether it ran on the event loop's thread."""
        return [thread == self.loop_thread for thread in self.threads]


async def test_a_lone_callers_appends_skip_the_writer_thread(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite-specific: one caller appending to its own stream (an exact head), one append after
    another, has its commits made on the event loop's thread once INLINE_AFTER_SINGLES have gone
    through the writer thread. Callers taking turns on two streams, appends at any head (a stream
    others share), a big append, and two appends at once are committed on the writer thread."""
    from store_service.sqlite.backend import INLINE_AFTER_SINGLES, INLINE_MAX_BYTES

    commits = CommitThreads(monkeypatch)
    backend = SqliteStoreBackend.in_directory(str(tmp_path))
    await backend.open()
    try:
        for seq in range(INLINE_AFTER_SINGLES + 3):
            await backend.append("calls", Expected.exact(seq), events(f"fact-{seq}"))
        assert commits.on_loop() == [False] * INLINE_AFTER_SINGLES + [True] * 3
        head = INLINE_AFTER_SINGLES + 3

        del commits.threads[:]
        for seq in range(2 * INLINE_AFTER_SINGLES + 2):  # two callers taking turns
            stream = "left" if seq % 2 == 0 else "right"
            await backend.append(stream, Expected.exact(seq // 2), events("turn"))
        for _ in range(INLINE_AFTER_SINGLES + 2):
            await backend.append("hints", Expected.any(), events("hint"))
        for _ in range(INLINE_AFTER_SINGLES + 2):
            big = [NewEvent("big", b"x" * (INLINE_MAX_BYTES + 1))]
            await backend.append("calls", Expected.exact(head), big)
            head += 1
        await asyncio.gather(
            backend.append("calls", Expected.exact(head), events("one")),
            backend.append("other", Expected.no_stream(), events("two")),
        )
        assert not any(commits.on_loop())

        page = await backend.read("calls", 1, 100)
        facts = [f"fact-{seq}" for seq in range(INLINE_AFTER_SINGLES + 3)]
        assert [e.type for e in page.events] == [*facts, *["big"] * (INLINE_AFTER_SINGLES + 2), "one"]
    finally:
        await backend.close()


async def test_a_lone_callers_append_waits_for_a_held_write_lock_on_the_writer_thread(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite-specific: another connection holding the write lock (a backup, the sqlite3 shell) makes a
    lone caller's append wait on the writer thread, never on the event loop's: the try on the loop
    does not wait for the lock, and the append commits once the lock is released."""
    from store_service.sqlite.backend import INLINE_AFTER_SINGLES
    from store_service.sqlite.writer import BUSY_TIMEOUT_MS

    commits = CommitThreads(monkeypatch)
    backend = SqliteStoreBackend.in_directory(str(tmp_path))
    await backend.open()
    other = sqlite3.connect(backend.path, isolation_level=None, check_same_thread=False)
    try:
        for seq in range(INLINE_AFTER_SINGLES + 1):
            await backend.append("calls", Expected.exact(seq), events(f"fact-{seq}"))
        other.execute("BEGIN IMMEDIATE")
        append = asyncio.create_task(
            backend.append("calls", Expected.exact(INLINE_AFTER_SINGLES + 1), events("behind-the-lock"))
        )
        for _ in range(5):  # the loop keeps turning while the append waits for the lock
            await asyncio.sleep(0.02)
        assert not append.done()
        other.execute("ROLLBACK")
        result = await asyncio.wait_for(append, 30)
        assert result.head_seq == INLINE_AFTER_SINGLES + 2
        # Committed on the loop once its turn came; then tried there without waiting for the lock,
        # and waited for it on the writer thread.
        assert commits.on_loop() == [False] * INLINE_AFTER_SINGLES + [True, True, False]
        assert commits.lock_waits_ms[-3:] == [0, 0, BUSY_TIMEOUT_MS]
    finally:
        other.close()
        await backend.close()


async def test_slow_commits_keep_a_lone_callers_appends_on_the_writer_thread(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite-specific: a commit slower than INLINE_MAX_S would stop the loop for everyone. After one
    on the loop's thread (a WAL checkpoint, say), the next INLINE_AFTER_SINGLES - 1 go to the writer
    thread; while every commit is slow (a slow disk), none is made on the loop's thread."""
    from store_service.sqlite.backend import INLINE_AFTER_SINGLES

    commits = CommitThreads(monkeypatch)
    first_on_loop = [True]

    def slow_first_on_loop(on_loop: bool) -> bool:
        slow = on_loop and bool(first_on_loop)
        if on_loop:
            first_on_loop.clear()
        return slow

    commits.slow = slow_first_on_loop
    backend = SqliteStoreBackend.in_directory(str(tmp_path))
    await backend.open()
    try:
        for seq in range(2 * INLINE_AFTER_SINGLES + 2):
            await backend.append("calls", Expected.exact(seq), events(f"fact-{seq}"))
        on_loop = [False] * INLINE_AFTER_SINGLES + [True]  # the slow one
        on_loop += [False] * (INLINE_AFTER_SINGLES - 1) + [True, True]
        assert commits.on_loop() == on_loop

        commits.slow = lambda on_loop: True
        del commits.threads[:]
        for seq in range(2 * INLINE_AFTER_SINGLES + 2, 5 * INLINE_AFTER_SINGLES + 2):
            await backend.append("calls", Expected.exact(seq), events(f"fact-{seq}"))
        assert commits.on_loop() == [True] + [False] * (3 * INLINE_AFTER_SINGLES - 1)
    finally:
        await backend.close()
