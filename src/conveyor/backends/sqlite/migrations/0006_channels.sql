-- Conveyor schema version 6 (SQLite): nothing changes. PostgreSQL's version 6 gives each schema
-- notification channels of its own (SQLite has no notifications). Both backends number their
-- migrations the same.
SELECT 1;
