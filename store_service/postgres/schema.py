"""The PostgreSQL store's schema as versioned migrations, and the start-up step that applies them.

Every migration runs once per schema, in version order, recorded in `schema_migrations`. All of
them are applied in ONE transaction that first takes a transaction-scoped advisory lock keyed by
the schema name: store replicas starting at the same moment queue on that lock, and each one
after the first finds the versions already recorded and applies nothing. PostgreSQL's DDL is
transactional, so a replica that dies mid-migration leaves nothing half-applied.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import asyncpg

from keel_core.errors import ErrorCategory, KeelError
from store_service.backend import TERMINAL_STATUSES

# At most 40 characters: the schema also names the NOTIFY channel ("keel_store_events.<schema>"),
# and PostgreSQL refuses channel names longer than 63 bytes.
SCHEMA_NAME_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,39}")


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema change: applied once, in `version` order, and recorded with its name."""

    version: int
    name: str
    sql: str


_TABLES = """
-- sid orders streams by creation (ListStreams is newest first, and page tokens carry a sid).
CREATE TABLE streams (
    stream_id text PRIMARY KEY,
    sid bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    head_seq bigint NOT NULL,
    status smallint NOT NULL DEFAULT 0,
    created_at_us bigint NOT NULL,
    updated_at_us bigint NOT NULL
);
CREATE INDEX streams_by_status ON streams (status, sid);

-- The primary key is the compare-and-swap: two appends, through any replicas, can never both
-- own a sequence number; the loser gets a unique violation and reports a sequence_conflict.
CREATE TABLE events (
    stream_id text NOT NULL,
    seq bigint NOT NULL,
    type text NOT NULL,
    payload bytea NOT NULL,
    recorded_at_us bigint NOT NULL,
    PRIMARY KEY (stream_id, seq)
);

-- An artifact points at a blob of 1 MiB chunks. Uploads write the chunks and the artifact row
-- in one transaction, so an interrupted upload leaves nothing behind.
CREATE TABLE artifacts (
    artifact_id text PRIMARY KEY,
    kind text NOT NULL,
    size bigint NOT NULL,
    blob_id uuid NOT NULL,
    created_at_us bigint NOT NULL
);
CREATE TABLE artifact_chunks (
    blob_id uuid NOT NULL,
    idx integer NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (blob_id, idx)
);
-- Out of line and uncompressed: artifacts are mostly already compressed or hashed blobs, and
-- compressing 1 MiB chunks on the write path costs more CPU than it saves.
ALTER TABLE artifact_chunks ALTER COLUMN data SET STORAGE EXTERNAL;
"""

