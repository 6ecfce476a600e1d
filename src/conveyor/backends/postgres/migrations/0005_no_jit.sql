-- Conveyor schema version 5 (PostgreSQL): no JIT compilation in the functions that forbid plan
-- types.

-- Forbidding a plan type (0004) does not remove its paths: it adds 1e10 to their cost. A plan
-- that keeps such a path in a branch never executed (the claim's check for limited jobs, planned
-- for a queue that has none) then costs more than jit_above_cost, and on a session with JIT on
-- (the server's default; Conveyor's own connections turn it off, but a pooler in transaction
-- mode, or a claim made on a connection Conveyor did not configure, keeps it) every call
-- compiled its expressions again: 120 ms of a 1 ms claim.
ALTER FUNCTION conveyor_claim(text, text[], integer, double precision) SET jit = off;
ALTER FUNCTION conveyor_history_forget(bigint[]) SET jit = off;
