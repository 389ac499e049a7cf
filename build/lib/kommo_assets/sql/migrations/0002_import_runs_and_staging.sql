-- The run log and the staging tables. Staging rows are scoped by run id and keep the raw payload.

CREATE TABLE kommo_import_runs (
    id                   uuid PRIMARY KEY,
    dagster_run_id       text,
    job_name             text,
    triggered_by         text,
    status               text NOT NULL DEFAULT 'running'
                         CHECK (status IN ('running', 'succeeded', 'failed', 'needs_review')),
    dry_run              boolean NOT NULL DEFAULT false,
    created_from         timestamptz NOT NULL,
    created_to           timestamptz NOT NULL,
    max_drop_ratio       numeric NOT NULL DEFAULT 0.30,
    started_at           timestamptz NOT NULL DEFAULT now(),
    heartbeat_at         timestamptz NOT NULL DEFAULT now(),
    staged_at            timestamptz,
    guard_passed_at      timestamptz,
    swap_started_at      timestamptz,
    finished_at          timestamptz,
    leads_count          integer,
    contacts_count       integer,
    vehicles_count       integer,
    previous_leads_count integer,
    drop_ratio           numeric,
    stats                jsonb NOT NULL DEFAULT '{}'::jsonb,
    swap_counts          jsonb,
    error                text,
    CHECK (status = 'running' OR finished_at IS NOT NULL),
    CHECK (created_from < created_to)
);
-- At most one import reads Kommo at a time: two would share (and break) the account's rate limit.
CREATE UNIQUE INDEX kommo_import_runs_one_running ON kommo_import_runs ((true)) WHERE status = 'running';
CREATE INDEX kommo_import_runs_last_success ON kommo_import_runs (finished_at DESC)
    WHERE status = 'succeeded' AND NOT dry_run;

CREATE TABLE stg_kommo_leads (
    run_id              uuid NOT NULL REFERENCES kommo_import_runs (id) ON DELETE CASCADE,
    lead_id             bigint NOT NULL,
    payload             jsonb NOT NULL,
    contact_id          bigint,
    status_id           bigint,
    pipeline_id         bigint,
    responsible_user_id bigint,
    price               numeric(14, 2),
    name                text,
    vehicle_enum_id     bigint,
    source_enum_id      bigint,
    delivery_at         timestamptz,
    collect_at          timestamptz,
    created_at          timestamptz,
    updated_at          timestamptz,
    closed_at           timestamptz,
    staged_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, lead_id)
);

CREATE TABLE stg_kommo_contacts (
    run_id     uuid NOT NULL REFERENCES kommo_import_runs (id) ON DELETE CASCADE,
    contact_id bigint NOT NULL,
    payload    jsonb NOT NULL,
    name       text,
    phone      text,
    email      text,
    staged_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, contact_id)
);

CREATE TABLE stg_kommo_booking_vehicles (
    run_id          uuid NOT NULL REFERENCES kommo_import_runs (id) ON DELETE CASCADE,
    lead_id         bigint NOT NULL,
    vehicle_enum_id bigint NOT NULL,
    PRIMARY KEY (run_id, lead_id)
);

-- Enum options of the select fields (vehicle 1234163, source 823206) as Kommo listed them this run.
CREATE TABLE stg_kommo_field_options (
    run_id   uuid NOT NULL REFERENCES kommo_import_runs (id) ON DELETE CASCADE,
    field_id bigint NOT NULL,
    enum_id  bigint NOT NULL,
    value    text NOT NULL,
    PRIMARY KEY (run_id, field_id, enum_id)
);

-- Only the owner (the import's role) reads the run log and staging: raw payloads hold personal data.
REVOKE ALL ON kommo_import_runs, stg_kommo_leads, stg_kommo_contacts, stg_kommo_booking_vehicles,
    stg_kommo_field_options FROM PUBLIC;