# One call appends a whole group of independent appends (group commit): the store sends the
# group as parallel arrays and gets one row per append back, in order, in ONE round trip and one
# transaction. Each append is checked against its own stream's head as left by earlier appends in
# the group, so a conflict fails only its own caller. Heads are read without locks: a concurrent
# writer on another replica that takes the same sequence makes one of the two event inserts fail
# with a unique violation (the primary key is the arbiter), and the store retries that group one
# append at a time to give the conflict to the right caller. pg_notify is transactional: the
# listeners of every replica hear of the append exactly when it commits, never before.
#
# Since TrimStream deletes old events, the primary key alone no longer catches every such race (a
# stale head's sequence numbers may have been trimmed away): the head update is itself a
# compare-and-swap on the streams row, and a row that moved under the group raises the same
# unique violation, so the group is retried against the new head.
_TERMINAL = ", ".join(str(int(status)) for status in TERMINAL_STATUSES)
_APPEND_GROUP_BODY = (
    """ append_group(
    p_stream_ids text[],
    p_kinds smallint[],        -- 0 exact, 1 no stream, 2 any
    p_expected bigint[],
    p_counts integer[],        -- events per append
    p_statuses smallint[],     -- NULL keeps the stream's label
    p_event_owners integer[],  -- per event: the (1-based) append it belongs to
    p_types text[],            -- every append's events, flattened in order
    p_payloads bytea[],
    p_art_owners integer[],    -- per inline artifact: the append it belongs to
    p_art_ids text[],
    p_art_kinds text[],
    p_art_sizes bigint[],
    p_art_chunks integer[],    -- per inline artifact: how many chunks it has
    p_chunk_data bytea[],      -- every artifact's chunks, flattened in order
    p_channel text
) RETURNS TABLE (out_first bigint, out_head bigint, out_conflict boolean)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    now_us bigint := (extract(epoch FROM statement_timestamp()) * 1000000)::bigint;
    n_appends integer := coalesce(cardinality(p_stream_ids), 0);
    n_arts integer := coalesce(cardinality(p_art_owners), 0);
    -- Per append: its first sequence (0 if it conflicted) and how many events precede it.
    firsts bigint[] := array_fill(0::bigint, ARRAY[n_appends]);
    offsets integer[] := array_fill(0, ARRAY[n_appends]);
    ev integer := 0;
    art integer := 1;
    chunk integer := 0;
    i integer;
    c integer;
    head bigint;
    known boolean;
    blob uuid;
BEGIN
    -- Decide each append in order against its stream's head (as left by the earlier ones).
    FOR i IN 1 .. n_appends LOOP
        c := p_counts[i];
        offsets[i] := ev;
        ev := ev + c;
        SELECT s.head_seq INTO head FROM streams s WHERE s.stream_id = p_stream_ids[i];
        known := FOUND;
        IF NOT known THEN
            head := 0;
        END IF;
        out_head := head;
        out_conflict := (p_kinds[i] = 0 AND head <> p_expected[i]) OR (p_kinds[i] = 1 AND head <> 0);
        IF out_conflict THEN
            out_first := 0;
        ELSE
            out_first := head + 1;
            out_head := head + c;
            firsts[i] := out_first;
            IF known THEN
                -- ended_at_us: the append's time when the label becomes terminal, kept while it
                -- stays terminal (later appends do not move a finished stream's end), else 0.
                UPDATE streams
                   SET head_seq = out_head, status = coalesce(p_statuses[i], status), updated_at_us = now_us,
                       ended_at_us = CASE
                           WHEN coalesce(p_statuses[i], status) NOT IN ("""
    + _TERMINAL
    + """) THEN 0
                           WHEN ended_at_us > 0 THEN ended_at_us
                           ELSE now_us END
                 WHERE stream_id = p_stream_ids[i] AND head_seq = head;
                IF NOT FOUND THEN
                    RAISE unique_violation USING MESSAGE = format(
                        'stream %s moved past head %s under this append group', p_stream_ids[i], head);
                END IF;
            ELSE
                INSERT INTO streams (stream_id, head_seq, status, created_at_us, updated_at_us, ended_at_us)
                    VALUES (p_stream_ids[i], out_head, coalesce(p_statuses[i], 0), now_us, now_us,
                            CASE WHEN p_statuses[i] IN ("""
    + _TERMINAL
    + """) THEN now_us ELSE 0 END);
            END IF;
            PERFORM pg_notify(p_channel, p_stream_ids[i]);
        END IF;
        WHILE art <= n_arts AND p_art_owners[art] = i LOOP
            IF NOT out_conflict THEN
                INSERT INTO artifacts (artifact_id, kind, size, blob_id, created_at_us)
                    VALUES (p_art_ids[art], p_art_kinds[art], p_art_sizes[art], gen_random_uuid(), now_us)
                    ON CONFLICT (artifact_id) DO NOTHING
                    RETURNING blob_id INTO blob;
                IF FOUND THEN
                    INSERT INTO artifact_chunks (blob_id, idx, data)
                        SELECT blob, g - 1, p_chunk_data[chunk + g]
                        FROM generate_series(1, p_art_chunks[art]) AS g;
                END IF;
            END IF;
            chunk := chunk + p_art_chunks[art];
            art := art + 1;
        END LOOP;
        RETURN NEXT;
    END LOOP;
    -- Then every accepted event in one set-based insert: unnest walks the arrays once, where
    -- subscripting variable-length arrays event by event would walk them again for each one.
    INSERT INTO events (stream_id, seq, type, payload, recorded_at_us)
        SELECT p_stream_ids[e.owner], firsts[e.owner] + (e.n - 1 - offsets[e.owner]),
               e.type, e.payload, now_us
        FROM unnest(p_event_owners, p_types, p_payloads) WITH ORDINALITY AS e(owner, type, payload, n)
        WHERE firsts[e.owner] > 0;
END
$fn$;
"""
)
_APPEND_GROUP = "CREATE FUNCTION" + _APPEND_GROUP_BODY
_APPEND_GROUP_REPLACED = "CREATE OR REPLACE FUNCTION" + _APPEND_GROUP_BODY

