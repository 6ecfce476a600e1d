-- Named queries of the PostgreSQL backend (psycopg %(name)s parameters).

-- name: db_now
SELECT now() AS now

-- name: insert_jobs
-- state is decided from each job's dependencies: waiting, queued, or cancelled at once (reason).
-- (insert_new_jobs, made from this one in __init__.py, is the same insert without ON CONFLICT,
-- returning only what the database set: for jobs without keys, which no conflict can skip.)
INSERT INTO conveyor_jobs (task, queue, args, kwargs, priority, run_at, max_attempts, max_snoozes,
                           deadline, timeout, unique_key, idempotency_key, concurrency_key,
                           concurrency_limit, state, finished_at, last_error, errors)
SELECT t.task, t.queue, t.args::jsonb, t.kwargs::jsonb, t.priority,
       coalesce(t.run_at, now() + t.delay * interval '1 second'),
       t.max_attempts, t.max_snoozes, t.deadline, t.timeout, t.unique_key, t.idempotency_key,
       t.concurrency_key, t.concurrency_limit, t.state,
       CASE WHEN t.state = 'cancelled' THEN now() END,
       e.error, CASE WHEN e.error IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(e.error) END
  FROM unnest(%(task)s::text[], %(queue)s::text[], %(args)s::text[], %(kwargs)s::text[],
              %(priority)s::int[], %(run_at)s::timestamptz[], %(delay)s::float8[],
              %(max_attempts)s::int[], %(max_snoozes)s::int[], %(deadline)s::float8[],
              %(timeout)s::float8[], %(unique_key)s::text[], %(idempotency_key)s::text[],
              %(concurrency_key)s::text[], %(concurrency_limit)s::int[], %(state)s::text[],
              %(reason)s::text[])
       WITH ORDINALITY AS t(task, queue, args, kwargs, priority, run_at, delay, max_attempts,
                            max_snoozes, deadline, timeout, unique_key, idempotency_key,
                            concurrency_key, concurrency_limit, state, reason, ord)
 CROSS JOIN LATERAL (
       SELECT CASE WHEN t.reason IS NOT NULL
                   THEN jsonb_build_object('attempt', 0, 'at', now(), 'kind', 'dependency',
                                           'message', t.reason) END AS error) e
 ORDER BY t.ord
ON CONFLICT DO NOTHING
RETURNING {job_columns}

-- name: reserve_job_ids
-- Ids for a bulk enqueue by COPY (bulk.py), which returns nothing, with the database's now(),
-- every row's created_at. The ids increase in the order taken: when no other session took one
-- meanwhile they are first..last, and only the two ends travel; else the list does. (The
-- sequence is looked up once, in an InitPlan: as a join it was looked up for every id, 10x the cost.)
SELECT now(), min(v) AS first, max(v) AS last,
       CASE WHEN max(v) - min(v) + 1 <> count(*) THEN array_agg(v ORDER BY v) END AS ids
  FROM (SELECT nextval((SELECT pg_get_serial_sequence('conveyor_jobs', 'id')::regclass)) AS v
          FROM generate_series(1, %(n)s)) AS taken

-- name: may_reserve_job_ids
-- Whether this role may take ids from the jobs' sequence (USAGE): one that may only write the
-- tables enqueues through INSERT, which needs no right on the sequence.
SELECT has_sequence_privilege((SELECT pg_get_serial_sequence('conveyor_jobs', 'id')), 'USAGE')
       AS ok

-- name: copy_jobs
-- A bulk enqueue of plain jobs (bulk.py): the other columns take their defaults. (COPY writes
-- the ids given, GENERATED ALWAYS or not.)
COPY conveyor_jobs (id, queue, task, args, kwargs, priority, created_at, run_at, max_attempts,
                    max_snoozes, deadline, timeout, concurrency_key, concurrency_limit) FROM STDIN

