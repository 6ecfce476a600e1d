-- Conveyor schema version 6 (PostgreSQL): each schema's notifications on channels of its own.
-- NOTIFY channels are database-wide: two Conveyors in two schemas of one database (tenants, test
-- suites) woke each other's idle workers, whose listeners then claimed in vain, and each other's
-- result waiters with job ids that meant other jobs there. A channel is now named after its
-- schema's oid (conveyor_channel); the listeners ask for it when they connect.

DROP FUNCTION conveyor_notify_finished(bigint[]);
DROP FUNCTION conveyor_notify_due(text[]);

-- The channel of notification ``_name`` for the Conveyor schema that holds ``_table``: the name and
-- the schema's oid ('conveyor_job_due_2200'). NOTIFY channels are database-wide: Conveyors in two
-- schemas of one database hear only their own notifications (idle workers are not woken, nor
-- claim, for another schema's jobs; waiters are not woken by another schema's job ids).
CREATE FUNCTION conveyor_channel(_name text, _table regclass) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT _name || '_' || c.relnamespace::bigint FROM pg_class c WHERE c.oid = _table
$fn$;

-- Tell result waiters (LISTEN conveyor_job_state_<schema>) which jobs just finished:
-- comma-separated ids, at most 300 per notification (payloads must stay under 8000 bytes).
-- Delivered on commit. ``_table``: the jobs table (the channel's schema).
CREATE FUNCTION conveyor_notify_finished(_ids bigint[], _table regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify(conveyor_channel('conveyor_job_state', _table), string_agg(c.id::text, ','))
       FROM (SELECT u.id, (u.n - 1) / 300 AS chunk
               FROM unnest(_ids) WITH ORDINALITY AS u(id, n)) c
      GROUP BY c.chunk;
END
$fn$;

-- Wake idle workers (LISTEN conveyor_job_due_<schema>): one notification per queue that got jobs
-- due now. NOTIFY folds identical payloads within a transaction, so a bulk insert sends one per
-- queue.
CREATE FUNCTION conveyor_notify_due(_queues text[], _table regclass) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    _channel text := conveyor_channel('conveyor_job_due', _table);
BEGIN
    PERFORM pg_notify(_channel, q) FROM (SELECT DISTINCT unnest(_queues) AS q) s;
END
$fn$;

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
        PERFORM conveyor_notify_due(_r.due, TG_RELID);
    END IF;
    IF _r.finished IS NOT NULL THEN
        PERFORM conveyor_notify_finished(_r.finished, TG_RELID);
    END IF;
    RETURN NULL;
END
$fn$;

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
        PERFORM conveyor_notify_due(_r.due, TG_RELID);
    END IF;
    IF _r.succeeded IS NULL AND _r.failed IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM conveyor_notify_finished(coalesce(_r.succeeded, '{}') || coalesce(_r.failed, '{}'),
                                     TG_RELID);
    IF EXISTS (SELECT 1 FROM conveyor_job_deps WHERE depends_on = ANY(_r.failed)) THEN
        PERFORM conveyor_cancel_dependents(_r.failed, _r.reasons);
    END IF;
    IF EXISTS (SELECT 1 FROM conveyor_job_deps WHERE depends_on = ANY(_r.succeeded)) THEN
        PERFORM conveyor_release_dependents(_r.succeeded);
    END IF;
    RETURN NULL;
END
$fn$;

CREATE OR REPLACE FUNCTION conveyor_notify_flow() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify(conveyor_channel('conveyor_flow_state', TG_RELID), TG_ARGV[0] || NEW.id);
    RETURN NULL;
END
$fn$;
