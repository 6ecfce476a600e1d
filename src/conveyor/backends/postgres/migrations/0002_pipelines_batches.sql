-- Conveyor schema version 2 (PostgreSQL): pipelines and batches (docs/pipelines.md). Their
-- progress is written by triggers of their own on conveyor_jobs, in the transaction that finishes
-- a step or a member: the next step is enqueued, a batch counted and completed, whoever (worker,
-- rescuer, operator) ended the job.

-- A job that is a pipeline's step, or a batch's member, names it; NULL for every other job.
ALTER TABLE conveyor_jobs ADD COLUMN pipeline_id bigint;
ALTER TABLE conveyor_jobs ADD COLUMN batch_id bigint;
CREATE INDEX conveyor_jobs_pipeline ON conveyor_jobs (pipeline_id, id) WHERE pipeline_id IS NOT NULL;
CREATE INDEX conveyor_jobs_batch ON conveyor_jobs (batch_id, id) WHERE batch_id IS NOT NULL;

-- A pipeline: ordered steps, one job at a time. steps holds each step's name, task, arguments and
-- job options (JSON); current_step indexes it, current_job_id is that step's job. While running,
-- the step's start is its job's started_at; step_started_at keeps it once the pipeline finished.
CREATE TABLE conveyor_pipelines (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name             text NOT NULL,
    entity           text,
    state            text NOT NULL DEFAULT 'running',
    steps            jsonb NOT NULL,
    current_step     integer NOT NULL DEFAULT 0,
    current_job_id   bigint,
    step_started_at  timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    result           jsonb,
    error            text,
    CONSTRAINT conveyor_pipelines_state_valid
        CHECK (state IN ('running', 'succeeded', 'failed', 'cancelled')),
    CONSTRAINT conveyor_pipelines_finished_iff_terminal
        CHECK ((finished_at IS NOT NULL) = (state <> 'running')),
    CONSTRAINT conveyor_pipelines_result_only_succeeded
        CHECK (result IS NULL OR state = 'succeeded'),
    CONSTRAINT conveyor_pipelines_error_iff_failed
        CHECK ((error IS NOT NULL) = (state IN ('failed', 'cancelled'))),
    CONSTRAINT conveyor_pipelines_steps_valid
        CHECK (jsonb_typeof(steps) = 'array' AND jsonb_array_length(steps) >= 1),
    CONSTRAINT conveyor_pipelines_step_in_range
        CHECK (current_step >= 0 AND current_step < jsonb_array_length(steps)),
    CONSTRAINT conveyor_pipelines_names_valid
        CHECK (length(name) BETWEEN 1 AND 200 AND (entity IS NULL OR length(entity) BETWEEN 1 AND 500))
);

CREATE INDEX conveyor_pipelines_running ON conveyor_pipelines (current_job_id) WHERE state = 'running';
CREATE INDEX conveyor_pipelines_entity ON conveyor_pipelines (entity, id) WHERE entity IS NOT NULL;

-- A batch: jobs enqueued together, counted as they finish; on_complete (a job spec, JSON) is
-- enqueued once, when the last of them finished (completed_at set in that same transaction).
CREATE TABLE conveyor_batches (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    total               integer NOT NULL,
    succeeded           integer NOT NULL DEFAULT 0,
    failed              integer NOT NULL DEFAULT 0,
    on_complete         jsonb,
    on_complete_job_id  bigint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz,
    CONSTRAINT conveyor_batches_counts_valid
        CHECK (total >= 0 AND succeeded >= 0 AND failed >= 0 AND succeeded + failed <= total),
    CONSTRAINT conveyor_batches_callback_after_completion
        CHECK (on_complete_job_id IS NULL OR completed_at IS NOT NULL)
);

