"""The SQLite store's one writer: a plain sqlite3 connection that lives on one dedicated thread.

`SqliteStoreBackend` (store_service.sqlite.backend) hands it whole groups of appends; each group
is one call on the writer thread (one event-loop round trip), one transaction and one fsync,
however many appends it holds. Every method here is blocking and runs on the writer thread, except
a lone caller's single append, which the backend commits on the event loop's thread (see
`SqliteStoreBackend._commit_group`); the backend's one write loop never runs two calls at once.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from keel_core.clock import now_us
from keel_core.ids import uuid7_int
from store_service.artifact_chunks import split_chunks
from store_service.backend import (
    TERMINAL_STATUSES,
    AppendResult,
    NewArtifact,
    StreamStatus,
    TrimResult,
    sequence_conflict,
    trim_past_head,
)
from store_service.group_commit import AppendJob, AppendOutcome

log = logging.getLogger(__name__)

Durability = Literal["full", "normal"]
# How long a write waits for another connection's write lock (a backup, the sqlite3 shell).
BUSY_TIMEOUT_MS = 5000
ChunkRow = tuple[str, int, bytes]

SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    sid INTEGER PRIMARY KEY,            -- creation order: newest first, and page tokens carry it
    stream_id TEXT NOT NULL UNIQUE,
    head_seq INTEGER NOT NULL,
    status INTEGER NOT NULL DEFAULT 0,
    created_at_us INTEGER NOT NULL,
    updated_at_us INTEGER NOT NULL,
    ended_at_us INTEGER NOT NULL DEFAULT 0  -- when the label became terminal; 0 while it is not
);
CREATE INDEX IF NOT EXISTS streams_by_status ON streams (status, sid);
-- A stream's attributes, set with an append. IF NOT EXISTS: files made before attributes existed
-- gain the table (empty) when a newer store opens them. The second index answers a listing by
-- attribute newest first without reading other streams.
CREATE TABLE IF NOT EXISTS stream_attributes (
    sid INTEGER NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (sid, key)
);
CREATE INDEX IF NOT EXISTS stream_attributes_by_value ON stream_attributes (key, value, sid);
-- The due-time index (parked runs' timers): set and cleared by appends, in their transaction.
-- IF NOT EXISTS: files made before it existed gain it (empty) when a newer store opens them.
CREATE TABLE IF NOT EXISTS stream_due (
    stream_id TEXT PRIMARY KEY,
    due_at_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS stream_due_by_time ON stream_due (due_at_us, stream_id);
-- The primary key is the compare-and-swap backstop: two appends can never both own a seq.
CREATE TABLE IF NOT EXISTS events (
    stream_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    payload BLOB NOT NULL,
    recorded_at_us INTEGER NOT NULL,
    append_key TEXT,  -- on an append's first event, if the append was sent with a key
    PRIMARY KEY (stream_id, seq)
);
-- An artifact points at a blob of chunks; uploads stage chunks under a fresh blob id and the
-- artifact row is inserted (or the staged blob dropped, for a repeat) in the final transaction.
CREATE TABLE IF NOT EXISTS artifacts (
    artifact_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    blob_id TEXT NOT NULL,
    created_at_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS artifact_chunks (
    blob_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (blob_id, idx)
);
"""

_TERMINAL = ", ".join(str(int(status)) for status in TERMINAL_STATUSES)
# Files made before streams had an end time gain the column; a stream already finished takes its
# last append's time, the best record of its end such a file has.
_ADD_ENDED_AT = (
    "ALTER TABLE streams ADD COLUMN ended_at_us INTEGER NOT NULL DEFAULT 0",
    f"UPDATE streams SET ended_at_us = updated_at_us WHERE status IN ({_TERMINAL})",
)

# Files made before appends had keys gain the column and its index (a partial one: only keyed
# appends are in it, so unkeyed appends do not pay for it). The index is made here, not in SCHEMA,
# because an older file has no column to index until the ALTER.
_ADD_APPEND_KEY = "ALTER TABLE events ADD COLUMN append_key TEXT"
_APPEND_KEY_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS events_by_append_key ON events (stream_id, append_key) "
    "WHERE append_key IS NOT NULL"
)
_REPEATED = "SELECT seq, recorded_at_us FROM events WHERE stream_id = ? AND append_key = ?"