# A stream's attributes, set with an append (in the append's transaction, see the backend). The
# second index answers a listing by attribute newest first without reading other streams.
_ATTRIBUTES = """
CREATE TABLE stream_attributes (
    sid bigint NOT NULL REFERENCES streams (sid),
    key text NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (sid, key)
);
CREATE INDEX stream_attributes_by_value ON stream_attributes (key, value, sid);
"""

# The due-time index of parked runs: set and cleared by appends, in the append's transaction (see
# the backend); ListDue walks the second index from the earliest due time.
_DUE = """
CREATE TABLE stream_due (
    stream_id text PRIMARY KEY REFERENCES streams (stream_id),
    due_at_us bigint NOT NULL
);
CREATE INDEX stream_due_by_time ON stream_due (due_at_us, stream_id);
"""

# When a stream's label became terminal (0 while it is not), set by append_group; a stream already
# finished takes its last append's time, the best record of its end an older schema has.
_ENDED_AT = f"""
ALTER TABLE streams ADD COLUMN ended_at_us bigint NOT NULL DEFAULT 0;
UPDATE streams SET ended_at_us = updated_at_us WHERE status IN ({_TERMINAL});
{_APPEND_GROUP_REPLACED}
"""

# Appends with a key (AppendEventsRequest.append_key): the key is kept on the append's first event,
# so it lives as long as that event, and a partial unique index finds it (unkeyed appends, the most,
# are not in it). A retry whose first try had committed (its answer lost, or still queued when the
# client gave up on it) then writes nothing and gets the first try's answer. Two tries committing
# at once on two replicas are serialised by the head compare-and-swap on their stream's row: the
# second waits for the first, fails with unique_violation, and its group is retried (LOST_RACE),
# which now finds the key (the unique index is the backstop).
#
# append_group gains p_keys, p_same (per append: the 1-based place of the last earlier append of
# the group with the same stream and key, 0 if none; the caller works it out, so the function does
# not compare every pair) and out_repeat_at (the first try's recorded time, 0 if not a repeat).
# The new signature is an overload: a replica still running the previous version keeps calling
# the old function (which writes no key) until it is replaced.
_APPEND_GROUP_KEYED = (
    """
ALTER TABLE events ADD COLUMN append_key text;
CREATE UNIQUE INDEX events_by_append_key ON events (stream_id, append_key) WHERE append_key IS NOT NULL;
CREATE FUNCTION append_group(
    p_stream_ids text[],
    p_kinds smallint[],        -- 0 exact, 1 no stream, 2 any
    p_expected bigint[],
    p_counts integer[],        -- events per append
    p_statuses smallint[],     -- NULL keeps the stream's label
    p_event_owners integer[],  -- per event: the (1-based) append it belongs to
    p_types text[],            -- every append's events, flattened in order
    p_payloads bytea[],
    p_art_owners integer[],    -- per inline artifact: the append it belongs to
    p_art_ids text[],
    p_art_kinds text[],
    p_art_sizes bigint[],
    p_art_chunks integer[],    -- per inline artifact: how many chunks it has
    p_chunk_data bytea[],      -- every artifact's chunks, flattened in order
    p_channel text,
    p_keys text[],             -- per append: its key, or NULL
    p_same integer[]           -- per append: the last earlier one with its stream and key, or 0
) RETURNS TABLE (out_first bigint, out_head bigint, out_conflict boolean, out_repeat_at bigint)
LANGUAGE plpgsql
SET search_path FROM CURRENT
AS $fn$
DECLARE
    now_us bigint := (extract(epoch FROM statement_timestamp()) * 1000000)::bigint;
    n_appends integer := coalesce(cardinality(p_stream_ids), 0);
    n_arts integer := coalesce(cardinality(p_art_owners), 0);
    -- Per append: its first sequence (0 if it conflicted or repeated) and how many events precede it.
    firsts bigint[] := array_fill(0::bigint, ARRAY[n_appends]);
    -- Per keyed append: the first sequence its key names (written now or repeated), 0 if neither.
    keyed bigint[] := array_fill(0::bigint, ARRAY[n_appends]);
    offsets integer[] := array_fill(0, ARRAY[n_appends]);
    ev integer := 0;
    art integer := 1;
    chunk integer := 0;
    i integer;
    c integer;
    head bigint;
    known boolean;
    blob uuid;
BEGIN
    -- Decide each append in order against its stream's head (as left by the earlier ones).
    FOR i IN 1 .. n_appends LOOP
        c := p_counts[i];
        offsets[i] := ev;
        ev := ev + c;
        out_repeat_at := 0;
        out_conflict := false;
        IF p_keys[i] IS NOT NULL THEN
            -- A repeat of an append committed under this key, before this group or earlier in it.
            SELECT e.seq, e.recorded_at_us INTO out_first, out_repeat_at
              FROM events e WHERE e.stream_id = p_stream_ids[i] AND e.append_key = p_keys[i];
            IF NOT FOUND THEN
                out_repeat_at := 0;
                IF p_same[i] > 0 AND keyed[p_same[i]] > 0 THEN
                    out_first := keyed[p_same[i]];
                    out_repeat_at := now_us;
                END IF;
            END IF;
        END IF;
        IF out_repeat_at > 0 THEN
            out_head := out_first + c - 1;
        ELSE
            SELECT s.head_seq INTO head FROM streams s WHERE s.stream_id = p_stream_ids[i];
            known := FOUND;
            IF NOT known THEN
                head := 0;
            END IF;
            out_head := head;
            out_conflict := (p_kinds[i] = 0 AND head <> p_expected[i]) OR (p_kinds[i] = 1 AND head <> 0);
            IF out_conflict THEN
                out_first := 0;
            ELSE
                out_first := head + 1;
                out_head := head + c;
                firsts[i] := out_first;
                IF known THEN
                    -- ended_at_us: the append's time when the label becomes terminal, kept while it
                    -- stays terminal (later appends do not move a finished stream's end), else 0.
                    UPDATE streams
                       SET head_seq = out_head, status = coalesce(p_statuses[i], status),
                           updated_at_us = now_us,
                           ended_at_us = CASE
                               WHEN coalesce(p_statuses[i], status) NOT IN ("""
    + _TERMINAL
    + """) THEN 0
                               WHEN ended_at_us > 0 THEN ended_at_us
                               ELSE now_us END
                     WHERE stream_id = p_stream_ids[i] AND head_seq = head;
                    IF NOT FOUND THEN
                        RAISE unique_violation USING MESSAGE = format(
                            'stream %s moved past head %s under this append group', p_stream_ids[i], head);
                    END IF;
                ELSE
                    INSERT INTO streams
                        (stream_id, head_seq, status, created_at_us, updated_at_us, ended_at_us)
                        VALUES (p_stream_ids[i], out_head, coalesce(p_statuses[i], 0), now_us, now_us,
                                CASE WHEN p_statuses[i] IN ("""
    + _TERMINAL
    + """) THEN now_us ELSE 0 END);
                END IF;
                PERFORM pg_notify(p_channel, p_stream_ids[i]);
            END IF;
        END IF;
        IF p_keys[i] IS NOT NULL AND NOT out_conflict THEN
            keyed[i] := out_first;
        END IF;
        WHILE art <= n_arts AND p_art_owners[art] = i LOOP
            IF firsts[i] > 0 THEN
                INSERT INTO artifacts (artifact_id, kind, size, blob_id, created_at_us)
                    VALUES (p_art_ids[art], p_art_kinds[art], p_art_sizes[art], gen_random_uuid(), now_us)
                    ON CONFLICT (artifact_id) DO NOTHING
                    RETURNING blob_id INTO blob;
                IF FOUND THEN
                    INSERT INTO artifact_chunks (blob_id, idx, data)
                        SELECT blob, g - 1, p_chunk_data[chunk + g]
                        FROM generate_series(1, p_art_chunks[art]) AS g;
                END IF;
            END IF;
            chunk := chunk + p_art_chunks[art];
            art := art + 1;
        END LOOP;
        RETURN NEXT;
    END LOOP;
    -- Then every accepted event in one set-based insert: unnest walks the arrays once, where
    -- subscripting variable-length arrays event by event would walk them again for each one. An
    -- append's key goes on its first event.
    INSERT INTO events (stream_id, seq, type, payload, recorded_at_us, append_key)
        SELECT p_stream_ids[e.owner], firsts[e.owner] + (e.n - 1 - offsets[e.owner]),
               e.type, e.payload, now_us,
               CASE WHEN e.n - 1 = offsets[e.owner] THEN p_keys[e.owner] END
        FROM unnest(p_event_owners, p_types, p_payloads) WITH ORDINALITY AS e(owner, type, payload, n)
        WHERE firsts[e.owner] > 0;
END
$fn$;
"""
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "streams, events and artifacts", _TABLES),
    Migration(2, "append_group: one round trip per group commit", _APPEND_GROUP),
    Migration(3, "append_group: compare-and-swap the head row too (TrimStream)", _APPEND_GROUP_REPLACED),
    Migration(4, "stream_attributes: per-stream attributes set with an append", _ATTRIBUTES),
    Migration(5, "stream_due: the due-time index of parked streams", _DUE),
    Migration(6, "streams.ended_at_us: when the label became terminal", _ENDED_AT),
    Migration(7, "events.append_key: idempotent appends (append_group with p_keys)", _APPEND_GROUP_KEYED),
)


