-- Conveyor schema version 5 (SQLite): nothing changes. PostgreSQL's version 5 turns JIT
-- compilation off in the functions whose plans forbid sequential scans (SQLite has no JIT).
-- Both backends number their migrations the same.
SELECT 1;
