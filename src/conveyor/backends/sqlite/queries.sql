-- Named queries of the SQLite backend (:name parameters). {now} stands for the database clock in
-- seconds since the epoch, (julianday('now') - 2440587.5) * 86400.0, fixed within one statement.
-- Lists (queues, ids) are passed as JSON arrays and read with json_each; the rows of a bulk insert
-- or an outcome write as rows of bound parameters ({rows}, expanded by _rows_sql in __init__.py).
-- {job_columns} stands for the job columns in Job field order (backends/base.py).

-- name: db_now
SELECT {now} AS now

-- name: insert_jobs
-- {rows} stands for one row of bound parameters per job: its place in the input, NewJob's columns
-- (args and kwargs as JSON text, run_at in epoch seconds), state and reason; inserted in input
-- order. state is decided from the job's dependencies: waiting, queued, or cancelled at once
-- (reason).
INSERT INTO conveyor_jobs (task, queue, args, kwargs, priority, created_at, run_at, max_attempts,
                           max_snoozes, deadline, timeout, unique_key, idempotency_key,
                           concurrency_key, concurrency_limit, state, finished_at, last_error,
                           errors)
SELECT j.task, j.queue, j.args, j.kwargs, j.priority, {now}, coalesce(j.run_at, {now} + j.delay),
       j.max_attempts, j.max_snoozes, j.deadline, j.timeout, j.unique_key, j.idempotency_key,
       j.concurrency_key, j.concurrency_limit, j.state,
       CASE WHEN j.state = 'cancelled' THEN {now} END,
       CASE WHEN j.reason IS NOT NULL
            THEN json_object('attempt', 0, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
                             'kind', 'dependency', 'message', j.reason) END,
       CASE WHEN j.reason IS NULL THEN '[]'
            ELSE json_array(json_object('attempt', 0,
                                        'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
                                        'kind', 'dependency', 'message', j.reason)) END
  FROM (SELECT column1 AS ord, column2 AS task, column3 AS queue, column4 AS args,
               column5 AS kwargs, column6 AS priority, column7 AS delay, column8 AS run_at,
               column9 AS max_attempts, column10 AS max_snoozes, column11 AS deadline,
               column12 AS timeout, column13 AS unique_key, column14 AS idempotency_key,
               column15 AS concurrency_key, column16 AS concurrency_limit, column17 AS state,
               column18 AS reason
          FROM (VALUES {rows})) AS j
 WHERE true  -- (SQLite needs a WHERE before ON CONFLICT after a SELECT)
 ORDER BY j.ord
ON CONFLICT DO NOTHING
RETURNING {job_columns}

-- name: take_write_lock
-- A write that changes nothing but starts the write transaction (and takes SQLite's one writer
-- lock) on a caller's connection, so the dependency states read next cannot change before commit.
UPDATE conveyor_job_deps SET job_id = job_id WHERE 0

-- name: dependency_states
SELECT id, task, state, last_error FROM conveyor_jobs
 WHERE id IN (SELECT value FROM json_each(:ids))

-- name: insert_dependencies
INSERT INTO conveyor_job_deps (job_id, depends_on)
SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(:pairs)

-- name: job_dependencies
SELECT d.depends_on AS id, p.task, p.state, p.last_error
  FROM conveyor_job_deps d LEFT JOIN conveyor_jobs p ON p.id = d.depends_on
 WHERE d.job_id = :id
 ORDER BY d.depends_on

-- name: find_duplicates
SELECT {job_columns} FROM conveyor_jobs
 WHERE idempotency_key IN (SELECT value FROM json_each(:idempotency_keys))
    OR (unique_key IN (SELECT value FROM json_each(:unique_keys))
        AND state IN ('waiting', 'queued', 'running', 'retrying'))

-- name: any_due
-- Is any claimable job due in :queues? Index probes only: each queue's first due entry in the
-- fetch indexes (keyed and not).
SELECT EXISTS (SELECT 1 FROM conveyor_jobs
                WHERE state IN ('queued', 'retrying') AND concurrency_key IS NOT NULL
                  AND queue IN (SELECT value FROM json_each(:queues)) AND run_at <= {now})
    OR EXISTS (SELECT 1 FROM conveyor_jobs
                WHERE state IN ('queued', 'retrying') AND concurrency_key IS NULL
                  AND queue IN (SELECT value FROM json_each(:queues)) AND run_at <= {now}) AS due

