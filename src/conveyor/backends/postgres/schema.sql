-- The current Conveyor schema for PostgreSQL, as the migrations leave it (today: the
-- conveyor_migrations table that the migrator creates, plus migrations 0001 to 0009). This file
-- documents the schema: Conveyor never runs it, the migrations build every database. Change the
-- schema with a new migration and update this file to match (tests/contract/test_schema.py builds a
-- database from each and compares their catalogs). docs/state-machine.md documents
-- the invariants the CHECK constraints enforce.

-- Applied migrations (created by the migrator, before the first migration runs).
CREATE TABLE conveyor_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conveyor_jobs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue             text NOT NULL,
    task              text NOT NULL,
    args              jsonb NOT NULL DEFAULT '[]',
    kwargs            jsonb NOT NULL DEFAULT '{}',
    state             text NOT NULL DEFAULT 'queued',
    priority          integer NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    run_at            timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    attempted_at      timestamptz,
    finished_at       timestamptz,
    heartbeat_at      timestamptz,
    lease_owner       text,
    lease_expires_at  timestamptz,
    attempt           integer NOT NULL DEFAULT 0,
    max_attempts      integer NOT NULL,
    snoozes           integer NOT NULL DEFAULT 0,
    max_snoozes       integer,
    deadline          double precision,
    timeout           double precision,
    last_error        jsonb,
    errors            jsonb NOT NULL DEFAULT '[]',
    result            jsonb,
    unique_key        text,
    idempotency_key   text,
    concurrency_key   text,
    concurrency_limit integer NOT NULL DEFAULT 1,
    cancel_requested  boolean NOT NULL DEFAULT false,
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
        CHECK (NOT cancel_requested OR state = 'running'),
    CONSTRAINT conveyor_jobs_limits_positive
        CHECK (max_attempts >= 1 AND snoozes >= 0 AND concurrency_limit >= 1
               AND (max_snoozes IS NULL OR max_snoozes >= 0)
               AND (deadline IS NULL OR deadline > 0)
               AND (timeout IS NULL OR timeout > 0)),
    CONSTRAINT conveyor_jobs_names_valid
        CHECK (length(queue) BETWEEN 1 AND 100 AND length(task) BETWEEN 1 AND 200)
);

-- Claim path: queued and retrying jobs only, in claim order; keyed jobs have their own index so the unlimited
-- fast path never scans them.
CREATE INDEX conveyor_jobs_fetch ON conveyor_jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('queued', 'retrying') AND concurrency_key IS NULL;
CREATE INDEX conveyor_jobs_fetch_keyed ON conveyor_jobs (queue, priority DESC, run_at, id)
    WHERE state IN ('queued', 'retrying') AND concurrency_key IS NOT NULL;
CREATE INDEX conveyor_jobs_running_key ON conveyor_jobs (concurrency_key)
    WHERE state = 'running' AND concurrency_key IS NOT NULL;
CREATE INDEX conveyor_jobs_running_queue ON conveyor_jobs (queue) WHERE state = 'running';
CREATE INDEX conveyor_jobs_finished ON conveyor_jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE UNIQUE INDEX conveyor_jobs_unique_key ON conveyor_jobs (unique_key)
    WHERE unique_key IS NOT NULL AND state IN ('waiting', 'queued', 'running', 'retrying');
CREATE UNIQUE INDEX conveyor_jobs_idempotency_key ON conveyor_jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE conveyor_queues (
    name              text PRIMARY KEY,
    concurrency_limit integer,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT conveyor_queues_limit_positive CHECK (concurrency_limit IS NULL OR concurrency_limit >= 1)
);

CREATE TABLE conveyor_workers (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    queues        jsonb NOT NULL DEFAULT '[]',
    concurrency   integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    stopped_at    timestamptz
);

-- Claim: one call, one round trip. Jobs under a concurrency limit (a concurrency_key, or a queue
-- with a limit) are chosen under one transaction-scoped advisory lock, in a statement that starts
-- after the lock is held, so it sees every other claimer's committed running jobs: the limit holds
-- fleet-wide. Unlimited jobs are chosen on the lock-free SKIP LOCKED path. The best of both (by
-- priority, run_at, id) are claimed, so priority order holds across the two; claiming fewer limited
-- jobs than were chosen keeps the limits.
-- The claimed jobs are re-read in claim order only when both paths chose more than _limit. The
-- statements keep one generic plan per session (planning them again at every call cost 0.3 ms).
CREATE FUNCTION conveyor_claim(_worker text, _queues text[], _limit integer, _lease double precision)
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
-- transition (the largest single cost of a claim and of a finish). An array whose entries are all
-- the same (the worker and the new state of a claim, say) is stored as that one entry.
-- conveyor_job_events is a view with the version 1 columns: one row per job and transition,
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

-- Dependencies: a job enqueued with depends_on waits (state 'waiting', never claimed) until every
-- job it depends on succeeded. Dependencies always existed before their dependents, so
-- depends_on < job_id: the graph cannot have a cycle.
CREATE TABLE conveyor_job_deps (
    job_id      bigint NOT NULL,
    depends_on  bigint NOT NULL,
    PRIMARY KEY (job_id, depends_on),
    CONSTRAINT conveyor_job_deps_acyclic CHECK (depends_on < job_id)
);