-- Insert the job a spec describes (a pipeline step, a batch's on_complete): its arguments are
-- _head followed by the spec's own, its kwargs the spec's updated by _kwargs. Returns its id.
CREATE FUNCTION conveyor_enqueue_spec(_spec jsonb, _head jsonb, _kwargs jsonb, _pipeline bigint)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
DECLARE
    _id bigint;
BEGIN
    INSERT INTO conveyor_jobs (task, queue, args, kwargs, priority, run_at, max_attempts,
                               max_snoozes, deadline, timeout, concurrency_key, concurrency_limit,
                               pipeline_id)
    VALUES (_spec->>'task', _spec->>'queue', _head || (_spec->'args'), (_spec->'kwargs') || _kwargs,
            (_spec->>'priority')::integer,
            now() + (_spec->>'delay')::double precision * interval '1 second',
            (_spec->>'max_attempts')::integer, (_spec->>'max_snoozes')::integer,
            (_spec->>'deadline')::double precision, (_spec->>'timeout')::double precision,
            _spec->>'concurrency_key', (_spec->>'concurrency_limit')::integer, _pipeline)
    RETURNING id INTO _id;
    RETURN _id;
END
$fn$;

-- "step wait_ready exceeded its 120 s deadline (started 12:01:30)": the deadline counts from the
-- step's job's first start (UTC).
CREATE FUNCTION conveyor_step_deadline_error(_name text, _deadline double precision,
                                             _started timestamptz) RETURNS text
LANGUAGE sql STABLE AS $fn$
    SELECT format('step %s exceeded its %s s deadline (started %s)', _name, _deadline,
                  to_char(_started AT TIME ZONE 'UTC', 'HH24:MI:SS'))
$fn$;

-- Why a pipeline failed when its current step's job ended dead or cancelled (_state), or was
-- deleted (_state NULL). A job that died because its deadline ran out (a snooze or retry past it)
-- gets the deadline wording.
CREATE FUNCTION conveyor_step_error(_name text, _job bigint, _state text,
                                    _deadline double precision, _started timestamptz,
                                    _error jsonb) RETURNS text
LANGUAGE sql STABLE AS $fn$
    SELECT CASE
        WHEN _state IS NULL THEN format('step %s (job %s) was deleted', _name, _job)
        WHEN _deadline IS NOT NULL AND _started IS NOT NULL
             AND (_error->>'kind' = 'deadline' OR _error->>'message' LIKE '%deadline runs out first)')
            THEN conveyor_step_deadline_error(_name, _deadline, _started)
        WHEN _state = 'cancelled'
            THEN format('step %s (job %s) was cancelled: %s', _name, _job,
                        coalesce(_error->>'message', 'no reason recorded'))
        ELSE format('step %s (job %s) ended %s: %s', _name, _job, _state,
                    coalesce(_error->>'message', 'no error recorded'))
    END
$fn$;

-- The current step's job of a pipeline ended (_state NULL: it was deleted). The pipeline row is
-- locked first; a job that is not (or no longer) the current step of a running pipeline changes
-- nothing. Success enqueues the next step with the result as its first argument, or finishes the
-- pipeline; anything else fails it.
CREATE FUNCTION conveyor_pipeline_step_ended(_pipeline bigint, _job bigint, _state text,
                                             _result jsonb, _deadline double precision,
                                             _started timestamptz, _error jsonb) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    _p conveyor_pipelines;
    _next bigint;
BEGIN
    SELECT * INTO _p FROM conveyor_pipelines WHERE id = _pipeline FOR UPDATE;
    IF NOT FOUND OR _p.state <> 'running' OR _p.current_job_id IS DISTINCT FROM _job THEN
        RETURN;
    END IF;
    IF _state = 'succeeded' AND _p.current_step + 1 < jsonb_array_length(_p.steps) THEN
        _next := conveyor_enqueue_spec(_p.steps -> (_p.current_step + 1),
                                       jsonb_build_array(coalesce(_result, 'null'::jsonb)),
                                       '{}'::jsonb, _p.id);
        UPDATE conveyor_pipelines
           SET current_step = _p.current_step + 1, current_job_id = _next, updated_at = now()
         WHERE id = _p.id;
    ELSIF _state = 'succeeded' THEN
        UPDATE conveyor_pipelines
           SET state = 'succeeded', result = coalesce(_result, 'null'::jsonb), finished_at = now(),
               updated_at = now(), step_started_at = _started
         WHERE id = _p.id;
    ELSE
        UPDATE conveyor_pipelines
           SET state = 'failed', finished_at = now(), updated_at = now(), step_started_at = _started,
               error = conveyor_step_error(_p.steps -> _p.current_step ->> 'name', _job, _state,
                                           _deadline, _started, _error)
         WHERE id = _p.id;
    END IF;
END
$fn$;

-- A job of a pipeline or batch changed state: flag the transaction for the statement-level
-- trigger below. (This row trigger's WHEN clause costs next to nothing on every other job, where a
-- query over the transition table in every UPDATE statement would not.) The flag stays on until
-- the transaction ends: a statement nested in another's triggers (a dependent cancelled by the
-- dependencies' trigger) must not clear it before the outer statement's own turn.
CREATE FUNCTION conveyor_jobs_flow_row() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM set_config('conveyor.flow_rows', 'on', true);
    RETURN NULL;
END
$fn$;

-- Jobs of pipelines and batches that reached (or, by a manual retry, left) a terminal state:
-- advance their pipelines (locked one by one in id order) and count their batches (all locked
-- first, in id order, so two transactions finishing the last two jobs of a batch at once are
-- serialized: the second one counts on top of the first one's commit). Runs after the row
-- triggers of its statement, and only in a transaction one of them flagged; it looks at the
-- transitions of its own statement only, so running again in a flagged transaction is harmless.
CREATE FUNCTION conveyor_jobs_after_update_flows() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    _r record;
    _batches bigint[];
BEGIN
    IF current_setting('conveyor.flow_rows', true) IS DISTINCT FROM 'on' THEN
        RETURN NULL;
    END IF;
    FOR _r IN
        SELECT n.* FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.pipeline_id IS NOT NULL
           AND n.state IN ('succeeded', 'dead', 'cancelled')
           AND o.state NOT IN ('succeeded', 'dead', 'cancelled')
         ORDER BY n.pipeline_id, n.id
    LOOP
        PERFORM conveyor_pipeline_step_ended(_r.pipeline_id, _r.id, _r.state, _r.result,
                                             _r.deadline, _r.started_at, _r.last_error);
    END LOOP;
    _batches := ARRAY(
        SELECT DISTINCT n.batch_id FROM new_rows n JOIN old_rows o ON o.id = n.id
         WHERE n.batch_id IS NOT NULL
           AND (n.state IN ('succeeded', 'dead', 'cancelled'))
               <> (o.state IN ('succeeded', 'dead', 'cancelled'))
         ORDER BY 1);
    IF cardinality(_batches) > 0 THEN
        PERFORM 1 FROM conveyor_batches WHERE id = ANY(_batches) ORDER BY id FOR UPDATE;
        UPDATE conveyor_batches b
           SET succeeded = b.succeeded + d.succeeded, failed = b.failed + d.failed,
               updated_at = now()
          FROM (SELECT n.batch_id,
                       count(*) FILTER (WHERE n.state = 'succeeded')
                       - count(*) FILTER (WHERE o.state = 'succeeded') AS succeeded,
                       count(*) FILTER (WHERE n.state IN ('dead', 'cancelled'))
                       - count(*) FILTER (WHERE o.state IN ('dead', 'cancelled')) AS failed
                  FROM new_rows n JOIN old_rows o ON o.id = n.id
                 WHERE n.batch_id = ANY(_batches)
                 GROUP BY n.batch_id) d
         WHERE b.id = d.batch_id;
    END IF;
    RETURN NULL;
END
$fn$;

-- A deleted job that had not finished fails its pipeline (if it was the current step) and counts
-- as failed in its batch.
CREATE FUNCTION conveyor_jobs_after_delete_flows() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    _r record;
    _batches bigint[];
BEGIN
    IF NOT EXISTS (SELECT 1 FROM old_rows o
                    WHERE (o.pipeline_id IS NOT NULL OR o.batch_id IS NOT NULL)
                      AND o.state NOT IN ('succeeded', 'dead', 'cancelled')) THEN
        RETURN NULL;
    END IF;
    FOR _r IN
        SELECT o.* FROM old_rows o
         WHERE o.pipeline_id IS NOT NULL AND o.state NOT IN ('succeeded', 'dead', 'cancelled')
         ORDER BY o.pipeline_id, o.id
    LOOP
        PERFORM conveyor_pipeline_step_ended(_r.pipeline_id, _r.id, NULL, NULL, NULL, NULL, NULL);
    END LOOP;
    _batches := ARRAY(
        SELECT DISTINCT o.batch_id FROM old_rows o
         WHERE o.batch_id IS NOT NULL AND o.state NOT IN ('succeeded', 'dead', 'cancelled')
         ORDER BY 1);
    IF cardinality(_batches) > 0 THEN
        PERFORM 1 FROM conveyor_batches WHERE id = ANY(_batches) ORDER BY id FOR UPDATE;
        UPDATE conveyor_batches b
           SET failed = b.failed + d.n, updated_at = now()
          FROM (SELECT o.batch_id, count(*) AS n FROM old_rows o
                 WHERE o.batch_id = ANY(_batches) AND o.state NOT IN ('succeeded', 'dead', 'cancelled')
                 GROUP BY o.batch_id) d
         WHERE b.id = d.batch_id;
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER conveyor_jobs_flow_row AFTER UPDATE OF state ON conveyor_jobs
    FOR EACH ROW WHEN ((NEW.pipeline_id IS NOT NULL OR NEW.batch_id IS NOT NULL)
                       AND NEW.state IS DISTINCT FROM OLD.state)
    EXECUTE FUNCTION conveyor_jobs_flow_row();
CREATE TRIGGER conveyor_jobs_after_update_flows AFTER UPDATE ON conveyor_jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_jobs_after_update_flows();
CREATE TRIGGER conveyor_jobs_after_delete_flows AFTER DELETE ON conveyor_jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_jobs_after_delete_flows();

-- The update that makes a batch's counts reach its total completes it: completed_at is set and
-- on_complete enqueued with the counts as its first argument. The WHEN clause sees the row after
-- this update, which holds the row lock until commit, so exactly one transaction completes it.
CREATE FUNCTION conveyor_batches_complete() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    _job bigint;
BEGIN
    IF NEW.on_complete IS NOT NULL THEN
        _job := conveyor_enqueue_spec(
            NEW.on_complete,
            jsonb_build_array(jsonb_build_object('batch_id', NEW.id, 'total', NEW.total,
                                                 'succeeded', NEW.succeeded, 'failed', NEW.failed)),
            '{}'::jsonb, NULL);
    END IF;
    UPDATE conveyor_batches SET completed_at = now(), updated_at = now(), on_complete_job_id = _job
     WHERE id = NEW.id;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER conveyor_batches_complete AFTER UPDATE OF total, succeeded, failed ON conveyor_batches
    FOR EACH ROW WHEN (NEW.completed_at IS NULL AND NEW.succeeded + NEW.failed >= NEW.total)
    EXECUTE FUNCTION conveyor_batches_complete();

-- Tell subscribers (LISTEN conveyor_flow_state) which pipelines ('p12') and batches ('b7')
-- changed; identical notifications of one transaction are delivered once, at commit.
CREATE FUNCTION conveyor_notify_flow() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('conveyor_flow_state', TG_ARGV[0] || NEW.id);
    RETURN NULL;
END
$fn$;

CREATE TRIGGER conveyor_pipelines_notify AFTER UPDATE ON conveyor_pipelines
    FOR EACH ROW EXECUTE FUNCTION conveyor_notify_flow('p');
CREATE TRIGGER conveyor_batches_notify AFTER UPDATE ON conveyor_batches
    FOR EACH ROW EXECUTE FUNCTION conveyor_notify_flow('b');
