-- Conveyor schema version 4 (PostgreSQL): cheaper plans and history writes.

-- The claim never reads the jobs table sequentially. Its statements keep one generic plan per
-- session (0003), made at their first call with the table as it is then. Made on a small table
-- never analyzed (a fresh database, a worker started before the first ANALYZE), the cheapest plan
-- to update the chosen jobs read the whole table, and kept doing so as it grew until an ANALYZE
-- or VACUUM replanned it (0.5 ms of an idle claim at 2,000 jobs). Every statement of the claim
-- has an index to use.
ALTER FUNCTION conveyor_claim(text, text[], integer, double precision) SET enable_seqscan = off;

-- Forgetting deleted jobs finds their history records through the GIN index, whatever the
-- statistics say: planned on a small, never-analyzed history table, the lookup of each job
-- scanned every record instead (and every record's array decompressed: 3.5-4 s for a prune of
-- 1,000 jobs among 40,000, against 20-60 ms through the index). No sequential scan, and no full
-- scan of the primary key instead: bitmap scans only, which is all a GIN index offers anyway.
ALTER FUNCTION conveyor_history_forget(bigint[]) SET enable_seqscan = off SET enable_indexscan = off;

-- History's job index takes new keys into its pending list again (0003 turned that off: the
-- statement that filled the list waited about 0.2 s to merge it). The workers' vacuum service
-- now merges it every few seconds (gin_clean_pending_list), so statements seldom meet a full
-- list, and each insert of history is cheaper (a bulk enqueue's COPY about 12%).
ALTER INDEX conveyor_history_jobs SET (fastupdate = on);

-- History's arrays are compressed with lz4 where the server has it: pglz, the default, was about
-- 2% of the server's time in a drain (every claim and outcome of 500 jobs writes a 4 KB array of
-- job ids); lz4 costs a fraction of that for about the same size. A server built without lz4
-- keeps pglz.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE conveyor_history ALTER COLUMN job_ids SET COMPRESSION lz4, '
            'ALTER COLUMN attempts SET COMPRESSION lz4';
EXCEPTION WHEN feature_not_supported OR syntax_error THEN
    NULL;  -- a server built without lz4 (or older than 14, without SET COMPRESSION) keeps pglz
END
$$;
