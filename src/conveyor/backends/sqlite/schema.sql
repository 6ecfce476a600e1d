-- The current Conveyor schema for SQLite, as the migrations leave it (today: the
-- conveyor_migrations table that the migrator creates, plus migrations/0001_initial.sql, 0002 in
-- its section below, 0003, which changed two triggers of 0001 in place, 0004 to 0007, which
-- change nothing on SQLite, 0008's two indexes and 0009's table). This file documents the
-- schema: Conveyor never runs it, the migrations build every database. Change the schema with a
-- new migration and update this file to match (tests/contract/test_schema.py builds a database
-- from each and compares their catalogs). Times are REAL seconds since the Unix epoch (UTC)
-- from SQLite's clock, JSON is TEXT checked with json_valid, booleans are 0/1.
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
-- dependency that no longer exists was pruned after finishing, and blocks nothing). Since
-- migrations/0003, the UPDATE runs only for a job that has dependents (most have none).
CREATE TRIGGER conveyor_jobs_release_dependents AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.state = 'succeeded' AND OLD.state <> 'succeeded'
    AND EXISTS (SELECT 1 FROM conveyor_job_deps WHERE depends_on = NEW.id)
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
-- Since migrations/0003, only for a job that has dependents.
CREATE TRIGGER conveyor_jobs_cancel_dependents AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.state IN ('dead', 'cancelled') AND OLD.state NOT IN ('dead', 'cancelled')
    AND EXISTS (SELECT 1 FROM conveyor_job_deps WHERE depends_on = NEW.id)
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

-- ---- migrations/0002_pipelines_batches.sql: pipelines and batches (docs/pipelines.md) ----

-- A job that is a pipeline's step, or a batch's member, names it; NULL for every other job.
ALTER TABLE conveyor_jobs ADD COLUMN pipeline_id INTEGER;
ALTER TABLE conveyor_jobs ADD COLUMN batch_id INTEGER;
CREATE INDEX conveyor_jobs_pipeline ON conveyor_jobs (pipeline_id, id) WHERE pipeline_id IS NOT NULL;
CREATE INDEX conveyor_jobs_batch ON conveyor_jobs (batch_id, id) WHERE batch_id IS NOT NULL;

-- A pipeline: ordered steps, one job at a time. steps holds each step's name, task, arguments and
-- job options (JSON); current_step indexes it, current_job_id is that step's job. While running,
-- the step's start is its job's started_at; step_started_at keeps it once the pipeline finished.
CREATE TABLE conveyor_pipelines (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT NOT NULL,
    entity           TEXT,
    state            TEXT NOT NULL DEFAULT 'running',
    steps            TEXT NOT NULL,
    current_step     INTEGER NOT NULL DEFAULT 0,
    current_job_id   INTEGER,
    step_started_at  REAL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    finished_at      REAL,
    result           TEXT CHECK (result IS NULL OR json_valid(result)),
    error            TEXT,
    CONSTRAINT conveyor_pipelines_state_valid
        CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT conveyor_pipelines_finished_iff_terminal
        CHECK ((finished_at IS NOT NULL) = (state <> 'running')),
    CONSTRAINT conveyor_pipelines_result_only_succeeded
        CHECK (result IS NULL OR state = 'succeeded'),
    CONSTRAINT conveyor_pipelines_error_iff_failed
        CHECK ((error IS NOT NULL) = (state IN ('failed', 'cancelled'))),
    CONSTRAINT conveyor_pipelines_steps_valid
        CHECK (json_valid(steps) AND json_type(steps) = 'array' AND json_array_length(steps) >= 1),
    CONSTRAINT conveyor_pipelines_step_in_range
        CHECK (current_step >= 0 AND current_step < json_array_length(steps)),
    CONSTRAINT conveyor_pipelines_names_valid
        CHECK (length(name) BETWEEN 1 AND 200 AND (entity IS NULL OR length(entity) BETWEEN 1 AND 500))
);

CREATE INDEX conveyor_pipelines_running ON conveyor_pipelines (current_job_id) WHERE state = 'running';
CREATE INDEX conveyor_pipelines_entity ON conveyor_pipelines (entity, id) WHERE entity IS NOT NULL;
-- Finished pipelines, oldest first, for the pruner (migration 0008).
CREATE INDEX conveyor_pipelines_finished ON conveyor_pipelines (finished_at) WHERE state <> 'running';

