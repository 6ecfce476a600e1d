-- Conveyor schema version 2 (SQLite): pipelines and batches (docs/pipelines.md). Their progress is
-- written by triggers of their own on conveyor_jobs, in the transaction that finishes a step or a
-- member (SQLite's single writer serializes those transactions): the next step is enqueued, a
-- batch counted and completed, whoever (worker, rescuer, operator) ended the job.

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
