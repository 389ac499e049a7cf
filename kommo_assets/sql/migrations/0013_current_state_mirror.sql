-- The current-state mirror: the latest Kommo state of every lead and contact the import has read, from
-- which production is derived (docs/incremental.md, "Derive, don't patch").
--
-- Until now production was patched from each run's staging: an input that lives outside a lead (a row of
-- kommo_source_map, kommo_status_map or kommo_user_map, an option label renamed in Kommo) reached only the
-- leads a later run staged. Now every swap, full or incremental, first writes what its run staged into
-- these tables (in the swap's transaction: the mirror and production commit together or not at all), then
-- derives production from them with the one set of mapping rules (kommo_snapshot), for its own leads and
-- for every lead whose rules changed since production was last derived (kommo_derived_rules). Run-scoped
-- staging stays, for audit and the change preview.
--
-- Only the columns the rules read are kept (no payload: the run's staging keeps that). run_id is the run
-- that last changed a row (an unchanged row is not rewritten), without a foreign key: runs are pruned,
-- the mirror is not.
CREATE TABLE kommo_leads (
    lead_id             bigint PRIMARY KEY,
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
    run_id              uuid,
    changed_at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE kommo_leads IS
    'The latest Kommo state of every lead of the windows imported (kommo_assets mirror; production is derived from it)';

CREATE TABLE kommo_contacts (
    contact_id bigint PRIMARY KEY,
    name       text,
    phone      text,
    email      text,
    run_id     uuid,
    changed_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE kommo_contacts IS
    'The latest Kommo state of every contact the import has read (kommo_assets mirror)';

-- The options of the select fields the rules read (vehicle 1234163, source 823206), as the last swap read them.
CREATE TABLE kommo_field_options (
    field_id bigint NOT NULL,
    enum_id  bigint NOT NULL,
    value    text NOT NULL,
    PRIMARY KEY (field_id, enum_id)
);

-- The inputs outside a lead that production was last derived with: each mapping row and each source
-- option label, by rule and key. A swap compares them with the inputs in force, re-derives the leads
-- whose keys differ, and records the new ones (kommo_rules_changed).
CREATE TABLE kommo_derived_rules (
    rule  text NOT NULL CHECK (rule IN ('source_map', 'status_map', 'user_map', 'source_option')),
    key   bigint NOT NULL,
    value text NOT NULL,
    PRIMARY KEY (rule, key)
);

REVOKE ALL ON kommo_leads, kommo_contacts, kommo_field_options, kommo_derived_rules FROM PUBLIC;

-- The mirror starts empty, so no window is known to be in it: every window's coverage is forgotten, and
-- the next sync reads each window in scope whole, from its first second (as it reads a new year), which
-- fills the mirror; bookings_fresh fails until that sync has succeeded. Reading again what production
-- already holds changes nothing in it. A full refresh of a window fills its part of the mirror as well.
DELETE FROM kommo_window_coverage;
