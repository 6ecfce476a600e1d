-- Conveyor schema version 9 (PostgreSQL): the last tick enqueued of each periodic schedule
-- (periodic.py, services/scheduler.py). A tick is enqueued only by the statement that moves its
-- schedule's last_tick forward to it, in the transaction that inserts its job: so a tick runs
-- once, even after its job was pruned or deleted and a scheduler that never saw it comes up.
CREATE TABLE conveyor_periodic (
    name       text PRIMARY KEY,
    last_tick  timestamptz NOT NULL,
    CONSTRAINT conveyor_periodic_name_valid CHECK (length(name) BETWEEN 1 AND 200)
);