-- name: claim_plan
-- First in a claim's write transaction: which of :queues have a concurrency limit (a JSON array),
-- and whether a job under a concurrency_key is due in any of them.
SELECT (SELECT json_group_array(name) FROM conveyor_queues
         WHERE name IN (SELECT value FROM json_each(:queues))
           AND concurrency_limit IS NOT NULL) AS limited,
       EXISTS (SELECT 1 FROM conveyor_jobs
                WHERE state IN ('queued', 'retrying') AND concurrency_key IS NOT NULL
                  AND queue IN (SELECT value FROM json_each(:queues)) AND run_at <= {now}) AS keyed

-- name: queues_due
-- Is a job under no concurrency_key due in one of :queues? (Index probes, as any_due.)
SELECT EXISTS (SELECT 1 FROM conveyor_jobs
                WHERE state IN ('queued', 'retrying') AND concurrency_key IS NULL
                  AND queue IN (SELECT value FROM json_each(:queues)) AND run_at <= {now}) AS due

-- name: choose_limited
-- Jobs under a concurrency limit (a concurrency_key, or a queue with a limit) that may run now.
WITH queue_room AS (
    SELECT q.name, q.concurrency_limit - (
               SELECT count(*) FROM conveyor_jobs r
                WHERE r.state = 'running' AND r.queue = q.name) AS room
      FROM conveyor_queues q WHERE q.name IN (SELECT value FROM json_each(:limited))
), candidates AS (
    SELECT j.id, j.queue, j.concurrency_key, j.concurrency_limit, j.priority, j.run_at
      FROM conveyor_jobs j
     WHERE j.state IN ('queued', 'retrying') AND j.run_at <= {now}
       AND j.queue IN (SELECT value FROM json_each(:queues))
       AND (j.concurrency_key IS NOT NULL OR j.queue IN (SELECT value FROM json_each(:limited)))
       AND (j.concurrency_key IS NULL OR (
               SELECT count(*) FROM conveyor_jobs r
                WHERE r.state = 'running' AND r.concurrency_key = j.concurrency_key
           ) < j.concurrency_limit)
       AND NOT EXISTS (SELECT 1 FROM queue_room qr WHERE qr.name = j.queue AND qr.room <= 0)
     ORDER BY j.priority DESC, j.run_at, j.id
     LIMIT :scan
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
SELECT r.id, r.priority, r.run_at
  FROM ranked r LEFT JOIN queue_room qr ON qr.name = r.queue
 WHERE qr.name IS NULL OR r.qrank <= qr.room
 ORDER BY r.priority DESC, r.run_at, r.id
 LIMIT :limit

-- name: choose
-- Jobs under no concurrency limit, in one queue (the fetch index gives them in claim order).
SELECT id, priority, run_at FROM conveyor_jobs
 WHERE state IN ('queued', 'retrying') AND concurrency_key IS NULL
   AND queue = :queue AND run_at <= {now}
 ORDER BY priority DESC, run_at, id
 LIMIT :limit

-- name: claim
UPDATE conveyor_jobs
   SET state = 'running', attempt = attempt + 1, attempted_at = {now},
       started_at = coalesce(started_at, {now}), heartbeat_at = {now},
       lease_owner = :worker, lease_expires_at = {now} + :lease,
       finished_at = NULL, cancel_requested = 0
 WHERE id IN (SELECT value FROM json_each(:ids))
RETURNING {job_columns}

-- name: claim_queue
-- choose and claim in one statement: the common claim, from one queue under no limit (and no
-- job under a limit chosen). The SET is claim's.
UPDATE conveyor_jobs
   SET state = 'running', attempt = attempt + 1, attempted_at = {now},
       started_at = coalesce(started_at, {now}), heartbeat_at = {now},
       lease_owner = :worker, lease_expires_at = {now} + :lease,
       finished_at = NULL, cancel_requested = 0
 WHERE id IN (SELECT id FROM conveyor_jobs
               WHERE state IN ('queued', 'retrying') AND concurrency_key IS NULL
                 AND queue = :queue AND run_at <= {now}
               ORDER BY priority DESC, run_at, id
               LIMIT :limit)
RETURNING {job_columns}

-- name: finish
-- Outcomes of attempts, fenced: each applies only while its job is running under the same
-- attempt and lease owner. {rows} stands for one row of bound parameters per outcome: (id,
-- attempt, state, delay, result, error, refund, snoozed), result and error as JSON text, refund
-- and snoozed 0 or 1; no job twice; rows of NULLs match nothing. The last parameter: the worker.
UPDATE conveyor_jobs AS j
   SET state = o.state,
       run_at = CASE WHEN o.state IN ('queued', 'retrying') THEN {now} + o.delay ELSE j.run_at END,
       finished_at = CASE WHEN o.state IN ('succeeded', 'dead', 'cancelled')
                          THEN max({now}, j.attempted_at) END,
       attempt = j.attempt - o.refund,
       snoozes = j.snoozes + o.snoozed,
       result = o.result,
       last_error = coalesce(o.error, j.last_error),
       errors = CASE WHEN o.error IS NULL THEN j.errors
                     ELSE json_insert(j.errors, '$[#]', json(o.error)) END,
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = 0
  FROM (SELECT column1 AS id, column2 AS attempt, column3 AS state, column4 AS delay,
               column5 AS result, column6 AS error, column7 AS refund, column8 AS snoozed
          FROM (VALUES {rows})) AS o
 WHERE j.id = o.id AND j.state = 'running' AND j.attempt = o.attempt AND j.lease_owner = ?
RETURNING id

-- name: finish_succeeded
-- finish when every outcome is a plain success: {rows} of (id, attempt, result), then the worker.
UPDATE conveyor_jobs AS j
   SET state = 'succeeded', finished_at = max({now}, j.attempted_at), result = o.result,
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = 0
  FROM (SELECT column1 AS id, column2 AS attempt, column3 AS result FROM (VALUES {rows})) AS o
 WHERE j.id = o.id AND j.state = 'running' AND j.attempt = o.attempt AND j.lease_owner = ?
RETURNING id

-- name: heartbeat
UPDATE conveyor_jobs
   SET lease_expires_at = {now} + :lease, heartbeat_at = {now}
 WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'running' AND lease_owner = :worker
RETURNING id, cancel_requested

-- name: rescue_stuck
WITH stuck AS (
    SELECT id,
           CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'retrying' END AS new_state,
           json_object('attempt', attempt,
                       'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
                       'kind', 'lease_expired',
                       'message', 'lease expired: worker ' || lease_owner || ' lost') AS error
      FROM conveyor_jobs
     WHERE state = 'running' AND lease_expires_at < coalesce(:now, {now})
     ORDER BY lease_expires_at
     LIMIT :limit
)
UPDATE conveyor_jobs AS j
   SET state = s.new_state,
       run_at = CASE WHEN s.new_state = 'retrying' THEN {now} ELSE j.run_at END,
       finished_at = CASE WHEN s.new_state = 'dead' THEN max({now}, j.attempted_at) END,
       last_error = s.error, errors = json_insert(j.errors, '$[#]', json(s.error)),
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = 0
  FROM stuck s
 WHERE j.id = s.id
RETURNING {job_columns}

-- name: hand_back
UPDATE conveyor_jobs
   SET state = 'queued', run_at = {now}, attempt = attempt - 1,
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = 0
 WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'running' AND lease_owner = :worker

-- name: get_job
SELECT {job_columns} FROM conveyor_jobs WHERE id = :id

-- name: job_state
SELECT state FROM conveyor_jobs WHERE id = :id

-- name: list_jobs
SELECT {job_columns} FROM conveyor_jobs
 WHERE (:state IS NULL OR state = :state)
   AND (:queue IS NULL OR queue = :queue)
   AND (:task IS NULL OR task = :task)
 ORDER BY id DESC
 LIMIT :limit

-- name: cancel_pending
UPDATE conveyor_jobs
   SET state = 'cancelled', finished_at = max({now}, coalesce(attempted_at, {now})),
       last_error = json_object('attempt', attempt,
                                'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
                                'kind', 'cancelled', 'message', :reason),
       errors = json_insert(errors, '$[#]', json_object(
                    'attempt', attempt, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
                    'kind', 'cancelled', 'message', :reason))
 WHERE id = :id AND state IN ('waiting', 'queued', 'retrying')
RETURNING {job_columns}

-- name: cancel_running
UPDATE conveyor_jobs SET cancel_requested = 1
 WHERE id = :id AND state = 'running'
RETURNING {job_columns}

-- name: retry_job
-- :state is queued, or waiting while one of the job's dependencies is unfinished.
UPDATE conveyor_jobs
   SET state = :state, run_at = {now}, attempt = 0, snoozes = 0, started_at = NULL,
       attempted_at = NULL, finished_at = NULL, heartbeat_at = NULL, result = NULL,
       cancel_requested = 0
 WHERE id = :id AND state IN ('dead', 'cancelled')
RETURNING {job_columns}

-- name: delete_job
DELETE FROM conveyor_jobs WHERE id = :id AND state <> 'running' RETURNING id

-- name: configure_queue
INSERT INTO conveyor_queues (name, concurrency_limit, updated_at) VALUES (:name, :limit, {now})
ON CONFLICT (name) DO UPDATE SET concurrency_limit = excluded.concurrency_limit, updated_at = {now}

-- name: register_worker
INSERT INTO conveyor_workers (id, host, pid, queues, concurrency, started_at, last_seen_at)
VALUES (:id, :host, :pid, :queues, :concurrency, {now}, {now})
ON CONFLICT (id) DO UPDATE SET last_seen_at = {now}, stopped_at = NULL

-- name: worker_seen
UPDATE conveyor_workers SET last_seen_at = {now} WHERE id = :id

-- name: worker_stopped
UPDATE conveyor_workers SET stopped_at = {now}, last_seen_at = {now} WHERE id = :id

-- name: list_workers
SELECT * FROM conveyor_workers ORDER BY last_seen_at DESC LIMIT 1000

-- name: stats_counts
SELECT queue, state, count(*) AS n FROM conveyor_jobs GROUP BY queue, state

-- name: stats_oldest_due
SELECT queue, {now} - min(run_at) AS age
  FROM conveyor_jobs
 WHERE state IN ('queued', 'retrying') AND run_at <= {now}
 GROUP BY queue

-- name: stats_limits
SELECT name, concurrency_limit FROM conveyor_queues

-- name: job_events
SELECT * FROM conveyor_job_events WHERE job_id = :id ORDER BY id

-- name: prune_jobs
DELETE FROM conveyor_jobs
 WHERE id IN (SELECT id FROM conveyor_jobs
               WHERE state = :state AND finished_at < coalesce(:now, {now}) - :age
               ORDER BY finished_at
               LIMIT :limit)

-- name: prune_events
DELETE FROM conveyor_job_events
 WHERE id IN (SELECT id FROM conveyor_job_events
               WHERE at < coalesce(:now, {now}) - :age
               ORDER BY at
               LIMIT :limit)

-- name: prune_pipelines
-- Finished pipelines past the retention none of whose jobs is left, oldest first (PostgreSQL's
-- queries.sql says why).
DELETE FROM conveyor_pipelines
 WHERE id IN (SELECT p.id FROM conveyor_pipelines p
               WHERE p.state <> 'running' AND p.finished_at < coalesce(:now, {now}) - :age
                 AND NOT EXISTS (SELECT 1 FROM conveyor_jobs j WHERE j.pipeline_id = p.id)
               ORDER BY p.finished_at
               LIMIT :limit)

-- name: prune_batches
DELETE FROM conveyor_batches
 WHERE id IN (SELECT b.id FROM conveyor_batches b
               WHERE b.completed_at < coalesce(:now, {now}) - :age
                 AND NOT EXISTS (SELECT 1 FROM conveyor_jobs j WHERE j.batch_id = b.id)
               ORDER BY b.completed_at
               LIMIT :limit)

-- name: periodic_advance
-- Move a periodic schedule's last tick forward (PostgreSQL's queries.sql says how it is used).
INSERT INTO conveyor_periodic (name, last_tick) VALUES (:name, :tick)
ON CONFLICT (name) DO UPDATE SET last_tick = excluded.last_tick
 WHERE conveyor_periodic.last_tick < excluded.last_tick
