-- The button's rules at the database level, and what keeps its checks fast as run records pile up.

-- 1. One request open at a time, running included (was: waiting only). request_kommo_refresh already
--    answered with the open one; the index now refuses a second whatever the caller's isolation level.
--    Requests a caller slipped past the old rule stay as they were, but the newest of them is closed.
UPDATE kommo_refresh_requests
   SET status = 'refused', reason = 'closed by migration 0011: another request was already open',
       updated_at = now(), finished_at = now()
 WHERE status IN ('pending', 'queued', 'running')
   AND id <> (SELECT min(id) FROM kommo_refresh_requests WHERE status IN ('pending', 'queued', 'running'));
DROP INDEX kommo_refresh_requests_one_waiting;
CREATE UNIQUE INDEX kommo_refresh_requests_one_open ON kommo_refresh_requests ((true))
    WHERE status IN ('pending', 'queued', 'running');

-- 2. The last refresh that ended (the button's cooldown), whatever the number of increments and dry runs.
CREATE INDEX kommo_import_runs_refresh_finished ON kommo_import_runs (finished_at DESC)
    WHERE NOT dry_run AND kind <> 'increment';
-- 3. Retention (prune_kommo_import_runs) reads closed runs by kind and age.
CREATE INDEX kommo_import_runs_closed ON kommo_import_runs (kind, finished_at) WHERE finished_at IS NOT NULL;
