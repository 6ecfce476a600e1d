-- Conveyor schema version 3 (PostgreSQL): a cheaper hot path (docs/performance.md).

-- Claim: as in version 1, but the claimed jobs are re-read in claim order only when both paths
-- (limited and unlimited) chose jobs and there are more than _limit of them; otherwise the ids
-- chosen are exactly the ones to claim.
CREATE OR REPLACE FUNCTION conveyor_claim(_worker text, _queues text[], _limit integer,
                                          _lease double precision)
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