RETURNING name

-- name: leader_claim
INSERT INTO conveyor_leader (name, holder, started_at)
VALUES (:name, :holder, coalesce(:now, {now}))
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, started_at = excluded.started_at
 WHERE conveyor_leader.started_at <= excluded.started_at - :interval
RETURNING holder

-- ---- pipelines and batches (backends/sqlite/flows.py; triggers in migrations/0002) ------------

-- name: insert_pipeline
INSERT INTO conveyor_pipelines (name, entity, steps, created_at, updated_at)
VALUES (:name, :entity, :steps, {now}, {now})
RETURNING id

-- name: insert_spec_job
-- The job a spec describes (here: a pipeline's first step), with its final args and kwargs.
INSERT INTO conveyor_jobs (task, queue, args, kwargs, priority, created_at, run_at, max_attempts,
                           max_snoozes, deadline, timeout, concurrency_key, concurrency_limit,
                           pipeline_id)
SELECT json_extract(:spec, '$.task'), json_extract(:spec, '$.queue'), json(:args), json(:kwargs),
       json_extract(:spec, '$.priority'), {now}, {now} + json_extract(:spec, '$.delay'),
       json_extract(:spec, '$.max_attempts'), json_extract(:spec, '$.max_snoozes'),
       json_extract(:spec, '$.deadline'), json_extract(:spec, '$.timeout'),
       json_extract(:spec, '$.concurrency_key'), json_extract(:spec, '$.concurrency_limit'),
       :pipeline
RETURNING id

-- name: set_pipeline_job
UPDATE conveyor_pipelines SET current_job_id = :job_id WHERE id = :id

-- name: get_pipeline
SELECT p.*, CASE WHEN p.state = 'running' THEN j.started_at ELSE p.step_started_at END
            AS current_started_at
  FROM conveyor_pipelines p LEFT JOIN conveyor_jobs j ON j.id = p.current_job_id
 WHERE p.id = :id

-- name: list_pipelines
SELECT p.*, CASE WHEN p.state = 'running' THEN j.started_at ELSE p.step_started_at END
            AS current_started_at
  FROM conveyor_pipelines p LEFT JOIN conveyor_jobs j ON j.id = p.current_job_id
 WHERE (:state IS NULL OR p.state = :state)
   AND (:name IS NULL OR p.name = :name)
   AND (:entity IS NULL OR p.entity = :entity)
 ORDER BY p.id DESC
 LIMIT :limit

-- name: pipeline_jobs
SELECT {job_columns} FROM conveyor_jobs WHERE pipeline_id = :id ORDER BY id

-- name: cancel_pipeline
UPDATE conveyor_pipelines
   SET state = 'cancelled', error = :reason, finished_at = {now}, updated_at = {now},
       step_started_at = (SELECT started_at FROM conveyor_jobs WHERE id = current_job_id)
 WHERE id = :id AND state = 'running'
RETURNING current_job_id

-- name: overdue_steps
-- A read first (most passes find nothing, and must not take the write lock).
SELECT j.id
  FROM conveyor_pipelines p JOIN conveyor_jobs j ON j.id = p.current_job_id
 WHERE p.state = 'running' AND j.deadline IS NOT NULL AND j.started_at IS NOT NULL
   AND j.state NOT IN ('succeeded', 'dead', 'cancelled')
   AND j.started_at + j.deadline < coalesce(:now, {now})
 ORDER BY j.id
 LIMIT :limit

-- name: expire_steps
UPDATE conveyor_pipelines AS p
   SET state = 'failed', finished_at = {now}, updated_at = {now}, step_started_at = j.started_at,
       error = 'step ' || json_extract(p.steps, '$[' || p.current_step || '].name')
               || ' exceeded its ' || printf('%g', j.deadline) || ' s deadline (started '
               || printf('%02d:%02d:%02d', (CAST(j.started_at AS INTEGER) / 3600) % 24,
                         (CAST(j.started_at AS INTEGER) / 60) % 60,
                         CAST(j.started_at AS INTEGER) % 60) || ')'
  FROM conveyor_jobs AS j
 WHERE j.id IN (SELECT value FROM json_each(:ids)) AND p.current_job_id = j.id
   AND p.state = 'running' AND j.state NOT IN ('succeeded', 'dead', 'cancelled')
   AND j.started_at + j.deadline < coalesce(:now, {now})
RETURNING id, current_job_id, error  -- (SQLite: the updated table's columns, unqualified)

-- name: cancel_overdue_job
-- Cancelled at once, even while running: the worker's heartbeat then finds its lease gone.
UPDATE conveyor_jobs
   SET state = 'cancelled', finished_at = max({now}, coalesce(attempted_at, {now})),
       last_error = json_object('attempt', attempt,
                                'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
                                'kind', 'deadline', 'message', :message),
       errors = json_insert(errors, '$[#]', json_object(
                    'attempt', attempt, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
                    'kind', 'deadline', 'message', :message)),
       lease_owner = NULL, lease_expires_at = NULL, cancel_requested = 0
 WHERE id = :id AND state NOT IN ('succeeded', 'dead', 'cancelled')

-- name: insert_batch
INSERT INTO conveyor_batches (total, on_complete, created_at, updated_at)
VALUES (:total, :on_complete, {now}, {now})
RETURNING id

-- name: join_batch
UPDATE conveyor_jobs SET batch_id = :batch_id WHERE id IN (SELECT value FROM json_each(:ids))

-- name: count_batch_at_insert
-- Jobs inserted already finished (a failed dependency) count at once; the update completes a
-- batch that is already done (trigger conveyor_batches_complete).
UPDATE conveyor_batches SET failed = :failed WHERE id = :id

-- name: get_batch
SELECT * FROM conveyor_batches WHERE id = :id

-- name: batch_jobs
SELECT {job_columns} FROM conveyor_jobs WHERE batch_id = :id ORDER BY id