-- A batch: jobs enqueued together, counted as they finish; on_complete (a job spec, JSON) is
-- enqueued once, when the last of them finished (completed_at set in that same transaction).
CREATE TABLE conveyor_batches (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    total               INTEGER NOT NULL,
    succeeded           INTEGER NOT NULL DEFAULT 0,
    failed              INTEGER NOT NULL DEFAULT 0,
    on_complete         TEXT CHECK (on_complete IS NULL OR json_valid(on_complete)),
    on_complete_job_id  INTEGER,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    completed_at        REAL,
    CONSTRAINT conveyor_batches_counts_valid
        CHECK (total >= 0 AND succeeded >= 0 AND failed >= 0 AND succeeded + failed <= total),
    CONSTRAINT conveyor_batches_callback_after_completion
        CHECK (on_complete_job_id IS NULL OR completed_at IS NOT NULL)
);

-- Completed batches, oldest first, for the pruner (migration 0008).
CREATE INDEX conveyor_batches_completed ON conveyor_batches (completed_at)
    WHERE completed_at IS NOT NULL;

-- The current step's job of a running pipeline ended. Success enqueues the next step (its
-- arguments: the result, then the step's own) or finishes the pipeline with that result; dead or
-- cancelled fails it, with the deadline wording when the job died of its deadline ("step
-- wait_ready exceeded its 120 s deadline (started 12:01:30)", UTC). A job that is not (or no
-- longer) the current step of a running pipeline changes nothing.
CREATE TRIGGER conveyor_jobs_pipeline_step AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.pipeline_id IS NOT NULL
    AND NEW.state IN ('succeeded', 'dead', 'cancelled')
    AND OLD.state NOT IN ('succeeded', 'dead', 'cancelled')
BEGIN
    INSERT INTO conveyor_jobs (task, queue, args, kwargs, priority, created_at, run_at,
                               max_attempts, max_snoozes, deadline, timeout, concurrency_key,
                               concurrency_limit, pipeline_id)
    SELECT json_extract(s.value, '$.task'), json_extract(s.value, '$.queue'),
           json('[' || coalesce(NEW.result, 'null')
                || CASE WHEN json_array_length(s.value, '$.args') = 0 THEN ']'
                        ELSE ',' || substr(json_extract(s.value, '$.args'), 2) END),
           json_extract(s.value, '$.kwargs'), json_extract(s.value, '$.priority'),
           ((julianday('now') - 2440587.5) * 86400.0),
           ((julianday('now') - 2440587.5) * 86400.0) + json_extract(s.value, '$.delay'),
           json_extract(s.value, '$.max_attempts'), json_extract(s.value, '$.max_snoozes'),
           json_extract(s.value, '$.deadline'), json_extract(s.value, '$.timeout'),
           json_extract(s.value, '$.concurrency_key'), json_extract(s.value, '$.concurrency_limit'),
           p.id
      FROM conveyor_pipelines p JOIN json_each(p.steps) s ON s.key = p.current_step + 1
     WHERE p.id = NEW.pipeline_id AND p.state = 'running' AND p.current_job_id = NEW.id
       AND NEW.state = 'succeeded';
    UPDATE conveyor_pipelines
       SET current_step = current_step + 1,
           current_job_id = (SELECT max(id) FROM conveyor_jobs WHERE pipeline_id = NEW.pipeline_id),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0)
     WHERE id = NEW.pipeline_id AND state = 'running' AND current_job_id = NEW.id
       AND NEW.state = 'succeeded' AND current_step + 1 < json_array_length(steps);
    UPDATE conveyor_pipelines
       SET state = 'succeeded', result = coalesce(NEW.result, 'null'),
           finished_at = ((julianday('now') - 2440587.5) * 86400.0),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0), step_started_at = NEW.started_at
     WHERE id = NEW.pipeline_id AND state = 'running' AND current_job_id = NEW.id
       AND NEW.state = 'succeeded';
    UPDATE conveyor_pipelines
       SET state = 'failed',
           finished_at = ((julianday('now') - 2440587.5) * 86400.0),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0), step_started_at = NEW.started_at,
           error = 'step ' || json_extract(steps, '$[' || current_step || '].name') || CASE
               WHEN NEW.deadline IS NOT NULL AND NEW.started_at IS NOT NULL
                    AND (json_extract(NEW.last_error, '$.kind') = 'deadline'
                         OR json_extract(NEW.last_error, '$.message') LIKE '%deadline runs out first)')
                   THEN ' exceeded its ' || printf('%g', NEW.deadline) || ' s deadline (started '
                        || printf('%02d:%02d:%02d', (CAST(NEW.started_at AS INTEGER) / 3600) % 24,
                                  (CAST(NEW.started_at AS INTEGER) / 60) % 60,
                                  CAST(NEW.started_at AS INTEGER) % 60) || ')'
               WHEN NEW.state = 'cancelled'
                   THEN ' (job ' || NEW.id || ') was cancelled: '
                        || coalesce(json_extract(NEW.last_error, '$.message'), 'no reason recorded')
               ELSE ' (job ' || NEW.id || ') ended ' || NEW.state || ': '
                    || coalesce(json_extract(NEW.last_error, '$.message'), 'no error recorded')
           END
     WHERE id = NEW.pipeline_id AND state = 'running' AND current_job_id = NEW.id
       AND NEW.state <> 'succeeded';