def check_schema_name(schema: str) -> str:
    """`schema` if it is a plain lower-case identifier (it is spliced into SQL), else ValueError."""
    if not SCHEMA_NAME_PATTERN.fullmatch(schema):
        raise ValueError(
            f"schema must be 1 to 40 characters of a-z, 0-9 and _, not starting with a digit; got {schema!r}"
        )
    return schema


def migration_lock_key(schema: str) -> int:
    """The advisory-lock key that serialises migrations of `schema` across all processes."""
    digest = hashlib.sha256(f"keel-store-migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(
    conn: asyncpg.Connection[asyncpg.Record], schema: str, migrations: tuple[Migration, ...] = MIGRATIONS
) -> list[int]:
    """Bring `schema` up to the latest migration; returns the versions this call applied."""
    check_schema_name(schema)
    async with conn.transaction():
        # Held until commit: a replica starting at the same time waits here, then sees our rows.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", migration_lock_key(schema))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(f"SET LOCAL search_path TO {schema}")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {int(row[0]) for row in await conn.fetch("SELECT version FROM schema_migrations")}
        known = {migration.version for migration in migrations}
        if done - known:
            raise KeelError(
                "schema_too_new",
                f"schema {schema!r} has migrations {sorted(done - known)} that this store does not know; "
                "run a store at least as new as the one that migrated it",
                category=ErrorCategory.FAILED_PRECONDITION,
                details={"schema": schema, "unknown_versions": sorted(done - known)},
            )
        applied = []
        for migration in sorted(migrations, key=lambda m: m.version):
            if migration.version in done:
                continue
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
            applied.append(migration.version)
    return applied


__all__ = ["MIGRATIONS", "Migration", "check_schema_name", "migrate", "migration_lock_key"]
