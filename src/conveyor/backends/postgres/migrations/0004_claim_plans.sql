-- Conveyor schema version 4 (PostgreSQL): the claim never reads the jobs table sequentially.
-- Its statements keep one generic plan per session (0003), made at their first call with the
-- table as it is then. Made on a small table never analyzed (a fresh database, a worker started
-- before the first ANALYZE), the cheapest plan to update the chosen jobs read the whole table,
-- and kept doing so as it grew until an ANALYZE or VACUUM replanned it (0.5 ms of a claim at
-- 2,000 jobs). Every statement of the claim has an index to use.
ALTER FUNCTION conveyor_claim(text, text[], integer, double precision) SET enable_seqscan = off;
