-- Conveyor schema version 7 (PostgreSQL): notifications name their channel without a query.
-- 0006's conveyor_channel finds a table's schema in pg_class: an SQL function with a FROM clause
-- is planned again at every call. Every insert of jobs due now called it (through
-- conveyor_notify_due): 0.3-0.4 ms of a 2.5 ms enqueue on an idle machine, measured. The rule
-- (the name and the schema's oid) is now conveyor_schema_channel, which has no FROM and is inlined
-- into its callers' cached plans; triggers pass their table's schema (TG_TABLE_SCHEMA). The
-- channels keep their names: listeners of version 6 hear version 7's notifications.

-- The channel of notification ``_name`` for the Conveyor schema named ``_schema``: the name and the
-- schema's oid ('conveyor_job_due_2200'). No FROM clause: inlined where it is called.
CREATE FUNCTION conveyor_schema_channel(_name text, _schema name) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT _name || '_' || quote_ident(_schema)::regnamespace::oid::bigint
$fn$;

-- The same channel, for the schema that holds ``_table`` (what listeners ask for, once each).
CREATE OR REPLACE FUNCTION conveyor_channel(_name text, _table regclass) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT conveyor_schema_channel(_name, n.nspname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = _table
$fn$;

DROP FUNCTION conveyor_notify_finished(bigint[], regclass);
DROP FUNCTION conveyor_notify_due(text[], regclass);

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
        PERFORM conveyor_notify_due(_r.due, TG_TABLE_SCHEMA);
    END IF;
    IF _r.finished IS NOT NULL THEN
        PERFORM conveyor_notify_finished(_r.finished, TG_TABLE_SCHEMA);
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

CREATE OR REPLACE FUNCTION conveyor_notify_flow() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify(conveyor_schema_channel('conveyor_flow_state', TG_TABLE_SCHEMA),
                      TG_ARGV[0] || NEW.id);
    RETURN NULL;
END
$fn$;
