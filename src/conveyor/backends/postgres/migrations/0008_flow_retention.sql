-- Conveyor schema version 8 (PostgreSQL): finished pipelines and completed batches are pruned
-- once past their retention (services/pruner.py, queries prune_pipelines and prune_batches),
-- oldest first: these indexes find them without reading the running ones.
CREATE INDEX conveyor_pipelines_finished ON conveyor_pipelines (finished_at) WHERE state <> 'running';
CREATE INDEX conveyor_batches_completed ON conveyor_batches (completed_at)
    WHERE completed_at IS NOT NULL;