-- name: lock_dependencies
-- Share locks: a dependency cannot finish (its trigger missing our new dependent) until we commit.
SELECT id, task, state, last_error FROM conveyor_jobs
 WHERE id = ANY(%(ids)s::bigint[])
 ORDER BY id
   FOR SHARE

-- name: insert_dependencies
INSERT INTO conveyor_job_deps (job_id, depends_on)
SELECT * FROM unnest(%(job_id)s::bigint[], %(depends_on)s::bigint[])

-- name: lock_job_dependencies
SELECT p.id, p.task, p.state, p.last_error
  FROM conveyor_job_deps d JOIN conveyor_jobs p ON p.id = d.depends_on
 WHERE d.job_id = %(id)s
 ORDER BY p.id
   FOR SHARE OF p

-- name: job_dependencies
SELECT depends_on FROM conveyor_job_deps WHERE job_id = %(id)s ORDER BY depends_on

-- name: find_duplicates
SELECT {job_columns} FROM conveyor_jobs
 WHERE idempotency_key = ANY(%(idempotency_keys)s::text[])
    OR (unique_key = ANY(%(unique_keys)s::text[])
        AND state IN ('waiting', 'queued', 'running', 'retrying'))

-- name: claim
SELECT {job_columns} FROM conveyor_claim(%(worker)s, %(queues)s::text[], %(limit)s, %(lease)s)

-- name: warm_up_insert
-- A job for a connection's warm-up claim (_warm_up_claims), in a transaction that is rolled back.
INSERT INTO conveyor_jobs (queue, task, max_attempts)
VALUES ('conveyor.warm-up', 'conveyor.warm-up', 1)

-- name: warm_up_claim
SELECT id FROM conveyor_claim('conveyor.warm-up', ARRAY['conveyor.warm-up'], 1, 1)

-- name: claimed_unanswered
-- The jobs a claim of this worker took although its answer never arrived (the connection died
-- after the commit): running under it, claimed after every job it was handed (%(since)s).
SELECT {job_columns} FROM conveyor_jobs
 WHERE state = 'running' AND lease_owner = %(worker)s
   AND (%(since)s::timestamptz IS NULL OR attempted_at > %(since)s::timestamptz)

-- name: finish
-- Fenced: only while the job runs under this worker with the same attempt. "Runs under this
-- worker" is lease_owner alone: a job has a lease_owner exactly while running (CHECK
-- conveyor_jobs_lease_iff_running). Writing state = 'running' too would let the planner scan the
-- running jobs' partial index, whose dead entries (every job ever claimed, until VACUUM) made
-- each write slower than the last, instead of looking the jobs up by id. The outcomes, worker
-- included, are a materialized CTE so that the fence is a join condition: as a condition on the
-- jobs alone, statistics that saw no job under this worker (none was running when the table was
-- analyzed) made the planner expect one row there, scan the table for it and join every row
-- found to the whole list of outcomes again (80 ms for 500 outcomes instead of 3).
WITH o AS MATERIALIZED (
    SELECT u.*, %(worker)s::text AS worker
      FROM unnest(%(id)s::bigint[], %(attempt)s::int[], %(state)s::text[], %(delay)s::float8[],
                  %(result)s::text[], %(error)s::text[], %(refund)s::int[], %(snoozed)s::int[])
           AS u(id, attempt, state, delay, result, error, refund, snoozed)
)
UPDATE conveyor_jobs j
   SET state = o.state,
       run_at = CASE WHEN o.state IN ('queued', 'retrying')
                     THEN now() + o.delay * interval '1 second' ELSE j.run_at END,
       finished_at = CASE WHEN o.state IN ('succeeded', 'dead', 'cancelled')
                          THEN greatest(now(), j.attempted_at) END,
       attempt = j.attempt - o.refund,
       snoozes = j.snoozes + o.snoozed,
       result = o.result::jsonb,
       last_error = coalesce(o.error::jsonb, j.last_error),
       errors = CASE WHEN o.error IS NULL THEN j.errors
                     ELSE j.errors || jsonb_build_array(o.error::jsonb) END,
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = false
  FROM o
 WHERE j.id = o.id AND j.attempt = o.attempt AND j.lease_owner = o.worker
