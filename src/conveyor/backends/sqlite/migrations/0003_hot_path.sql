-- Conveyor schema version 3 (SQLite): a cheaper hot path (docs/performance.md).
SELECT 1;
