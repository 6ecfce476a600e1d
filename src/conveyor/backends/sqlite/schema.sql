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
        CHECK (state IN ('waiting', 'queued', 'running', 'retrying', 'succeeded', 'dead', 'cancelled')),
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
    CONSTRAINT conveyor_jobs_pending_can_run
        CHECK (state NOT IN ('waiting', 'queued', 'retrying') OR attempt < max_attempts),
    CONSTRAINT conveyor_jobs_waiting_never_started
        CHECK (state <> 'waiting' OR (attempt = 0 AND started_at IS NULL AND attempted_at IS NULL)),
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
    WHERE unique_key IS NOT NULL AND state IN ('waiting', 'queued', 'running', 'retrying');
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

-- Job history: one row per insert and per state transition of a job, written by the triggers
-- below so that no code path can forget it. Ordered by id; the error is the last_error the
-- transition recorded (without its traceback, which stays in the job's errors).
CREATE TABLE conveyor_job_events (
    id          INTEGER PRIMARY KEY,
    job_id      INTEGER NOT NULL,
    at          REAL NOT NULL,
    from_state  TEXT,
    to_state    TEXT NOT NULL,
    worker      TEXT,
    attempt     INTEGER NOT NULL,
    error       TEXT CHECK (error IS NULL OR json_valid(error))
);

CREATE INDEX conveyor_job_events_job ON conveyor_job_events (job_id, id);
CREATE INDEX conveyor_job_events_at ON conveyor_job_events (at);

CREATE TRIGGER conveyor_jobs_history_insert AFTER INSERT ON conveyor_jobs
FOR EACH ROW
BEGIN
    INSERT INTO conveyor_job_events (job_id, at, from_state, to_state, worker, attempt, error)
    VALUES (NEW.id, ((julianday('now') - 2440587.5) * 86400.0), NULL, NEW.state,
            NEW.lease_owner, NEW.attempt, json_remove(NEW.last_error, '$.traceback'));
END;

-- The worker is the lease owner involved: the new one on a claim, the old one when a running job
-- leaves running. The attempt is the one that ended when leaving running, else the new one.
CREATE TRIGGER conveyor_jobs_history_update AFTER UPDATE OF state, attempt ON conveyor_jobs
FOR EACH ROW WHEN OLD.state IS NOT NEW.state OR OLD.attempt IS NOT NEW.attempt
BEGIN
    INSERT INTO conveyor_job_events (job_id, at, from_state, to_state, worker, attempt, error)
    VALUES (NEW.id, ((julianday('now') - 2440587.5) * 86400.0), OLD.state, NEW.state,
            coalesce(NEW.lease_owner, OLD.lease_owner),
            CASE WHEN OLD.state = 'running' THEN OLD.attempt ELSE NEW.attempt END,
            CASE WHEN NEW.last_error IS NOT OLD.last_error
                 THEN json_remove(NEW.last_error, '$.traceback') END);
END;

-- Dependencies: a job enqueued with depends_on waits (state 'waiting', never claimed) until every
-- job it depends on succeeded. Dependencies always existed before their dependents, so
-- depends_on < job_id: the graph cannot have a cycle.
CREATE TABLE conveyor_job_deps (
    job_id      INTEGER NOT NULL,
    depends_on  INTEGER NOT NULL,
    PRIMARY KEY (job_id, depends_on),
    CONSTRAINT conveyor_job_deps_acyclic CHECK (depends_on < job_id)
) WITHOUT ROWID;

CREATE INDEX conveyor_job_deps_depends_on ON conveyor_job_deps (depends_on);

-- A job that succeeded releases each waiting dependent whose dependencies all succeeded (a
-- dependency that no longer exists was pruned after finishing, and blocks nothing).
CREATE TRIGGER conveyor_jobs_release_dependents AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.state = 'succeeded' AND OLD.state <> 'succeeded'
BEGIN
    UPDATE conveyor_jobs
       SET state = 'queued', run_at = max(run_at, ((julianday('now') - 2440587.5) * 86400.0))
     WHERE state = 'waiting'
       AND id IN (SELECT job_id FROM conveyor_job_deps WHERE depends_on = NEW.id)
       AND NOT EXISTS (SELECT 1 FROM conveyor_job_deps d JOIN conveyor_jobs p ON p.id = d.depends_on
                        WHERE d.job_id = conveyor_jobs.id AND p.state <> 'succeeded');
END;

-- A job that ended dead or cancelled cancels its waiting dependents, naming it (or, when it was
-- itself cancelled by a dependency, passing on the job that failed). The dependents' own
-- cancellation fires this trigger again: the backend turns on PRAGMA recursive_triggers, so the
-- cancellation reaches every transitive dependent (up to SQLite's trigger depth, 1000 levels).
CREATE TRIGGER conveyor_jobs_cancel_dependents AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.state IN ('dead', 'cancelled') AND OLD.state NOT IN ('dead', 'cancelled')
BEGIN
    UPDATE conveyor_jobs
       SET state = 'cancelled', finished_at = ((julianday('now') - 2440587.5) * 86400.0),
           last_error = json_object(
               'attempt', attempt, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
               'kind', 'dependency',
               'message', CASE WHEN json_extract(NEW.last_error, '$.kind') = 'dependency'
                               THEN json_extract(NEW.last_error, '$.message')
                               ELSE 'dependency job ' || NEW.id || ' (' || NEW.task || ') ended '
                                    || NEW.state END),
           errors = json_insert(errors, '$[#]', json_object(
               'attempt', attempt, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
               'kind', 'dependency',
               'message', CASE WHEN json_extract(NEW.last_error, '$.kind') = 'dependency'
                               THEN json_extract(NEW.last_error, '$.message')
                               ELSE 'dependency job ' || NEW.id || ' (' || NEW.task || ') ended '
                                    || NEW.state END))
     WHERE state = 'waiting'
       AND id IN (SELECT job_id FROM conveyor_job_deps WHERE depends_on = NEW.id);
END;

-- A deleted job takes its history and its dependency edges with it, and cancels the jobs still
-- waiting for it.
CREATE TRIGGER conveyor_jobs_deleted AFTER DELETE ON conveyor_jobs
FOR EACH ROW
BEGIN
    DELETE FROM conveyor_job_events WHERE job_id = OLD.id;
    DELETE FROM conveyor_job_deps WHERE job_id = OLD.id;
    UPDATE conveyor_jobs
       SET state = 'cancelled', finished_at = ((julianday('now') - 2440587.5) * 86400.0),
           last_error = json_object(
               'attempt', attempt, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
               'kind', 'dependency',
               'message', 'dependency job ' || OLD.id || ' (' || OLD.task || ') was deleted'),
           errors = json_insert(errors, '$[#]', json_object(
               'attempt', attempt, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
               'kind', 'dependency',
               'message', 'dependency job ' || OLD.id || ' (' || OLD.task || ') was deleted'))
     WHERE state = 'waiting'
       AND id IN (SELECT job_id FROM conveyor_job_deps WHERE depends_on = OLD.id);
END;

-- Maintenance that one worker of the fleet runs per interval (the pruner): who last ran it, when.
CREATE TABLE conveyor_leader (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    started_at  REAL NOT NULL
);