RETURNING j.id

-- name: finish_succeeded
-- The common case of finish, cheaper: every outcome a success. Ids and attempts come as array
-- literals, the results as one JSON array (each result is JSON text already). Fenced as finish.
WITH o AS MATERIALIZED (
    SELECT u.id, u.attempt, r.result, %(worker)s::text AS worker
      FROM unnest(%(id)s::bigint[], %(attempt)s::int[]) WITH ORDINALITY AS u(id, attempt, n)
      JOIN jsonb_array_elements(%(result)s::jsonb) WITH ORDINALITY AS r(result, n) USING (n)
)
UPDATE conveyor_jobs j
   SET state = 'succeeded', finished_at = greatest(now(), j.attempted_at), result = o.result,
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = false
  FROM o
 WHERE j.id = o.id AND j.attempt = o.attempt AND j.lease_owner = o.worker
RETURNING j.id

-- name: heartbeat
-- (Held: lease_owner alone, as in finish.)
UPDATE conveyor_jobs
   SET lease_expires_at = now() + %(lease)s * interval '1 second', heartbeat_at = now()
 WHERE id = ANY(%(ids)s::bigint[]) AND lease_owner = %(worker)s
RETURNING id, cancel_requested

-- name: rescue_stuck
WITH stuck AS (
    SELECT id FROM conveyor_jobs
     WHERE state = 'running' AND lease_expires_at < coalesce(%(now)s::timestamptz, now())
     ORDER BY lease_expires_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), rescued AS (
    SELECT j.id,
           CASE WHEN j.attempt >= j.max_attempts THEN 'dead' ELSE 'retrying' END AS new_state,
           jsonb_build_object('attempt', j.attempt, 'at', now(), 'kind', 'lease_expired',
                              'message', 'lease expired: worker ' || j.lease_owner || ' lost') AS error
      FROM conveyor_jobs j JOIN stuck USING (id)
)
UPDATE conveyor_jobs j
   SET state = r.new_state,
       run_at = CASE WHEN r.new_state = 'retrying' THEN now() ELSE j.run_at END,
       finished_at = CASE WHEN r.new_state = 'dead' THEN greatest(now(), j.attempted_at) END,
       last_error = r.error, errors = j.errors || jsonb_build_array(r.error),
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = false
  FROM rescued r
 WHERE j.id = r.id
RETURNING {j.job_columns}

-- name: hand_back
-- (Held: lease_owner alone, as in finish.)
UPDATE conveyor_jobs
   SET state = 'queued', run_at = now(), attempt = attempt - 1,
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = false
 WHERE id = ANY(%(ids)s::bigint[]) AND lease_owner = %(worker)s

-- name: get_job
SELECT {job_columns} FROM conveyor_jobs WHERE id = %(id)s

-- name: list_jobs
SELECT {job_columns} FROM conveyor_jobs
 WHERE (%(state)s::text IS NULL OR state = %(state)s)
   AND (%(queue)s::text IS NULL OR queue = %(queue)s)
   AND (%(task)s::text IS NULL OR task = %(task)s)
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: cancel_pending
UPDATE conveyor_jobs
   SET state = 'cancelled', finished_at = greatest(now(), attempted_at),
       last_error = jsonb_build_object('attempt', attempt, 'at', now(), 'kind', 'cancelled',
                                       'message', %(reason)s::text),
       errors = errors || jsonb_build_array(jsonb_build_object(
                    'attempt', attempt, 'at', now(), 'kind', 'cancelled', 'message', %(reason)s::text))
 WHERE id = %(id)s AND state IN ('waiting', 'queued', 'retrying')
RETURNING {job_columns}

