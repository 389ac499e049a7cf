-- The incremental sync: runs of a kind, Kommo's clock on every run, the sync cursor, staged removals.

-- 1. What a run is: a full refresh of a window, a dry run of a window, or an increment (the leads and
--    contacts Kommo changed since the cursor, applied by run_kommo_increment). An increment has no window:
--    its scope is the leads it staged (kommo_increment_scope). dry_run stays, equal to kind = 'dry_run'
--    for every run start_kommo_import_run opens.
ALTER TABLE kommo_import_runs
    ADD COLUMN kind text NOT NULL DEFAULT 'full_refresh'
        CHECK (kind IN ('full_refresh', 'dry_run', 'increment')),
    -- Kommo's clock (the HTTP Date header of the run's first Kommo answer), not this machine's: the
    -- cursor an increment starts from is compared with Kommo's updated_at stamps.
    ADD COLUMN kommo_clock_at timestamptz,
    -- The increment's range on Kommo's clock: changes stamped in [sync_from, sync_to) were read.
    ADD COLUMN sync_from timestamptz,
    ADD COLUMN sync_to timestamptz;
UPDATE kommo_import_runs SET kind = 'dry_run' WHERE dry_run;
ALTER TABLE kommo_import_runs
    ALTER COLUMN created_from DROP NOT NULL,
    ALTER COLUMN created_to DROP NOT NULL,
    ADD CONSTRAINT kommo_import_runs_kind_window
        CHECK (CASE WHEN kind = 'increment' THEN created_from IS NULL AND created_to IS NULL
                    ELSE created_from IS NOT NULL AND created_to IS NOT NULL END);

-- The drop guard compares with the last succeeded full refresh of the same window; kommo_sync_cursor
-- reads the latest one of each window.
DROP INDEX kommo_import_runs_last_success;
CREATE INDEX kommo_import_runs_last_success ON kommo_import_runs (created_from, created_to, finished_at DESC)
    WHERE status = 'succeeded' AND kind = 'full_refresh';

-- 2. The sync cursor, on Kommo's clock: every change Kommo stamped before it has been applied. Moved only
--    forward, by run_kommo_increment, in the transaction that applies the changes it covers. At most one row.
CREATE TABLE kommo_sync_state (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    cursor     timestamptz NOT NULL,
    run_id     uuid REFERENCES kommo_import_runs (id) ON DELETE SET NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- 3. Leads an increment must remove: deleted in Kommo. (A lead moved to status 143 is staged as an
--    ordinary row in stg_kommo_leads; kommo_snapshot leaves it out.)
CREATE TABLE stg_kommo_lead_removals (
    run_id  uuid NOT NULL REFERENCES kommo_import_runs (id) ON DELETE CASCADE,
    lead_id bigint NOT NULL,
    reason  text,
    PRIMARY KEY (run_id, lead_id)
);

REVOKE ALL ON kommo_sync_state, stg_kommo_lead_removals FROM PUBLIC;