END;

-- A batch's member reached (or, by a manual retry, left) a terminal state: count it.
CREATE TRIGGER conveyor_jobs_batch_count AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.batch_id IS NOT NULL
    AND (NEW.state IN ('succeeded', 'dead', 'cancelled'))
        <> (OLD.state IN ('succeeded', 'dead', 'cancelled'))
BEGIN
    UPDATE conveyor_batches
       SET succeeded = succeeded + (NEW.state = 'succeeded') - (OLD.state = 'succeeded'),
           failed = failed + (NEW.state IN ('dead', 'cancelled'))
                    - (OLD.state IN ('dead', 'cancelled')),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0)
     WHERE id = NEW.batch_id;
END;

-- A deleted job that had not finished fails its pipeline (if it was the current step) and counts
-- as failed in its batch.
CREATE TRIGGER conveyor_jobs_deleted_flows AFTER DELETE ON conveyor_jobs
FOR EACH ROW WHEN (OLD.pipeline_id IS NOT NULL OR OLD.batch_id IS NOT NULL)
    AND OLD.state NOT IN ('succeeded', 'dead', 'cancelled')
BEGIN
    UPDATE conveyor_pipelines
       SET state = 'failed',
           finished_at = ((julianday('now') - 2440587.5) * 86400.0),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0),
           error = 'step ' || json_extract(steps, '$[' || current_step || '].name')
                   || ' (job ' || OLD.id || ') was deleted'
     WHERE id = OLD.pipeline_id AND state = 'running' AND current_job_id = OLD.id;
    UPDATE conveyor_batches
       SET failed = failed + 1, updated_at = ((julianday('now') - 2440587.5) * 86400.0)
     WHERE id = OLD.batch_id;
END;

-- The update that makes a batch's counts reach its total completes it: on_complete is enqueued
-- with the counts as its first argument, and completed_at set, so it never happens twice.
CREATE TRIGGER conveyor_batches_complete AFTER UPDATE OF total, succeeded, failed ON conveyor_batches
FOR EACH ROW WHEN NEW.completed_at IS NULL AND NEW.succeeded + NEW.failed >= NEW.total
BEGIN
    INSERT INTO conveyor_jobs (task, queue, args, kwargs, priority, created_at, run_at,
                               max_attempts, max_snoozes, deadline, timeout, concurrency_key,
                               concurrency_limit)
    SELECT json_extract(NEW.on_complete, '$.task'), json_extract(NEW.on_complete, '$.queue'),
           json('[' || json_object('batch_id', NEW.id, 'total', NEW.total,
                                   'succeeded', NEW.succeeded, 'failed', NEW.failed)
                || CASE WHEN json_array_length(NEW.on_complete, '$.args') = 0 THEN ']'
                        ELSE ',' || substr(json_extract(NEW.on_complete, '$.args'), 2) END),
           json_extract(NEW.on_complete, '$.kwargs'), json_extract(NEW.on_complete, '$.priority'),
           ((julianday('now') - 2440587.5) * 86400.0),
           ((julianday('now') - 2440587.5) * 86400.0) + json_extract(NEW.on_complete, '$.delay'),
           json_extract(NEW.on_complete, '$.max_attempts'),
           json_extract(NEW.on_complete, '$.max_snoozes'),
           json_extract(NEW.on_complete, '$.deadline'), json_extract(NEW.on_complete, '$.timeout'),
           json_extract(NEW.on_complete, '$.concurrency_key'),
           json_extract(NEW.on_complete, '$.concurrency_limit')
     WHERE NEW.on_complete IS NOT NULL;
    UPDATE conveyor_batches
       SET completed_at = ((julianday('now') - 2440587.5) * 86400.0),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0),
           on_complete_job_id = CASE WHEN NEW.on_complete IS NOT NULL THEN last_insert_rowid() END
     WHERE id = NEW.id;
END;

-- ---- migrations/0003_hot_path.sql: conveyor_jobs_release_dependents and
-- conveyor_jobs_cancel_dependents (above) only run their UPDATE for a job with dependents. 0003
-- recreates the triggers of 0002 after them, unchanged, so that all fire in the same order (SQLite
-- fires a table's triggers newest first), which is the order they are created in this file.

-- The last tick enqueued of each periodic schedule (migration 0009): a tick is enqueued only by
-- the statement that moves last_tick forward to it, in the transaction that inserts its job.
CREATE TABLE conveyor_periodic (
    name       TEXT PRIMARY KEY,
    last_tick  REAL NOT NULL,
    CONSTRAINT conveyor_periodic_name_valid CHECK (length(name) BETWEEN 1 AND 200)
);