-- name: cancel_running
UPDATE conveyor_jobs SET cancel_requested = true
 WHERE id = %(id)s AND state = 'running'
RETURNING {job_columns}

-- name: retry_job
-- %(state)s is queued, or waiting while one of the job's dependencies is unfinished.
UPDATE conveyor_jobs
   SET state = %(state)s, run_at = now(), attempt = 0, snoozes = 0, started_at = NULL,
       attempted_at = NULL, finished_at = NULL, heartbeat_at = NULL, result = NULL,
       cancel_requested = false
 WHERE id = %(id)s AND state IN ('dead', 'cancelled')
RETURNING {job_columns}

-- name: delete_job
DELETE FROM conveyor_jobs WHERE id = %(id)s AND state <> 'running' RETURNING id

-- name: configure_queue
INSERT INTO conveyor_queues (name, concurrency_limit) VALUES (%(name)s, %(limit)s)
ON CONFLICT (name) DO UPDATE SET concurrency_limit = excluded.concurrency_limit, updated_at = now()

-- name: register_worker
INSERT INTO conveyor_workers (id, host, pid, queues, concurrency)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s::jsonb, %(concurrency)s)
ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), stopped_at = NULL

-- name: worker_seen
UPDATE conveyor_workers SET last_seen_at = now() WHERE id = %(id)s

-- name: worker_stopped
UPDATE conveyor_workers SET stopped_at = now(), last_seen_at = now() WHERE id = %(id)s

-- name: list_workers
SELECT * FROM conveyor_workers ORDER BY last_seen_at DESC LIMIT 1000

-- name: stats_counts
SELECT queue, state, count(*) AS n FROM conveyor_jobs GROUP BY queue, state

-- name: stats_oldest_due
SELECT queue, extract(epoch FROM now() - min(run_at)) AS age
  FROM conveyor_jobs
 WHERE state IN ('queued', 'retrying') AND run_at <= now()
 GROUP BY queue

-- name: stats_limits
SELECT name, concurrency_limit FROM conveyor_queues

-- name: job_events
-- The view conveyor_job_events, for one job: its history records found through the GIN index.
SELECT e.*
  FROM conveyor_history h CROSS JOIN LATERAL conveyor_history_events(h) AS e
 WHERE h.job_ids @> ARRAY[%(id)s::bigint] AND e.job_id = %(id)s
 ORDER BY e.id

