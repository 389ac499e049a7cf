-- The Bookings-page button: the web app asks for a refresh through request_kommo_refresh(user_id)
-- (sql/functions/40_refresh_requests.sql); the Dagster sensor kommo_refresh_request_sensor turns each
-- pending request into one kommo_full_refresh_job run and the run-status sensors write the outcome back
-- here, where the app polls it with kommo_refresh_request_status(id).

-- Who may press the button. The app fills this table (one row per staff user id). An app that already
-- has its own roles table can replace the EXISTS check in request_kommo_refresh with a lookup there
-- instead (e.g. a join on its user_roles table); nothing else reads this table.
CREATE TABLE kommo_refresh_staff (
    user_id  uuid PRIMARY KEY,
    note     text,
    added_at timestamptz NOT NULL DEFAULT now()
);

-- SQL cannot read the Dagster code location's environment, so the code location copies its flags here:
-- the request sensor writes KOMMO_ENABLE_LIVE on every tick (synced_at), updated_at moves only when the
-- value changes. A missing row means "never synced" and counts as off.
CREATE TABLE kommo_runtime_flags (
    name       text PRIMARY KEY,
    enabled    boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    synced_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per button press that passed the checks. Lifecycle:
--   pending -> queued (the sensor started a Dagster run) -> running -> succeeded | failed | needs_review
--   pending -> refused (the live flag was switched off before the sensor picked the request up)
-- status, counts and error of a finished request are copied from its kommo_import_runs row.
CREATE TABLE kommo_refresh_requests (
    id             bigserial PRIMARY KEY,
    requested_by   uuid NOT NULL,
    requested_at   timestamptz NOT NULL DEFAULT now(),
    status         text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'queued', 'running', 'succeeded', 'failed', 'needs_review',
                                     'refused')),
    dagster_run_id text,
    import_run_id  uuid,
    leads          integer,
    contacts       integer,
    vehicles       integer,
    error          text,
    reason         text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
-- A double click (or two staff members at once) must not queue two refreshes: at most one request
-- waits for a run at a time; request_kommo_refresh returns the waiting one instead of adding another.
CREATE UNIQUE INDEX kommo_refresh_requests_one_waiting ON kommo_refresh_requests ((true))
    WHERE status IN ('pending', 'queued');
CREATE INDEX kommo_refresh_requests_pending ON kommo_refresh_requests (id) WHERE status = 'pending';

-- Like the run log: only the import's role reads and writes these by default. The app's role needs
-- EXECUTE on request_kommo_refresh and kommo_refresh_request_status plus the table privileges they use
-- (SELECT on kommo_refresh_staff and kommo_runtime_flags, SELECT/INSERT on kommo_refresh_requests and
-- USAGE on its sequence), granted where the deployment keeps its grants.
REVOKE ALL ON kommo_refresh_staff, kommo_runtime_flags, kommo_refresh_requests FROM PUBLIC;
