-- Conveyor schema version 1 (PostgreSQL). The state machine is documented in docs/state-machine.md;
-- every invariant there is a CHECK constraint here, so no code path can write a row that breaks it.

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
        CHECK (NOT cancel_requested OR state = 'running'),
    CONSTRAINT conveyor_jobs_limits_positive
        CHECK (max_attempts >= 1 AND snoozes >= 0 AND concurrency_limit >= 1
               AND (max_snoozes IS NULL OR max_snoozes >= 0)
               AND (deadline IS NULL OR deadline > 0)
               AND (timeout IS NULL OR timeout > 0)),
    CONSTRAINT conveyor_jobs_names_valid
        CHECK (length(queue) BETWEEN 1 AND 100 AND length(task) BETWEEN 1 AND 200)
);

-- Claim path: waiting jobs only, in claim order; keyed jobs have their own index so the unlimited
-- fast path never scans them.
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
CREATE FUNCTION conveyor_claim(_worker text, _queues text[], _limit integer, _lease double precision)
RETURNS SETOF conveyor_jobs
LANGUAGE plpgsql VOLATILE AS $fn$
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
        _ids := ARRAY(
            WITH queue_room AS (
                SELECT q.name, q.concurrency_limit - (
                           SELECT count(*) FROM conveyor_jobs r
                            WHERE r.state = 'running' AND r.queue = q.name) AS room
                  FROM conveyor_queues q WHERE q.name = ANY(_limited)
            ), candidates AS (
                SELECT j.id, j.queue, j.concurrency_key, j.concurrency_limit, j.priority, j.run_at
                  FROM conveyor_jobs j
                 WHERE j.state IN ('queued', 'retrying') AND j.run_at <= now()
                   AND j.queue = ANY(_queues)
                   AND (j.concurrency_key IS NOT NULL OR j.queue = ANY(_limited))
                   AND (j.concurrency_key IS NULL OR (
                           SELECT count(*) FROM conveyor_jobs r
                            WHERE r.state = 'running' AND r.concurrency_key = j.concurrency_key
                       ) < j.concurrency_limit)
                   AND NOT EXISTS (SELECT 1 FROM queue_room qr
                                    WHERE qr.name = j.queue AND qr.room <= 0)
                 ORDER BY j.priority DESC, j.run_at, j.id
                 LIMIT _limit * 4
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
             LIMIT _limit);
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

    IF cardinality(_ids) > 0 THEN
        RETURN QUERY
        UPDATE conveyor_jobs j
           SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
               started_at = coalesce(j.started_at, now()), heartbeat_at = now(),
               lease_owner = _worker, lease_expires_at = now() + _lease * interval '1 second',
               finished_at = NULL, cancel_requested = false
         WHERE j.id = ANY(ARRAY(SELECT c.id FROM conveyor_jobs c WHERE c.id = ANY(_ids)
                                 ORDER BY c.priority DESC, c.run_at, c.id
                                 LIMIT _limit))
        RETURNING j.*;
    END IF;
END
$fn$;
