-- Conveyor schema version 3 (PostgreSQL): a cheaper hot path (docs/performance.md).

-- Claim: as in version 1, but the claimed jobs are re-read in claim order only when both paths
-- (limited and unlimited) chose jobs and there are more than _limit of them; otherwise the ids
-- chosen are exactly the ones to claim. Its statements keep one generic plan per session: left
-- to choose, PostgreSQL planned them again at every call (0.3 ms, most of claiming one job);
-- only the limited path's query, seldom run, is planned at each call.
CREATE OR REPLACE FUNCTION conveyor_claim(_worker text, _queues text[], _limit integer,
                                          _lease double precision)
RETURNS SETOF conveyor_jobs
LANGUAGE plpgsql VOLATILE SET plan_cache_mode = force_generic_plan AS $fn$
DECLARE
    _limited text[];
    _unlimited text[];
    _ids bigint[] := '{}';
BEGIN
    SELECT coalesce(array_agg(name), '{}') INTO _limited
      FROM conveyor_queues WHERE name = ANY(_queues) AND concurrency_limit IS NOT NULL;
    SELECT coalesce(array_agg(q), '{}') INTO _unlimited
      FROM unnest(_queues) AS q WHERE q <> ALL(_limited);

    IF EXISTS (SELECT 1 FROM conveyor_jobs
                WHERE state IN ('queued', 'retrying') AND concurrency_key IS NOT NULL
                  AND queue = ANY(_queues) AND run_at <= now())
       OR (cardinality(_limited) > 0 AND EXISTS (
               SELECT 1 FROM conveyor_jobs
                WHERE state IN ('queued', 'retrying') AND queue = ANY(_limited) AND run_at <= now()))
    THEN
        PERFORM pg_advisory_xact_lock(7262100438);  -- 'conveyor claim' lock
        -- Planned at each call, with the values (EXECUTE): a generic plan of this query read
        -- the whole jobs table, under the lock.
        EXECUTE $q$SELECT ARRAY(
            WITH queue_room AS (
                SELECT q.name, q.concurrency_limit - (
                           SELECT count(*) FROM conveyor_jobs r
                            WHERE r.state = 'running' AND r.queue = q.name) AS room
                  FROM conveyor_queues q WHERE q.name = ANY($2)
            ), candidates AS (
                SELECT j.id, j.queue, j.concurrency_key, j.concurrency_limit, j.priority, j.run_at
                  FROM conveyor_jobs j
                 WHERE j.state IN ('queued', 'retrying') AND j.run_at <= now()
                   AND j.queue = ANY($1)
                   AND (j.concurrency_key IS NOT NULL OR j.queue = ANY($2))
                   AND (j.concurrency_key IS NULL OR (
                           SELECT count(*) FROM conveyor_jobs r
                            WHERE r.state = 'running' AND r.concurrency_key = j.concurrency_key
                       ) < j.concurrency_limit)
                   AND NOT EXISTS (SELECT 1 FROM queue_room qr
                                    WHERE qr.name = j.queue AND qr.room <= 0)
                 ORDER BY j.priority DESC, j.run_at, j.id
                 LIMIT $3 * 4
                   FOR UPDATE OF j SKIP LOCKED
            ), key_ranked AS (
                SELECT c.*,
                       row_number() OVER (PARTITION BY c.concurrency_key
                                          ORDER BY c.priority DESC, c.run_at, c.id) AS krank
                  FROM candidates c
            ), ranked AS (  -- the jobs their key lets run, ranked within their queue
                SELECT k.*,
                       row_number() OVER (PARTITION BY k.queue
                                          ORDER BY k.priority DESC, k.run_at, k.id) AS qrank
                  FROM key_ranked k
                 WHERE k.concurrency_key IS NULL OR k.krank + (
                           SELECT count(*) FROM conveyor_jobs x
                            WHERE x.state = 'running' AND x.concurrency_key = k.concurrency_key
                       ) <= k.concurrency_limit
            )
            SELECT r.id
              FROM ranked r LEFT JOIN queue_room qr ON qr.name = r.queue
             WHERE qr.name IS NULL OR r.qrank <= qr.room
             ORDER BY r.priority DESC, r.run_at, r.id
             LIMIT $3)$q$
           INTO _ids USING _queues, _limited, _limit;
    END IF;

    IF cardinality(_unlimited) > 0 THEN
        _ids := _ids || ARRAY(
            SELECT c.id
              FROM unnest(_unlimited) AS q(name)
             CROSS JOIN LATERAL (
                SELECT j.id, j.priority, j.run_at FROM conveyor_jobs j
                 WHERE j.queue = q.name AND j.state IN ('queued', 'retrying')
                   AND j.concurrency_key IS NULL AND j.run_at <= now()
                 ORDER BY j.priority DESC, j.run_at, j.id
                 LIMIT _limit
                   FOR UPDATE SKIP LOCKED) c
             ORDER BY c.priority DESC, c.run_at, c.id
             LIMIT _limit);
    END IF;

    IF cardinality(_ids) > _limit THEN  -- both paths chose: the best _limit of them
        _ids := ARRAY(SELECT c.id FROM conveyor_jobs c WHERE c.id = ANY(_ids)
                       ORDER BY c.priority DESC, c.run_at, c.id
                       LIMIT _limit);
    END IF;

    IF cardinality(_ids) > 0 THEN
        RETURN QUERY
        UPDATE conveyor_jobs j
           SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
               started_at = coalesce(j.started_at, now()), heartbeat_at = now(),
               lease_owner = _worker, lease_expires_at = now() + _lease * interval '1 second',
               finished_at = NULL, cancel_requested = false
         WHERE j.id = ANY(_ids)
        RETURNING j.*;
    END IF;
