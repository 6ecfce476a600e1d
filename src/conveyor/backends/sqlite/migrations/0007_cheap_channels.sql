-- Conveyor schema version 7 (SQLite): nothing changes. PostgreSQL's version 7 names its
-- notification channels without a catalog query (SQLite has no notifications). Both backends
-- number their migrations the same.
SELECT 1;
