-- Conveyor schema version 4 (SQLite): nothing changes. PostgreSQL's version 4 pins the claim's
-- cached plans to indexes; SQLite plans every statement anew. (Both backends number their
-- migrations the same.)
SELECT 1;
