-- Production tables the app reads, the Kommo id mappings, and the Zoho outbox with its triggers.
-- Kommo-derived rows are recognised by bookings.channel = 'Kommo' and sales_leads.source = 'Kommo'.

CREATE TABLE clients (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kommo_contact_id bigint UNIQUE,
    name             text,
    phone            text,
    email            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE vehicles (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kommo_vehicle_id bigint UNIQUE,
    name             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sales_leads (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    lead_code         text NOT NULL UNIQUE,
    client_id         uuid REFERENCES clients (id),
    name              text,
    stage_id          bigint,
    pipeline_id       bigint,
    value_amount      numeric(14, 2),
    owner_id          uuid,
    expected_close_at timestamptz,
    source            text NOT NULL DEFAULT 'Kommo',
    archived_at       timestamptz,
    kommo_created_at  timestamptz,
    kommo_updated_at  timestamptz,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX sales_leads_kommo_live ON sales_leads (lead_code) WHERE source = 'Kommo' AND archived_at IS NULL;

CREATE TABLE bookings (
    id                uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_id         uuid REFERENCES clients (id),
    sales_lead_id     uuid REFERENCES sales_leads (id),
    channel           text NOT NULL,
    source            text,
    source_payload_id text UNIQUE,
    status            text NOT NULL DEFAULT 'pending',
    kommo_status_id   bigint,
    owner_id          uuid,
    vehicle_id        uuid,
    start_at          timestamptz,
    end_at            timestamptz,
    is_active         boolean NOT NULL DEFAULT true,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bookings_kommo_active ON bookings (source_payload_id) WHERE channel = 'Kommo' AND is_active;
CREATE INDEX bookings_vehicle_dates ON bookings (vehicle_id, start_at) WHERE is_active;

ALTER TABLE bookings ADD CONSTRAINT bookings_vehicle_fk FOREIGN KEY (vehicle_id) REFERENCES vehicles (id);

CREATE TABLE booking_vehicles (
    booking_id uuid NOT NULL REFERENCES bookings (id) ON DELETE CASCADE,
    vehicle_id uuid NOT NULL REFERENCES vehicles (id),
    "primary"  boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (booking_id, vehicle_id)
);
CREATE INDEX booking_vehicles_vehicle ON booking_vehicles (vehicle_id);

-- Manual calendar entries; the view calendar_events_expanded adds dated Kommo bookings to them.
CREATE TABLE calendar_events (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    title      text NOT NULL,
    vehicle_id uuid REFERENCES vehicles (id),
    start_at   timestamptz NOT NULL,
    end_at     timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Mappings from Kommo ids to the app's values; owned by operators, seeded where the repo knows them.
CREATE TABLE kommo_user_map (
    kommo_user_id bigint PRIMARY KEY,
    owner_id      uuid NOT NULL,
    note          text
);

CREATE TABLE kommo_status_map (
    status_id      bigint PRIMARY KEY,
    booking_status text NOT NULL,
    label          text
);

CREATE TABLE kommo_source_map (
    enum_id bigint PRIMARY KEY,
    source  text NOT NULL
);

-- Changes to bookings, booking_vehicles and sales_leads are queued here for the Zoho sync.
CREATE TABLE zoho_outbox (
    id          bigserial PRIMARY KEY,
    table_name  text NOT NULL,
    operation   text NOT NULL,
    row_id      text,
    payload     jsonb,
    enqueued_at timestamptz NOT NULL DEFAULT now()
);

-- The refresh suppresses the outbox inside its own transaction only, with a transaction-local setting
-- (set_config('kommo.suppress_outbox', 'on', true)), which needs no superuser, unlike
-- session_replication_role.
CREATE FUNCTION zoho_outbox_enqueue() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    rec record;
BEGIN
    IF coalesce(current_setting('kommo.suppress_outbox', true), '') = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        rec := OLD;
    ELSE
        rec := NEW;
    END IF;
    INSERT INTO zoho_outbox (table_name, operation, row_id, payload)
    VALUES (
        TG_TABLE_NAME,
        TG_OP,
        CASE WHEN TG_TABLE_NAME = 'booking_vehicles' THEN to_jsonb(rec) ->> 'booking_id' ELSE to_jsonb(rec) ->> 'id' END,
        to_jsonb(rec)
    );
    RETURN NULL;
END;
$$;

CREATE TRIGGER bookings_zoho_outbox AFTER INSERT OR UPDATE OR DELETE ON bookings
    FOR EACH ROW EXECUTE FUNCTION zoho_outbox_enqueue();
CREATE TRIGGER booking_vehicles_zoho_outbox AFTER INSERT OR UPDATE OR DELETE ON booking_vehicles
    FOR EACH ROW EXECUTE FUNCTION zoho_outbox_enqueue();
CREATE TRIGGER sales_leads_zoho_outbox AFTER INSERT OR UPDATE OR DELETE ON sales_leads
    FOR EACH ROW EXECUTE FUNCTION zoho_outbox_enqueue();