END
$fn$;

-- History, one row per statement: every statement that inserts jobs or moves them (state or
-- attempt) records its transitions in one conveyor_history row per 1000 jobs, the jobs' entries
-- in parallel arrays, found by job id through a GIN index. Version 1 wrote one row per job and
-- transition, the largest single cost of a claim and of a finish. An array whose entries are all
-- the same (the worker and the new state of a claim, say) is stored as that one entry.
-- conveyor_job_events is now a view with the version 1 columns: one row per job and transition,
-- its id the record's id * 1024 plus the job's position in it (ids keep their order, and never
-- change). A deleted job's entries are blanked (NULL in every array); a record left without a
-- job is deleted. (The GIN index takes each key at once: with a pending list, the statement
-- that filled it waited about 0.2 s to merge it.)
CREATE TABLE conveyor_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    job_ids     bigint[] NOT NULL,
    from_states text[] NOT NULL,
    to_states   text[] NOT NULL,
    workers     text[] NOT NULL,
    attempts    integer[] NOT NULL,
    errors      jsonb,  -- a JSON array of the entries' errors (without traceback); NULL: none
    CONSTRAINT conveyor_history_entries CHECK (
        cardinality(job_ids) BETWEEN 1 AND 1000
        AND cardinality(from_states) IN (1, cardinality(job_ids))
        AND cardinality(to_states) IN (1, cardinality(job_ids))
        AND cardinality(workers) IN (1, cardinality(job_ids))
        AND cardinality(attempts) = cardinality(job_ids)
        AND (errors IS NULL OR jsonb_array_length(errors) = cardinality(job_ids)))
);

INSERT INTO conveyor_history (at, job_ids, from_states, to_states, workers, attempts, errors)
SELECT at, ARRAY[job_id], ARRAY[from_state], ARRAY[to_state], ARRAY[worker], ARRAY[attempt],
       CASE WHEN error IS NOT NULL THEN jsonb_build_array(error) END
  FROM conveyor_job_events
 ORDER BY id;
DROP TABLE conveyor_job_events;
CREATE INDEX conveyor_history_jobs ON conveyor_history USING gin (job_ids) WITH (fastupdate = off);
CREATE INDEX conveyor_history_at ON conveyor_history (at);

-- The n-th entry of a history array stored whole or as its one repeated entry.
CREATE FUNCTION conveyor_history_entry(_values text[], _n bigint) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE WHEN cardinality(_values) = 1 THEN _values[1] ELSE _values[_n] END
$fn$;