CREATE INDEX conveyor_job_deps_depends_on ON conveyor_job_deps (depends_on);

-- Release the waiting dependents of jobs that just succeeded whose dependencies all succeeded (a
-- dependency that no longer exists was pruned after finishing, and blocks nothing). The
-- dependents are locked first, in id order, and checked by a later statement: of two
-- transactions finishing two dependencies of one job at once, the second to lock it sees the
-- first's commit, so the job cannot be left waiting.
CREATE FUNCTION conveyor_release_dependents(_succeeded bigint[]) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM 1 FROM conveyor_jobs j
      WHERE j.state = 'waiting'
        AND j.id IN (SELECT d.job_id FROM conveyor_job_deps d WHERE d.depends_on = ANY(_succeeded))
      ORDER BY j.id
        FOR UPDATE;
    UPDATE conveyor_jobs j
       SET state = 'queued', run_at = greatest(j.run_at, now())
     WHERE j.state = 'waiting'
       AND j.id IN (SELECT d.job_id FROM conveyor_job_deps d WHERE d.depends_on = ANY(_succeeded))
       AND NOT EXISTS (SELECT 1 FROM conveyor_job_deps d JOIN conveyor_jobs p ON p.id = d.depends_on
                        WHERE d.job_id = j.id AND p.state <> 'succeeded');
END
$fn$;

-- Cancel every job waiting, directly or through other waiting jobs, on jobs that just ended dead or
-- cancelled (or were deleted), in one statement. The reason names the job that failed: a job that
-- was itself cancelled by a dependency passes its reason on.
CREATE FUNCTION conveyor_cancel_dependents(_failed bigint[], _reasons text[]) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    _ids bigint[];
    _why text[];
BEGIN
    WITH RECURSIVE doomed (id, root, reason) AS (
        SELECT d.job_id, f.id, f.reason
          FROM unnest(_failed, _reasons) AS f(id, reason)
          JOIN conveyor_job_deps d ON d.depends_on = f.id
          JOIN conveyor_jobs w ON w.id = d.job_id AND w.state = 'waiting'
        UNION
        SELECT d.job_id, x.root, x.reason
          FROM doomed x
          JOIN conveyor_job_deps d ON d.depends_on = x.id
          JOIN conveyor_jobs w ON w.id = d.job_id AND w.state = 'waiting'
    ), chosen AS (
        SELECT DISTINCT ON (id) id, reason FROM doomed ORDER BY id, root
    )
    SELECT array_agg(id ORDER BY id), array_agg(reason ORDER BY id) INTO _ids, _why FROM chosen;
    IF _ids IS NULL THEN
        RETURN;
    END IF;
    PERFORM 1 FROM conveyor_jobs WHERE id = ANY(_ids) ORDER BY id FOR UPDATE;
    UPDATE conveyor_jobs j
       SET state = 'cancelled', finished_at = now(),
           last_error = jsonb_build_object('attempt', j.attempt, 'at', now(), 'kind', 'dependency',
                                           'message', c.reason),
           errors = j.errors || jsonb_build_array(jsonb_build_object(
                        'attempt', j.attempt, 'at', now(), 'kind', 'dependency',
                        'message', c.reason))
      FROM unnest(_ids, _why) AS c(id, reason)
     WHERE j.id = c.id AND j.state = 'waiting';
END
$fn$;

-- The channel of notification ``_name`` for the Conveyor schema named ``_schema``: the name and the
-- schema's oid ('conveyor_job_due_2200'). NOTIFY channels are database-wide: Conveyors in two
-- schemas of one database hear only their own notifications (idle workers are not woken, nor
-- claim, for another schema's jobs; waiters are not woken by another schema's job ids). No FROM
-- clause, so it is inlined into its callers' cached plans (an SQL function that reads pg_class is
-- planned again at every call: 0.3-0.4 ms of an idle machine's enqueue).
CREATE FUNCTION conveyor_schema_channel(_name text, _schema name) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT _name || '_' || quote_ident(_schema)::regnamespace::oid::bigint
$fn$;

-- The same channel, for the schema that holds ``_table`` (what listeners ask for, once each).
CREATE FUNCTION conveyor_channel(_name text, _table regclass) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT conveyor_schema_channel(_name, n.nspname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = _table
$fn$;

-- Tell result waiters (LISTEN conveyor_job_state_<schema>) which jobs just finished:
-- comma-separated ids, at most 300 per notification (payloads must stay under 8000 bytes).
-- Delivered on commit. ``_schema``: the jobs table's (the channel's).
CREATE FUNCTION conveyor_notify_finished(_ids bigint[], _schema name) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify(conveyor_schema_channel('conveyor_job_state', _schema),
                      string_agg(c.id::text, ','))
       FROM (SELECT u.id, (u.n - 1) / 300 AS chunk
               FROM unnest(_ids) WITH ORDINALITY AS u(id, n)) c
      GROUP BY c.chunk;
END
$fn$;