-- name: prune_jobs
WITH doomed AS (
    SELECT id FROM conveyor_jobs
     WHERE state = %(state)s
       AND finished_at < coalesce(%(now)s::timestamptz, now()) - %(age)s * interval '1 second'
     ORDER BY finished_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
DELETE FROM conveyor_jobs j USING doomed d WHERE j.id = d.id

-- name: prune_events
-- Whole history records (one statement's transitions of up to 1000 jobs), oldest first; the
-- number of events they held.
WITH doomed AS (
    SELECT id FROM conveyor_history
     WHERE at < coalesce(%(now)s::timestamptz, now()) - %(age)s * interval '1 second'
     ORDER BY at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM conveyor_history h USING doomed d WHERE h.id = d.id
    RETURNING cardinality(array_remove(h.job_ids, NULL)) AS events
)
SELECT coalesce(sum(events), 0)::bigint AS events FROM deleted

-- name: prune_pipelines
-- Finished pipelines past the retention none of whose jobs is left (the jobs go first, by their
-- own retention), oldest first. A finished pipeline gets no new job, so none can appear after
-- the check.
WITH doomed AS (
    SELECT p.id FROM conveyor_pipelines p
     WHERE p.state <> 'running'
       AND p.finished_at < coalesce(%(now)s::timestamptz, now()) - %(age)s * interval '1 second'
       AND NOT EXISTS (SELECT 1 FROM conveyor_jobs j WHERE j.pipeline_id = p.id)
     ORDER BY p.finished_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
DELETE FROM conveyor_pipelines p USING doomed d WHERE p.id = d.id

-- name: prune_batches
-- Completed batches past the retention none of whose jobs is left, oldest first (jobs join a
-- batch only in the transaction that creates it).
WITH doomed AS (
    SELECT b.id FROM conveyor_batches b
     WHERE b.completed_at < coalesce(%(now)s::timestamptz, now()) - %(age)s * interval '1 second'
       AND NOT EXISTS (SELECT 1 FROM conveyor_jobs j WHERE j.batch_id = b.id)
     ORDER BY b.completed_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
DELETE FROM conveyor_batches b USING doomed d WHERE b.id = d.id

-- name: periodic_advance
-- Move a periodic schedule's last tick forward to %(tick)s: a row back when it moved (its job is
-- to be enqueued, in this transaction), none when that tick or a later one was recorded already.
-- A concurrent caller with the same tick waits for the row lock, then finds it recorded.
INSERT INTO conveyor_periodic (name, last_tick) VALUES (%(name)s, %(tick)s)
ON CONFLICT (name) DO UPDATE SET last_tick = excluded.last_tick
 WHERE conveyor_periodic.last_tick < excluded.last_tick
RETURNING name

-- name: merge_history_pending
-- The vacuum service's other chore: history's job index takes new keys into a pending list
-- (migration 0004); merged here, every few seconds, instead of by the statement that fills it.
SELECT gin_clean_pending_list('conveyor_history_jobs'::regclass) AS merged

-- name: jobs_dead_rows
-- The server's counts of dead and live row versions in the jobs table (statistics, updated
-- within a second or so).
SELECT coalesce(s.n_dead_tup, 0) AS dead, coalesce(s.n_live_tup, 0) AS live
  FROM (SELECT 1) AS one
  LEFT JOIN pg_stat_user_tables s ON s.relid = 'conveyor_jobs'::regclass

-- name: leader_claim
INSERT INTO conveyor_leader (name, holder, started_at)
VALUES (%(name)s, %(holder)s, coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, started_at = excluded.started_at
 WHERE conveyor_leader.started_at <= excluded.started_at - %(interval)s * interval '1 second'
RETURNING holder

-- ---- pipelines and batches (backends/postgres/flows.py; triggers in migrations/0002) ----------

-- name: insert_pipeline
INSERT INTO conveyor_pipelines (name, entity, steps)
VALUES (%(name)s, %(entity)s, %(steps)s::jsonb)
RETURNING id

-- name: enqueue_first_step
-- The first step's job: the start arguments, then the step's own.
SELECT conveyor_enqueue_spec(p.steps -> 0, %(args)s::jsonb, %(kwargs)s::jsonb, p.id) AS job_id
  FROM conveyor_pipelines p
 WHERE p.id = %(id)s

-- name: set_pipeline_job
UPDATE conveyor_pipelines SET current_job_id = %(job_id)s WHERE id = %(id)s

-- name: get_pipeline
SELECT p.*, CASE WHEN p.state = 'running' THEN j.started_at ELSE p.step_started_at END
            AS current_started_at
  FROM conveyor_pipelines p LEFT JOIN conveyor_jobs j ON j.id = p.current_job_id
 WHERE p.id = %(id)s

-- name: list_pipelines
SELECT p.*, CASE WHEN p.state = 'running' THEN j.started_at ELSE p.step_started_at END
            AS current_started_at
  FROM conveyor_pipelines p LEFT JOIN conveyor_jobs j ON j.id = p.current_job_id
 WHERE (%(state)s::text IS NULL OR p.state = %(state)s)
   AND (%(name)s::text IS NULL OR p.name = %(name)s)
   AND (%(entity)s::text IS NULL OR p.entity = %(entity)s)
 ORDER BY p.id DESC
 LIMIT %(limit)s

-- name: pipeline_jobs
SELECT {job_columns} FROM conveyor_jobs WHERE pipeline_id = %(id)s ORDER BY id

-- name: pipeline_current_job
SELECT current_job_id FROM conveyor_pipelines WHERE id = %(id)s

-- name: lock_job
-- Lock order everywhere: the step's job, then its pipeline (as a worker finishing the job does).
SELECT id, state, started_at FROM conveyor_jobs WHERE id = %(id)s FOR UPDATE

-- name: lock_pipeline
SELECT state, current_job_id FROM conveyor_pipelines WHERE id = %(id)s FOR UPDATE

-- name: cancel_pipeline
UPDATE conveyor_pipelines
   SET state = 'cancelled', error = %(reason)s, finished_at = now(), updated_at = now(),
       step_started_at = %(started_at)s
 WHERE id = %(id)s AND state = 'running'

-- name: overdue_steps
-- A cheap look first (most passes find nothing): current steps past their deadline.
SELECT j.id
  FROM conveyor_pipelines p JOIN conveyor_jobs j ON j.id = p.current_job_id
 WHERE p.state = 'running' AND j.deadline IS NOT NULL AND j.started_at IS NOT NULL
   AND j.state NOT IN ('succeeded', 'dead', 'cancelled')
   AND j.started_at + j.deadline * interval '1 second' < coalesce(%(now)s::timestamptz, now())
 ORDER BY j.id
 LIMIT %(limit)s

-- name: expire_steps
-- Fail the pipelines of overdue steps. Their jobs are locked first (skipping any a worker is
-- finishing right now: the next pass sees how it ended), then the pipelines updated.
WITH locked AS (
    SELECT j.id, j.deadline, j.started_at
      FROM conveyor_jobs j
     WHERE j.id = ANY(%(ids)s::bigint[])
       AND j.state NOT IN ('succeeded', 'dead', 'cancelled')
       AND j.started_at + j.deadline * interval '1 second' < coalesce(%(now)s::timestamptz, now())
     ORDER BY j.id
       FOR UPDATE SKIP LOCKED
)
UPDATE conveyor_pipelines p
   SET state = 'failed', finished_at = now(), updated_at = now(), step_started_at = l.started_at,
       error = conveyor_step_deadline_error(p.steps -> p.current_step ->> 'name', l.deadline,
                                            l.started_at)
  FROM locked l
 WHERE p.current_job_id = l.id AND p.state = 'running'
RETURNING p.id, p.current_job_id, p.error

-- name: cancel_overdue_jobs
-- Cancelled at once, even while running: the worker's heartbeat then finds its lease gone.
UPDATE conveyor_jobs j
   SET state = 'cancelled', finished_at = greatest(now(), j.attempted_at),
       last_error = jsonb_build_object('attempt', j.attempt, 'at', now(), 'kind', 'deadline',
                                       'message', x.message),
       errors = j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', j.attempt, 'at', now(), 'kind', 'deadline', 'message', x.message)),
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = false
  FROM unnest(%(ids)s::bigint[], %(messages)s::text[]) AS x(id, message)
 WHERE j.id = x.id AND j.state NOT IN ('succeeded', 'dead', 'cancelled')

-- name: insert_batch
INSERT INTO conveyor_batches (total, on_complete)
VALUES (%(total)s, %(on_complete)s::jsonb)
RETURNING id

-- name: join_batch
UPDATE conveyor_jobs SET batch_id = %(batch_id)s WHERE id = ANY(%(ids)s::bigint[])

-- name: count_batch_at_insert
-- Jobs inserted already finished (a failed dependency) count at once; the update completes a
-- batch that is already done (conveyor_batches_complete).
UPDATE conveyor_batches SET failed = %(failed)s WHERE id = %(id)s

-- name: get_batch
SELECT * FROM conveyor_batches WHERE id = %(id)s

-- name: batch_jobs
SELECT {job_columns} FROM conveyor_jobs WHERE batch_id = %(id)s ORDER BY id
