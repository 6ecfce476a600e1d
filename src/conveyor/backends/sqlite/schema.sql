-- The current Conveyor schema for SQLite, as the migrations leave it (today: the
-- conveyor_migrations table that the migrator creates, plus migrations/0001_initial.sql). This file
-- documents the schema: Conveyor never runs it, the migrations build every database. Change the
-- schema with a new migration and update this file to match (tests/contract/test_schema.py builds a
-- database from each and compares their catalogs). Times are REAL seconds since the
-- Unix epoch (UTC) from SQLite's clock, JSON is TEXT checked with json_valid, booleans are 0/1.
-- docs/state-machine.md documents the invariants the CHECK constraints enforce.

-- Applied migrations (created by the migrator, before the first migration runs).
CREATE TABLE conveyor_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at REAL NOT NULL
);

CREATE TABLE conveyor_jobs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    queue             TEXT NOT NULL,
    task              TEXT NOT NULL,
    args              TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(args)),
    kwargs            TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(kwargs)),
    state             TEXT NOT NULL DEFAULT 'queued',
    priority          INTEGER NOT NULL DEFAULT 0,
    created_at        REAL NOT NULL,
    run_at            REAL NOT NULL,
    started_at        REAL,
    attempted_at      REAL,
    finished_at       REAL,
    heartbeat_at      REAL,
    lease_owner       TEXT,
    lease_expires_at  REAL,
    attempt           INTEGER NOT NULL DEFAULT 0,
    max_attempts      INTEGER NOT NULL,
    snoozes           INTEGER NOT NULL DEFAULT 0,
    max_snoozes       INTEGER,
    deadline          REAL,
    timeout           REAL,
    last_error        TEXT CHECK (last_error IS NULL OR json_valid(last_error)),
    errors            TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(errors)),
    result            TEXT CHECK (result IS NULL OR json_valid(result)),
    unique_key        TEXT,
    idempotency_key   TEXT,
    concurrency_key   TEXT,
    concurrency_limit INTEGER NOT NULL DEFAULT 1,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    CONSTRAINT conveyor_jobs_state_valid
        CHECK (state IN ('queued', 'running', 'retrying', 'succeeded', 'dead', 'cancelled')),
    CONSTRAINT conveyor_jobs_finished_iff_terminal
        CHECK ((finished_at IS NOT NULL) = (state IN ('succeeded', 'dead', 'cancelled'))),
    CONSTRAINT conveyor_jobs_finished_after_attempted
        CHECK (finished_at IS NULL OR attempted_at IS NULL OR finished_at >= attempted_at),
    CONSTRAINT conveyor_jobs_lease_iff_running
        CHECK ((state = 'running') = (lease_owner IS NOT NULL)
               AND (state = 'running') = (lease_expires_at IS NOT NULL)),
    CONSTRAINT conveyor_jobs_running_attempted
        CHECK (state <> 'running' OR (attempted_at IS NOT NULL AND started_at IS NOT NULL AND attempt >= 1)),
    CONSTRAINT conveyor_jobs_attempt_range
        CHECK (attempt >= 0 AND attempt <= max_attempts),
    CONSTRAINT conveyor_jobs_waiting_is_claimable
        CHECK (state NOT IN ('queued', 'retrying') OR attempt < max_attempts),
    CONSTRAINT conveyor_jobs_result_only_succeeded
        CHECK (result IS NULL OR state = 'succeeded'),
    CONSTRAINT conveyor_jobs_cancel_only_running
        CHECK (cancel_requested IN (0, 1) AND (cancel_requested = 0 OR state = 'running')),
    CONSTRAINT conveyor_jobs_limits_positive
        CHECK (max_attempts >= 1 AND snoozes >= 0 AND concurrency_limit >= 1
               AND (max_snoozes IS NULL OR max_snoozes >= 0)
               AND (deadline IS NULL OR deadline > 0)
               AND (timeout IS NULL OR timeout > 0)),
    CONSTRAINT conveyor_jobs_names_valid
        CHECK (length(queue) BETWEEN 1 AND 100 AND length(task) BETWEEN 1 AND 200)
);

CREATE INDEX conveyor_jobs_fetch ON conveyor_jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('queued', 'retrying') AND concurrency_key IS NULL;
CREATE INDEX conveyor_jobs_fetch_keyed ON conveyor_jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('queued', 'retrying') AND concurrency_key IS NOT NULL;
CREATE INDEX conveyor_jobs_running ON conveyor_jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX conveyor_jobs_running_key ON conveyor_jobs (concurrency_key)
    WHERE state = 'running' AND concurrency_key IS NOT NULL;
CREATE INDEX conveyor_jobs_running_queue ON conveyor_jobs (queue) WHERE state = 'running';
CREATE INDEX conveyor_jobs_finished ON conveyor_jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX conveyor_jobs_unique_key ON conveyor_jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('queued', 'running', 'retrying');
CREATE UNIQUE INDEX conveyor_jobs_idempotency_key ON conveyor_jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE conveyor_queues (
    name              TEXT PRIMARY KEY,
    concurrency_limit INTEGER,
    updated_at        REAL NOT NULL,
    CONSTRAINT conveyor_queues_limit_positive CHECK (concurrency_limit IS NULL OR concurrency_limit >= 1)
);

CREATE TABLE conveyor_workers (
    id            TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    queues        TEXT NOT NULL DEFAULT '[]',
    concurrency   INTEGER NOT NULL,
    started_at    REAL NOT NULL,
    last_seen_at  REAL NOT NULL,
    stopped_at    REAL
);