# An append's first event carries its key, if it has one; every other event's key is NULL, written
# into the statement: the sqlite3 module binds None, and bytes, through its adapter lookup, which
# costs more than the rest of the row's binding together. For the same reason a payload of up to
# COPIED_PAYLOAD_BYTES is bound as a bytearray copy (stored as the same BLOB): up to that size the
# copy costs less than the lookup (about as much at 4 KiB, more at 16 KiB), and a group's copies
# hold little memory.
COPIED_PAYLOAD_BYTES = 4096
_INSERT_EVENTS = "INSERT INTO events (stream_id, seq, type, payload, recorded_at_us, append_key) VALUES "
_EVENT_ROW = "(?, ?, ?, ?, ?, NULL)"
_KEYED_EVENT_ROW = "(?, ?, ?, ?, ?, ?)"
# created_at_us is only written for a new stream: DO UPDATE leaves it alone. A row's ended_at_us is
# the append's time if its label is terminal, else 0; a stream that had already ended keeps its own.
_UPSERT_STREAMS = (
    "INSERT INTO streams (stream_id, head_seq, status, created_at_us, updated_at_us, ended_at_us) VALUES "
)
_STREAM_ROW = "(?, ?, ?, ?, ?, ?)"
_ON_STREAM_CONFLICT = (
    " ON CONFLICT (stream_id) DO UPDATE SET head_seq = excluded.head_seq, status = excluded.status, "
    "updated_at_us = excluded.updated_at_us, ended_at_us = CASE WHEN excluded.ended_at_us = 0 THEN 0 "
    "WHEN streams.ended_at_us > 0 THEN streams.ended_at_us ELSE excluded.ended_at_us END"
)
# Rows per multi-row INSERT: 200 rows x at most 6 values stays far below SQLite's variable limit, and
# each multi-row statement has at most 200 distinct texts; the connection's statement cache keeps
# the 512 used last.
ROWS_PER_STATEMENT = 200
# The sid comes from the streams row the same transaction just upserted.
_SET_ATTRIBUTE = (
    "INSERT INTO stream_attributes (sid, key, value) SELECT sid, ?, ? FROM streams WHERE stream_id = ? "
    "ON CONFLICT (sid, key) DO UPDATE SET value = excluded.value"
)
_SET_DUE = (
    "INSERT INTO stream_due (stream_id, due_at_us) VALUES (?, ?) "
    "ON CONFLICT (stream_id) DO UPDATE SET due_at_us = excluded.due_at_us"
)
_CLEAR_DUE = "DELETE FROM stream_due WHERE stream_id = ?"
# A nudge moves a PARKED stream's due time earlier (after this group's own appends set labels).
_NUDGE = (
    "INSERT INTO stream_due (stream_id, due_at_us) "
    f"SELECT stream_id, ? FROM streams WHERE stream_id = ? AND status = {int(StreamStatus.PARKED)} "
    "ON CONFLICT (stream_id) DO UPDATE SET due_at_us = min(due_at_us, excluded.due_at_us)"
)
_INSERT_CHUNK = "INSERT INTO artifact_chunks (blob_id, idx, data) VALUES (?, ?, ?)"
_INSERT_ARTIFACT = (
    "INSERT INTO artifacts (artifact_id, kind, size, blob_id, created_at_us) VALUES (?, ?, ?, ?, ?)"
)
# Bytes stored again renew the artifact's stored time (created_at_us), which an artifact collection
# checks before it deletes (store_service.backend); the writer's renew_after_us says how often.
_TOUCH_ARTIFACT = "UPDATE artifacts SET created_at_us = ? WHERE artifact_id = ? AND created_at_us < ?"


def _repeat(request: AppendJob, first_seq: int, recorded_at_us: int) -> AppendResult:
    """The answer to an append whose key names one committed before: that one's, writing nothing."""
    head = first_seq + len(request.events) - 1
    return AppendResult(first_seq, head, request.artifact_ids, recorded_at_us=recorded_at_us, repeated=True)


# A blob id is UUIDv7's layout in hex: 48 bits of Unix milliseconds, then a 74-bit counter that
# starts at a random value in each process (two processes' ids meet only within one millisecond
# and with counters a random start put on the same value; within a process they increase). New
# blobs' chunk rows thus go to the end of artifact_chunks' key order, where random ids (uuid4) put
# each on a page of its own: a group's commit then writes a few pages for its artifacts' chunks,
# not one or more per artifact (bench/store_cpu.py). The order only matters for speed (a clock
# stepped back costs that, not uniqueness); the key needs uniqueness.
_BLOB_COUNTER = itertools.count(secrets.randbits(74))  # next() is one call: safe across threads


