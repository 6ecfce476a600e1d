-- Conveyor schema version 4 (SQLite): nothing changes. PostgreSQL's version 4 pins the claim's
-- cached plans to indexes (SQLite plans every statement anew), lets the GIN index of its history
-- take keys into a pending list and compresses history with lz4 (SQLite has neither). Both
-- backends number their migrations the same.
SELECT 1;