-- Wake idle workers (LISTEN conveyor_job_due_<schema>): one notification per queue that got jobs
-- due now (``_queues``, distinct). NOTIFY also folds identical payloads within a transaction.
CREATE FUNCTION conveyor_notify_due(_queues text[], _schema name) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    _queue text;
BEGIN
    FOREACH _queue IN ARRAY _queues LOOP
        PERFORM pg_notify(conveyor_schema_channel('conveyor_job_due', _schema), _queue);
    END LOOP;
END
$fn$;

-- Statement-level triggers over transition tables: a bulk insert or a batched finish writes its
-- history in one row (per 1000 jobs).
-- Inserted jobs: their history, and notifications (jobs due now; jobs inserted cancelled).
CREATE FUNCTION conveyor_jobs_after_insert() RETURNS trigger
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
        PERFORM conveyor_notify_due(_r.due, TG_TABLE_SCHEMA);
    END IF;
    IF _r.finished IS NOT NULL THEN
        PERFORM conveyor_notify_finished(_r.finished, TG_TABLE_SCHEMA);
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
CREATE FUNCTION conveyor_jobs_after_update() RETURNS trigger
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
        PERFORM conveyor_notify_due(_r.due, TG_TABLE_SCHEMA);
    END IF;
    IF _r.succeeded IS NULL AND _r.failed IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM conveyor_notify_finished(coalesce(_r.succeeded, '{}') || coalesce(_r.failed, '{}'),
                                     TG_TABLE_SCHEMA);
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
CREATE FUNCTION conveyor_jobs_after_delete() RETURNS trigger
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

CREATE TRIGGER conveyor_jobs_after_insert AFTER INSERT ON conveyor_jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_jobs_after_insert();
CREATE TRIGGER conveyor_jobs_after_update AFTER UPDATE ON conveyor_jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_jobs_after_update();
CREATE TRIGGER conveyor_jobs_after_delete AFTER DELETE ON conveyor_jobs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION conveyor_jobs_after_delete();

-- Maintenance that one worker of the fleet runs per interval (the pruner): who last ran it, when.
CREATE TABLE conveyor_leader (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    started_at  timestamptz NOT NULL
);

-- ---- migrations/0002_pipelines_batches.sql: pipelines and batches (docs/pipelines.md) ----

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
-- Finished pipelines, oldest first, for the pruner (migration 0008).
CREATE INDEX conveyor_pipelines_finished ON conveyor_pipelines (finished_at) WHERE state <> 'running';

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

-- Completed batches, oldest first, for the pruner (migration 0008).
CREATE INDEX conveyor_batches_completed ON conveyor_batches (completed_at)
    WHERE completed_at IS NOT NULL;

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

-- Tell subscribers (LISTEN conveyor_flow_state_<schema>) which pipelines ('p12') and batches
-- ('b7') changed; identical notifications of one transaction are delivered once, at commit.
CREATE FUNCTION conveyor_notify_flow() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify(conveyor_schema_channel('conveyor_flow_state', TG_TABLE_SCHEMA),
                      TG_ARGV[0] || NEW.id);
    RETURN NULL;
END
$fn$;

CREATE TRIGGER conveyor_pipelines_notify AFTER UPDATE ON conveyor_pipelines
    FOR EACH ROW EXECUTE FUNCTION conveyor_notify_flow('p');
CREATE TRIGGER conveyor_batches_notify AFTER UPDATE ON conveyor_batches
    FOR EACH ROW EXECUTE FUNCTION conveyor_notify_flow('b');

-- ---- migrations/0004_plans_and_history.sql: the claim's cached plans never read the jobs table whole,
-- nor forgetting jobs their history table;
-- history's job index takes new keys into its pending list, merged by the workers' vacuum service;
-- history's arrays compressed with lz4 where the server has it ----

ALTER FUNCTION conveyor_claim(text, text[], integer, double precision) SET enable_seqscan = off;
ALTER FUNCTION conveyor_history_forget(bigint[]) SET enable_seqscan = off SET enable_indexscan = off;
ALTER INDEX conveyor_history_jobs SET (fastupdate = on);
DO $$
BEGIN
    EXECUTE 'ALTER TABLE conveyor_history ALTER COLUMN job_ids SET COMPRESSION lz4, '
            'ALTER COLUMN attempts SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    NULL;  -- a server built without lz4 (or older than 14, without SET COMPRESSION) keeps pglz
END
$$;

-- ---- migrations/0005_no_jit.sql: no JIT in the functions that forbid plan types (a forbidden
-- path's cost, kept in a branch never executed, passed jit_above_cost and every call compiled) ----

ALTER FUNCTION conveyor_claim(text, text[], integer, double precision) SET jit = off;
ALTER FUNCTION conveyor_history_forget(bigint[]) SET jit = off;

-- The last tick enqueued of each periodic schedule (migration 0009): a tick is enqueued only by
-- the statement that moves last_tick forward to it, in the transaction that inserts its job.
CREATE TABLE conveyor_periodic (
    name       text PRIMARY KEY,
    last_tick  timestamptz NOT NULL,
    CONSTRAINT conveyor_periodic_name_valid CHECK (length(name) BETWEEN 1 AND 200)
);