def _reseed_blob_counter() -> None:
    global _BLOB_COUNTER
    _BLOB_COUNTER = itertools.count(secrets.randbits(74))  # a forked child must not repeat its parent


os.register_at_fork(after_in_child=_reseed_blob_counter)


def new_blob_id() -> str:
    """An id for a new artifact's chunks, sorting after the ones this process made before it (while
    the wall clock does not step back)."""
    value = uuid7_int(time.time_ns() // 1_000_000, next(_BLOB_COUNTER))
    return f"{value:032x}"  # uuid.UUID(int=value).hex, without making the UUID


def chunk_rows(blob_id: str, data: bytes, first_index: int = 0) -> list[ChunkRow]:
    """`data` cut into artifact_chunks rows."""
    return [(blob_id, first_index + n, chunk) for n, chunk in enumerate(split_chunks(data))]


def _stage_inline(
    artifact: NewArtifact,
    artifact_id: str,
    now: int,
    blob_rows: list[ChunkRow],
    artifact_rows: list[tuple[str, str, int, str, int]],
) -> None:
    """Add the rows of an artifact carried inline by an append to its group's inserts."""
    blob_id = new_blob_id()
    blob_rows.extend(chunk_rows(blob_id, artifact.data))
    artifact_rows.append((artifact_id, artifact.kind, len(artifact.data), blob_id, now))


@functools.cache
def _multi_row_sql(head: str, row: str, count: int, tail: str = "") -> str:
    return head + ", ".join([row] * count) + tail


def _insert_rows(
    conn: sqlite3.Connection, head: str, row: str, rows: Sequence[tuple[Any, ...]], tail: str = ""
) -> None:
    """Insert with multi-row VALUES statements rather than executemany.

    executemany steps once per row and the sqlite3 module releases and retakes the GIL around
    every step; while the event loop thread is busy each retake can wait a whole switch
    interval. One statement per ROWS_PER_STATEMENT rows keeps a group's GIL hand-offs constant.
    """
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        part = rows[start : start + ROWS_PER_STATEMENT]
        conn.execute(_multi_row_sql(head, row, len(part), tail), list(itertools.chain.from_iterable(part)))


class SqliteWriter:
    """The write side of the SQLite store: one call at a time, on the writer thread or the loop's."""

    def __init__(self, path: Path, durability: Durability, renew_after_us: int = 60_000_000) -> None:
        self.renew_after_us = renew_after_us
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (the sqlite3 module's implicit
        # transactions start lazily and DEFERRED, which is wrong for a read-then-write).
        # check_same_thread=False: a lone caller's append is committed on the event loop's thread
        # (the backend's write loop makes one call at a time, whichever thread it is on).
        self.conn = sqlite3.connect(
            path, isolation_level=None, cached_statements=512, check_same_thread=False
        )
        # WAL: readers see the last commit without blocking the writer, and a commit is one
        # sequential append to the log (plus one fsync under synchronous=FULL).
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        # We are the only writer in this process; the timeout covers another process (a backup,
        # the sqlite3 shell) holding the write lock briefly instead of failing at once.
        self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        # Big artifact uploads grow the WAL; cut it back after checkpoints instead of keeping it.
        self.conn.execute("PRAGMA journal_size_limit=67108864")
        self.conn.executescript(SCHEMA)
        self._add_ended_at()
        self._add_append_key()
        # Uploads interrupted by a crash left chunks that no artifact points at.
        self.conn.execute("DELETE FROM artifact_chunks WHERE blob_id NOT IN (SELECT blob_id FROM artifacts)")

    def _add_ended_at(self) -> None:
        """Give a file made before streams had an end time its ended_at_us column, in one transaction."""
        if self._has_column("streams", "ended_at_us"):
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _ADD_ENDED_AT:
                self.conn.execute(statement)
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _add_append_key(self) -> None:
        """Give a file made before appends had keys its append_key column; index it."""
        if not self._has_column("events", "append_key"):
            self.conn.execute(_ADD_APPEND_KEY)
        self.conn.execute(_APPEND_KEY_INDEX)

    def _has_column(self, table: str, column: str) -> bool:
        return any(str(row[1]) == column for row in self.conn.execute(f"PRAGMA table_info({table})"))

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed by SQLite on the last close)."""
        self.conn.close()

    def synchronous(self) -> int:
        """The connection's PRAGMA synchronous (2 = FULL, 1 = NORMAL)."""
        return int(self.conn.execute("PRAGMA synchronous").fetchone()[0])

    # -- appends -----------------------------------------------------------------------------

    def commit_appends(self, group: Sequence[AppendJob]) -> list[AppendOutcome]:
        """Commit a group in one transaction; each request gets its own result or conflict.

        If the unique key rejects the group (only possible if another process wrote the file
        behind our back), the group is retried one request per transaction so that the conflict
        lands on the request(s) that caused it.
        """
        try:
            return self._transact(group)
        except sqlite3.IntegrityError:
            if len(group) == 1:
                request = group[0]
                log.warning("unique key caught a concurrent writer on %r", request.stream_id)
                return [sequence_conflict(request.stream_id, request.expected, self._head(request.stream_id))]
            return [self.commit_appends([request])[0] for request in group]

    def commit_appends_at_once(self, group: Sequence[AppendJob]) -> list[AppendOutcome] | None:
        """`commit_appends`, or None at once (nothing written) if another connection holds the
        write lock: for a commit on the event loop's thread, which must not wait BUSY_TIMEOUT_MS."""
        self.conn.execute("PRAGMA busy_timeout=0")
        try:
            return self.commit_appends(group)
        except sqlite3.OperationalError as error:
            # Rolled back, if it began. (An OperationalError not raised by SQLite has no code.)
            if getattr(error, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_BUSY:
                return None
            raise
        finally:
            self.conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _head(self, stream_id: str) -> int:
        row = self.conn.execute("SELECT head_seq FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()
        return int(row[0]) if row else 0

    def _transact(self, group: Sequence[AppendJob]) -> list[AppendOutcome]:
        conn = self.conn
        now = now_us()
        # IMMEDIATE takes the write lock now, so the head lookup below and the inserts see one
        # state; a DEFERRED read-then-write transaction could fail with SQLITE_BUSY on upgrade.
        conn.execute("BEGIN IMMEDIATE")
        try:
            known = self._heads({request.stream_id for request in group})
            heads = {sid: head for sid, (head, _) in known.items()}
            stored = self._stored_artifacts(group)
            # (stream id, key) -> (first seq, recorded at) of each keyed append committed already,
            # before this group or earlier in it.
            keyed = self._keyed_appends(group)
            renewed: set[str] = set()
            event_rows: list[tuple[str, int, str, bytes | bytearray, int]] = []
            keyed_rows: list[tuple[str, int, str, bytes | bytearray, int, str]] = []
            stream_rows: dict[str, tuple[str, int, int, int, int, int]] = {}
            blob_rows: list[ChunkRow] = []
            artifact_rows: list[tuple[str, str, int, str, int]] = []
            attribute_rows: list[tuple[str, str, str]] = []
            due: dict[str, int] = {}  # stream id -> its new due time (0: cleared); later appends win
            nudges: dict[str, int] = {}  # other streams made due if PARKED (the soonest time)
            outcomes: list[AppendOutcome] = []
            for request in group:
                sid = request.stream_id
                append_key = request.append_key
                if append_key is not None and (sid, append_key) in keyed:
                    outcomes.append(_repeat(request, *keyed[sid, append_key]))
                    continue
                head = heads.get(sid, 0)
                # Checked against the head *as updated by earlier requests of this group*, so
                # each caller wins or loses exactly as if the appends had been serialized.
                if not request.expected.admits(head):
                    outcomes.append(sequence_conflict(sid, request.expected, head))
                    continue
                first = head + 1
                rows = [
                    (
                        sid,
                        seq,
                        type_name,
                        bytearray(payload) if len(payload) <= COPIED_PAYLOAD_BYTES else payload,
                        now,
                    )
                    for seq, (type_name, payload) in enumerate(request.events, first)
                ]
                if append_key is not None:
                    # The key goes with the first event: it is kept as long as that event is.
                    keyed_rows.append((*rows[0], append_key))
                    keyed[sid, append_key] = (first, now)
                    del rows[0]
                event_rows += rows
                heads[sid] = new_head = head + len(request.events)
                if request.status is not None:
                    status = int(request.status)
                elif sid in stream_rows:
                    status = stream_rows[sid][2]
                else:
                    status = known[sid][1] if sid in known else 0
                ended = now if status in TERMINAL_STATUSES else 0
                stream_rows[sid] = (sid, new_head, status, now, now, ended)
                attribute_rows.extend((key, value, sid) for key, value in request.attributes.items())
                if request.due_at_us is not None:
                    due[sid] = request.due_at_us
                for nudged, at in request.nudges.items():
                    nudges[nudged] = min(at, nudges.get(nudged, at))
                for artifact, artifact_id in zip(request.artifacts, request.artifact_ids, strict=True):
                    if artifact_id not in stored:
                        stored.add(artifact_id)
                        _stage_inline(artifact, artifact_id, now, blob_rows, artifact_rows)
                    else:
                        renewed.add(artifact_id)
                outcomes.append(AppendResult(first, new_head, request.artifact_ids, recorded_at_us=now))
            # A few statements for the whole group, whatever its size.
            _insert_rows(conn, _INSERT_EVENTS, _EVENT_ROW, event_rows)
            _insert_rows(conn, _INSERT_EVENTS, _KEYED_EVENT_ROW, keyed_rows)
            _insert_rows(conn, _UPSERT_STREAMS, _STREAM_ROW, list(stream_rows.values()), _ON_STREAM_CONFLICT)
            if attribute_rows:
                conn.executemany(_SET_ATTRIBUTE, attribute_rows)
            if due:
                conn.executemany(_SET_DUE, [(sid, at) for sid, at in due.items() if at > 0])
                conn.executemany(_CLEAR_DUE, [(sid,) for sid, at in due.items() if at <= 0])
            if nudges:
                conn.executemany(_NUDGE, [(at, sid) for sid, at in nudges.items()])
            if artifact_rows:
                conn.executemany(_INSERT_CHUNK, blob_rows)
                conn.executemany(_INSERT_ARTIFACT, artifact_rows)
            renewed -= {row[0] for row in artifact_rows}
            if renewed:
                conn.executemany(
                    _TOUCH_ARTIFACT, [(now, a, now - self.renew_after_us) for a in sorted(renewed)]
                )
            self._report_heads(group, outcomes)
            conn.execute("COMMIT")  # the one fsync of the group (synchronous=FULL)
        except BaseException:
            self._rollback()
            raise
        return outcomes

    # -- due-time nudges ----------------------------------------------------------------------

    def nudge_due(self, stream_id: str, due_at_us: int) -> bool:
        """If the stream is PARKED, make its due time at most `due_at_us`; whether it is PARKED."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            row = self.conn.execute("SELECT status FROM streams WHERE stream_id = ?", (stream_id,)).fetchone()
            parked = row is not None and int(row[0]) == int(StreamStatus.PARKED)
            if parked:
                self.conn.execute(
                    "INSERT INTO stream_due (stream_id, due_at_us) VALUES (?, ?) "
                    "ON CONFLICT (stream_id) DO UPDATE SET due_at_us = min(due_at_us, excluded.due_at_us)",
                    (stream_id, due_at_us),
                )
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return parked

    # -- trims -------------------------------------------------------------------------------

    def trim(self, stream_id: str, before_seq: int) -> TrimResult:
        """Delete the stream's events below `before_seq` (at most head + 1) in one transaction.

        The head stays in the streams row, so appends keep comparing against the true head. This
        runs on the one writer like appends, so it never interleaves with a group commit.
        """
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            head = self._head(stream_id)
            if before_seq > head + 1:
                raise trim_past_head(stream_id, before_seq, head)
            removed = 0
            if before_seq > 1:
                cursor = self.conn.execute(
                    "DELETE FROM events WHERE stream_id = ? AND seq < ?", (stream_id, before_seq)
                )
                removed = cursor.rowcount
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return TrimResult(removed, head)

    # -- deletes -----------------------------------------------------------------------------

    def delete_streams(self, stream_ids: Sequence[str]) -> int:
        """Delete whole streams (events, head row, attributes) in one transaction; how many existed."""
        ids = sorted(set(stream_ids))
        marks = ",".join("?" * len(ids))
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                "DELETE FROM stream_attributes WHERE sid IN "
                f"(SELECT sid FROM streams WHERE stream_id IN ({marks}))",
                ids,
            )
            self.conn.execute(f"DELETE FROM events WHERE stream_id IN ({marks})", ids)
            self.conn.execute(f"DELETE FROM stream_due WHERE stream_id IN ({marks})", ids)
            deleted = self.conn.execute(f"DELETE FROM streams WHERE stream_id IN ({marks})", ids).rowcount
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return int(deleted)

    def delete_artifacts(self, artifact_ids: Sequence[str], stored_before_us: int) -> list[str]:
        """Delete those artifacts last stored before `stored_before_us`, with their chunks."""
        ids = sorted(set(artifact_ids))
        marks = ",".join("?" * len(ids))
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            rows = self.conn.execute(
                f"SELECT artifact_id, blob_id FROM artifacts WHERE artifact_id IN ({marks}) "
                "AND created_at_us < ?",
                [*ids, stored_before_us],
            ).fetchall()
            gone = [str(row[0]) for row in rows]
            if gone:
                self.conn.executemany(
                    "DELETE FROM artifact_chunks WHERE blob_id = ?", [(row[1],) for row in rows]
                )
                self.conn.executemany("DELETE FROM artifacts WHERE artifact_id = ?", [(a,) for a in gone])
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return gone

    def _report_heads(self, group: Sequence[AppendJob], outcomes: list[AppendOutcome]) -> None:
        """Give each committed append that asks for them the heads of its `report_heads` streams,
        read after the group's writes under the write lock (so no other writer comes between)."""
        wanted = {sid for job in group for sid in job.report_heads}
        if not wanted:
            return
        heads = self._heads(wanted)
        for index, (job, outcome) in enumerate(zip(group, outcomes, strict=True)):
            if job.report_heads and isinstance(outcome, AppendResult):
                reported = tuple(heads[sid][0] if sid in heads else 0 for sid in job.report_heads)
                outcomes[index] = dataclasses.replace(outcome, reported_heads=reported)

    def _heads(self, stream_ids: set[str]) -> dict[str, tuple[int, int]]:
        """(head_seq, status) of those of `stream_ids` that exist."""
        ids = list(stream_ids)
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(
            f"SELECT stream_id, head_seq, status FROM streams WHERE stream_id IN ({marks})", ids
        )
        return {str(row[0]): (int(row[1]), int(row[2])) for row in rows}

    def _keyed_appends(self, group: Sequence[AppendJob]) -> dict[tuple[str, str], tuple[int, int]]:
        """(stream id, key) -> (first seq, recorded at) of the appends committed under the keys
        that the group's appends carry (none are looked up for a group without keys)."""
        found: dict[tuple[str, str], tuple[int, int]] = {}
        for request in group:
            if request.append_key is not None:
                row = self.conn.execute(_REPEATED, (request.stream_id, request.append_key)).fetchone()
                if row is not None:
                    found[request.stream_id, request.append_key] = (int(row[0]), int(row[1]))
        return found

    def _stored_artifacts(self, group: Sequence[AppendJob]) -> set[str]:
        ids = list({artifact_id for request in group for artifact_id in request.artifact_ids})
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        rows = self.conn.execute(f"SELECT artifact_id FROM artifacts WHERE artifact_id IN ({marks})", ids)
        return {str(row[0]) for row in rows}

    def _rollback(self) -> None:
        # Only if BEGIN succeeded: a ROLLBACK outside a transaction would mask the real error.
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    # -- artifact uploads --------------------------------------------------------------------

    def stage(self, rows: list[ChunkRow]) -> None:
        """Write some chunks of an upload under its blob id (invisible until published)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(_INSERT_CHUNK, rows)
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def publish(self, rows: list[ChunkRow], artifact_id: str, kind: str, size: int, blob_id: str) -> bool:
        """Write the last chunks and the artifact row; for a repeat, drop the staged blob instead.

        Returns True when the artifact was created, False when it already existed.
        """
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            exists = self.conn.execute(
                "SELECT 1 FROM artifacts WHERE artifact_id = ?", (artifact_id,)
            ).fetchone()
            if exists:  # the staged chunks go, unless (an id made twice) an artifact points at them
                self.conn.execute(
                    "DELETE FROM artifact_chunks WHERE blob_id = ? AND NOT EXISTS "
                    "(SELECT 1 FROM artifacts WHERE blob_id = ?)",
                    (blob_id, blob_id),
                )
                now = now_us()
                self.conn.execute(_TOUCH_ARTIFACT, (now, artifact_id, now - self.renew_after_us))
            else:
                self.conn.executemany(_INSERT_CHUNK, rows)
                self.conn.execute(_INSERT_ARTIFACT, (artifact_id, kind, size, blob_id, now_us()))
            self.conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return exists is None

    def drop_blob(self, blob_id: str) -> None:
        """Delete the staged chunks of an upload that was not published.

        The uploader queues this when it is cancelled, which may be after its publish job was
        already queued and then commits: chunks that an artifact row points at are never dropped.
        """
        self.conn.execute(
            "DELETE FROM artifact_chunks WHERE blob_id = ? AND NOT EXISTS "
            "(SELECT 1 FROM artifacts WHERE blob_id = ?)",
            (blob_id, blob_id),
        )
