-- Conveyor schema version 9 (SQLite): the last tick enqueued of each periodic schedule
-- (periodic.py, services/scheduler.py; PostgreSQL's 0009 says why).
CREATE TABLE conveyor_periodic (
    name       TEXT PRIMARY KEY,
    last_tick  REAL NOT NULL,
    CONSTRAINT conveyor_periodic_name_valid CHECK (length(name) BETWEEN 1 AND 200)
);