-- The events of one history record: one row per job still recorded in it (version 1's columns).
CREATE FUNCTION conveyor_history_events(_h conveyor_history)
RETURNS TABLE (id bigint, job_id bigint, at timestamptz, from_state text, to_state text,
               worker text, attempt integer, error jsonb)
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT _h.id * 1024 + e.n - 1, e.job_id, _h.at, conveyor_history_entry(_h.from_states, e.n),
           conveyor_history_entry(_h.to_states, e.n), conveyor_history_entry(_h.workers, e.n),
           e.attempt, nullif(_h.errors -> (e.n::integer - 1), 'null'::jsonb)
      FROM unnest(_h.job_ids, _h.attempts) WITH ORDINALITY AS e(job_id, attempt, n)
     WHERE e.job_id IS NOT NULL
$fn$;

-- Every event, in version 1's shape. (One job's: see job_events in queries.sql, which finds its
-- records through the GIN index; a filter on this view's job_id reads every record.)
CREATE VIEW conveyor_job_events AS
SELECT e.* FROM conveyor_history h CROSS JOIN LATERAL conveyor_history_events(h) AS e;

-- An array as history stores it: its one entry when all are the same. (No sub-select, so the
-- function is inlined into its callers' cached plans; array equality counts NULLs as equal.)
CREATE FUNCTION conveyor_history_array(_values text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE WHEN _values = array_fill(_values[1], ARRAY[cardinality(_values)])
                THEN ARRAY[_values[1]] ELSE _values END
$fn$;

-- Record transitions (job, from, to, worker, attempt, error), 1000 per row. (PL/pgSQL, not SQL:
-- its plans are cached for the session, where an SQL function's are made again at every call.)
CREATE FUNCTION conveyor_history_record(_ids bigint[], _from text[], _to text[], _workers text[],
                                        _attempts integer[], _errors jsonb[]) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF cardinality(_ids) <= 1000 THEN
        INSERT INTO conveyor_history (job_ids, from_states, to_states, workers, attempts, errors)
        VALUES (_ids, conveyor_history_array(_from), conveyor_history_array(_to),
                conveyor_history_array(_workers), _attempts,
                CASE WHEN _errors <> array_fill(NULL::jsonb, ARRAY[cardinality(_errors)])
                     THEN to_jsonb(_errors) END);
        RETURN;
    END IF;
    FOR _start IN 1 .. cardinality(_ids) BY 1000 LOOP
        PERFORM conveyor_history_record(_ids[_start:_start + 999], _from[_start:_start + 999],
                                        _to[_start:_start + 999], _workers[_start:_start + 999],
                                        _attempts[_start:_start + 999],
                                        _errors[_start:_start + 999]);
    END LOOP;
END
$fn$;

-- Blank the history entries of deleted jobs; delete the records left without a job. Each record
-- is found through the GIN index one job at a time (an overlap with many ids looks to the planner
-- as if it matched most records, and it read them all), then locked and read again, so that the
-- blanks of a concurrent forget of its other jobs, committed meanwhile, are kept.
CREATE FUNCTION conveyor_history_forget(_ids bigint[]) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    _record bigint;
    _h conveyor_history;
    _kept bigint[];
BEGIN
    FOR _record IN
        SELECT DISTINCT r.id
          FROM unnest(_ids) AS d(id)
         CROSS JOIN LATERAL (SELECT h.id FROM conveyor_history h
                              WHERE h.job_ids @> ARRAY[d.id]) AS r
         ORDER BY 1
    LOOP
        SELECT * INTO _h FROM conveyor_history WHERE id = _record FOR UPDATE;
        CONTINUE WHEN NOT FOUND;  -- deleted meanwhile
        SELECT array_agg(CASE WHEN d.id IS NULL THEN e.job_id END ORDER BY e.n) INTO _kept
          FROM unnest(_h.job_ids) WITH ORDINALITY AS e(job_id, n)
          LEFT JOIN (SELECT DISTINCT unnest(_ids)) AS d(id) ON d.id = e.job_id;
        IF _kept = array_fill(NULL::bigint, ARRAY[cardinality(_kept)]) THEN
            DELETE FROM conveyor_history WHERE id = _record;
            CONTINUE;
        END IF;
        UPDATE conveyor_history
           SET (job_ids, from_states, to_states, workers, attempts, errors) = (
               SELECT _kept,
                      array_agg(CASE WHEN _kept[e.n] IS NOT NULL
                                     THEN conveyor_history_entry(_h.from_states, e.n) END
                                ORDER BY e.n),
                      array_agg(CASE WHEN _kept[e.n] IS NOT NULL
                                     THEN conveyor_history_entry(_h.to_states, e.n) END
                                ORDER BY e.n),
                      array_agg(CASE WHEN _kept[e.n] IS NOT NULL
                                     THEN conveyor_history_entry(_h.workers, e.n) END
                                ORDER BY e.n),
                      array_agg(CASE WHEN _kept[e.n] IS NOT NULL THEN _h.attempts[e.n] END
                                ORDER BY e.n),
                      CASE WHEN _h.errors IS NOT NULL THEN
                          jsonb_agg(CASE WHEN _kept[e.n] IS NOT NULL
                                         THEN _h.errors -> (e.n::integer - 1)
                                         ELSE 'null'::jsonb END ORDER BY e.n)
                      END
                 FROM generate_series(1, cardinality(_kept)) AS e(n))
         WHERE id = _record;
    END LOOP;
END
$fn$;

-- Inserted jobs: their history, and notifications (jobs due now; jobs inserted cancelled).
CREATE OR REPLACE FUNCTION conveyor_jobs_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    _r record;
BEGIN
    SELECT array_agg(n.id) AS ids,
           array_agg(NULL::text) AS from_states,
           array_agg(n.state) AS to_states,
           array_agg(n.lease_owner) AS workers,
           array_agg(n.attempt) AS attempts,
           array_agg(n.last_error - 'traceback') AS errors,
           array_agg(DISTINCT n.queue) FILTER (WHERE n.state = 'queued' AND n.run_at <= now()) AS due,
           array_agg(n.id) FILTER (WHERE n.state IN ('succeeded', 'dead', 'cancelled'))
               AS finished
      INTO _r
      FROM new_rows n;
    IF _r.ids IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM conveyor_history_record(_r.ids, _r.from_states, _r.to_states, _r.workers,
                                    _r.attempts, _r.errors);
    IF _r.due IS NOT NULL THEN
        PERFORM conveyor_notify_due(_r.due);
    END IF;
    IF _r.finished IS NOT NULL THEN
        PERFORM conveyor_notify_finished(_r.finished);
    END IF;
    RETURN NULL;
END
$fn$;

-- Moved jobs (state or attempt changed), in one pass over the statement's transitions: their
-- history; idle workers woken for jobs due now; result waiters told which jobs finished; the
-- dependents of finished jobs released or cancelled. (The aggregates of one pass see the rows in
-- the same order, so the arrays line up without a sort each.) The worker is the lease owner involved: the
-- new one on a claim, the old one when a running job leaves running. The attempt is the one that
-- ended when leaving running, else the new one.
CREATE OR REPLACE FUNCTION conveyor_jobs_after_update() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    _r record;
BEGIN
    SELECT array_agg(n.id) AS ids,
           array_agg(o.state) AS from_states,
           array_agg(n.state) AS to_states,
           array_agg(coalesce(n.lease_owner, o.lease_owner)) AS workers,
           array_agg(CASE WHEN o.state = 'running' THEN o.attempt ELSE n.attempt END)
               AS attempts,
           array_agg(CASE WHEN n.last_error IS DISTINCT FROM o.last_error
                          THEN n.last_error - 'traceback' END) AS errors,
           array_agg(DISTINCT n.queue) FILTER (WHERE n.state IN ('queued', 'retrying')
                                                 AND n.state <> o.state AND n.run_at <= now()) AS due,
           array_agg(n.id) FILTER (WHERE n.state = 'succeeded' AND o.state <> 'succeeded')
               AS succeeded,
           array_agg(n.id) FILTER (WHERE n.state IN ('dead', 'cancelled')
                                                   AND n.state <> o.state) AS failed,
           array_agg(CASE WHEN n.last_error->>'kind' = 'dependency' THEN n.last_error->>'message'
                          ELSE format('dependency job %s (%s) ended %s', n.id, n.task, n.state)
                     END) FILTER (WHERE n.state IN ('dead', 'cancelled')
                                                  AND n.state <> o.state) AS reasons
      INTO _r
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE n.state <> o.state OR n.attempt <> o.attempt;
    IF _r.ids IS NULL THEN
        RETURN NULL;  -- no transition (a heartbeat, a cancel request)
    END IF;
    PERFORM conveyor_history_record(_r.ids, _r.from_states, _r.to_states, _r.workers,
                                    _r.attempts, _r.errors);
    IF _r.due IS NOT NULL THEN
        PERFORM conveyor_notify_due(_r.due);
    END IF;
    IF _r.succeeded IS NULL AND _r.failed IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM conveyor_notify_finished(coalesce(_r.succeeded, '{}') || coalesce(_r.failed, '{}'));
    IF EXISTS (SELECT 1 FROM conveyor_job_deps WHERE depends_on = ANY(_r.failed)) THEN
        PERFORM conveyor_cancel_dependents(_r.failed, _r.reasons);
    END IF;
    IF EXISTS (SELECT 1 FROM conveyor_job_deps WHERE depends_on = ANY(_r.succeeded)) THEN
        PERFORM conveyor_release_dependents(_r.succeeded);
    END IF;
    RETURN NULL;
END
$fn$;

-- A deleted job takes its history and its dependency edges with it, and cancels the jobs still
-- waiting for it.
CREATE OR REPLACE FUNCTION conveyor_jobs_after_delete() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    _deleted bigint[];
    _reasons text[];
BEGIN
    PERFORM conveyor_history_forget(ARRAY(SELECT o.id FROM old_rows o));
    DELETE FROM conveyor_job_deps d USING old_rows o WHERE d.job_id = o.id;
    SELECT array_agg(o.id ORDER BY o.id),
           array_agg(format('dependency job %s (%s) was deleted', o.id, o.task) ORDER BY o.id)
      INTO _deleted, _reasons
      FROM old_rows o
     WHERE EXISTS (SELECT 1 FROM conveyor_job_deps d WHERE d.depends_on = o.id);
    IF _deleted IS NOT NULL THEN
        PERFORM conveyor_cancel_dependents(_deleted, _reasons);
    END IF;
    RETURN NULL;
END
$fn$;

-- Rescue scans the running jobs (few: a fleet's slots), so leases need no index of their own;
-- heartbeats, which only move the lease, can then update in place (HOT).
DROP INDEX conveyor_jobs_running;
