-- Conveyor schema version 3 (SQLite): a cheaper hot path (docs/performance.md).

-- The triggers that release or cancel a finished job's waiting dependents run their UPDATE only
-- when the job has dependents (one probe of conveyor_job_deps_depends_on in WHEN). Most jobs have
-- none, and that UPDATE cost a success about a third of its finish statement. Same effect.
DROP TRIGGER conveyor_jobs_release_dependents;
CREATE TRIGGER conveyor_jobs_release_dependents AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.state = 'succeeded' AND OLD.state <> 'succeeded'
    AND EXISTS (SELECT 1 FROM conveyor_job_deps WHERE depends_on = NEW.id)
BEGIN
    UPDATE conveyor_jobs
       SET state = 'queued', run_at = max(run_at, ((julianday('now') - 2440587.5) * 86400.0))
     WHERE state = 'waiting'
       AND id IN (SELECT job_id FROM conveyor_job_deps WHERE depends_on = NEW.id)
       AND NOT EXISTS (SELECT 1 FROM conveyor_job_deps d JOIN conveyor_jobs p ON p.id = d.depends_on
                        WHERE d.job_id = conveyor_jobs.id AND p.state <> 'succeeded');
END;

DROP TRIGGER conveyor_jobs_cancel_dependents;
CREATE TRIGGER conveyor_jobs_cancel_dependents AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.state IN ('dead', 'cancelled') AND OLD.state NOT IN ('dead', 'cancelled')
    AND EXISTS (SELECT 1 FROM conveyor_job_deps WHERE depends_on = NEW.id)
BEGIN
    UPDATE conveyor_jobs
       SET state = 'cancelled', finished_at = ((julianday('now') - 2440587.5) * 86400.0),
           last_error = json_object(
               'attempt', attempt, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
               'kind', 'dependency',
               'message', CASE WHEN json_extract(NEW.last_error, '$.kind') = 'dependency'
                               THEN json_extract(NEW.last_error, '$.message')
                               ELSE 'dependency job ' || NEW.id || ' (' || NEW.task || ') ended '
                                    || NEW.state END),
           errors = json_insert(errors, '$[#]', json_object(
               'attempt', attempt, 'at', strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'),
               'kind', 'dependency',
               'message', CASE WHEN json_extract(NEW.last_error, '$.kind') = 'dependency'
                               THEN json_extract(NEW.last_error, '$.message')
                               ELSE 'dependency job ' || NEW.id || ' (' || NEW.task || ') ended '
                                    || NEW.state END))
     WHERE state = 'waiting'
       AND id IN (SELECT job_id FROM conveyor_job_deps WHERE depends_on = NEW.id);
END;

-- SQLite fires a table's triggers newest first. The triggers of migration 0002, created after the
-- two above, are recreated after them, unchanged, so that every trigger fires in the same order
-- as before (the history keeps recording the same events in the same order).
DROP TRIGGER conveyor_jobs_pipeline_step;
CREATE TRIGGER conveyor_jobs_pipeline_step AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.pipeline_id IS NOT NULL
    AND NEW.state IN ('succeeded', 'dead', 'cancelled')
    AND OLD.state NOT IN ('succeeded', 'dead', 'cancelled')
BEGIN
    INSERT INTO conveyor_jobs (task, queue, args, kwargs, priority, created_at, run_at,
                               max_attempts, max_snoozes, deadline, timeout, concurrency_key,
                               concurrency_limit, pipeline_id)
    SELECT json_extract(s.value, '$.task'), json_extract(s.value, '$.queue'),
           json('[' || coalesce(NEW.result, 'null')
                || CASE WHEN json_array_length(s.value, '$.args') = 0 THEN ']'
                        ELSE ',' || substr(json_extract(s.value, '$.args'), 2) END),
           json_extract(s.value, '$.kwargs'), json_extract(s.value, '$.priority'),
           ((julianday('now') - 2440587.5) * 86400.0),
           ((julianday('now') - 2440587.5) * 86400.0) + json_extract(s.value, '$.delay'),
           json_extract(s.value, '$.max_attempts'), json_extract(s.value, '$.max_snoozes'),
           json_extract(s.value, '$.deadline'), json_extract(s.value, '$.timeout'),
           json_extract(s.value, '$.concurrency_key'), json_extract(s.value, '$.concurrency_limit'),
           p.id
      FROM conveyor_pipelines p JOIN json_each(p.steps) s ON s.key = p.current_step + 1
     WHERE p.id = NEW.pipeline_id AND p.state = 'running' AND p.current_job_id = NEW.id
       AND NEW.state = 'succeeded';
    UPDATE conveyor_pipelines
       SET current_step = current_step + 1,
           current_job_id = (SELECT max(id) FROM conveyor_jobs WHERE pipeline_id = NEW.pipeline_id),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0)
     WHERE id = NEW.pipeline_id AND state = 'running' AND current_job_id = NEW.id
       AND NEW.state = 'succeeded' AND current_step + 1 < json_array_length(steps);
    UPDATE conveyor_pipelines
       SET state = 'succeeded', result = coalesce(NEW.result, 'null'),
           finished_at = ((julianday('now') - 2440587.5) * 86400.0),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0), step_started_at = NEW.started_at
     WHERE id = NEW.pipeline_id AND state = 'running' AND current_job_id = NEW.id
       AND NEW.state = 'succeeded';
    UPDATE conveyor_pipelines
       SET state = 'failed',
           finished_at = ((julianday('now') - 2440587.5) * 86400.0),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0), step_started_at = NEW.started_at,
           error = 'step ' || json_extract(steps, '$[' || current_step || '].name') || CASE
               WHEN NEW.deadline IS NOT NULL AND NEW.started_at IS NOT NULL
                    AND (json_extract(NEW.last_error, '$.kind') = 'deadline'
                         OR json_extract(NEW.last_error, '$.message') LIKE '%deadline runs out first)')
                   THEN ' exceeded its ' || printf('%g', NEW.deadline) || ' s deadline (started '
                        || printf('%02d:%02d:%02d', (CAST(NEW.started_at AS INTEGER) / 3600) % 24,
                                  (CAST(NEW.started_at AS INTEGER) / 60) % 60,
                                  CAST(NEW.started_at AS INTEGER) % 60) || ')'
               WHEN NEW.state = 'cancelled'
                   THEN ' (job ' || NEW.id || ') was cancelled: '
                        || coalesce(json_extract(NEW.last_error, '$.message'), 'no reason recorded')
               ELSE ' (job ' || NEW.id || ') ended ' || NEW.state || ': '
                    || coalesce(json_extract(NEW.last_error, '$.message'), 'no error recorded')
           END
     WHERE id = NEW.pipeline_id AND state = 'running' AND current_job_id = NEW.id
       AND NEW.state <> 'succeeded';
END;

DROP TRIGGER conveyor_jobs_batch_count;
CREATE TRIGGER conveyor_jobs_batch_count AFTER UPDATE OF state ON conveyor_jobs
FOR EACH ROW WHEN NEW.batch_id IS NOT NULL
    AND (NEW.state IN ('succeeded', 'dead', 'cancelled'))
        <> (OLD.state IN ('succeeded', 'dead', 'cancelled'))
BEGIN
    UPDATE conveyor_batches
       SET succeeded = succeeded + (NEW.state = 'succeeded') - (OLD.state = 'succeeded'),
           failed = failed + (NEW.state IN ('dead', 'cancelled'))
                    - (OLD.state IN ('dead', 'cancelled')),
           updated_at = ((julianday('now') - 2440587.5) * 86400.0)
     WHERE id = NEW.batch_id;
END;
