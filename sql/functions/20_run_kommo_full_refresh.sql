-- The production swap: one transaction, set-based, from a run's staging into the production tables.
--
-- Decisions (see the README): history is kept, so rows present in the snapshot are upserted (and
-- re-activated) and Kommo rows missing from it are deactivated (bookings.is_active = false) or
-- archived (sales_leads.archived_at); ids stay stable and unchanged rows are not written at all.
-- The Zoho outbox triggers are suppressed for this transaction only. Any error rolls everything back.

CREATE OR REPLACE FUNCTION run_kommo_full_refresh(p_run_id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs;
    v_started timestamptz := clock_timestamp();
    v_vehicles_created bigint;
    v_clients_added bigint;
    v_clients_updated bigint;
    v_leads_added bigint;
    v_leads_updated bigint;
    v_leads_archived bigint;
    v_bookings_added bigint;
    v_bookings_updated bigint;
    v_bookings_deactivated bigint;
    v_links_removed bigint;
    v_links_added bigint;
    v_counts jsonb;
BEGIN
    -- One swap at a time, across processes and hosts; released at commit or rollback.
    PERFORM pg_advisory_xact_lock(90902);

    SELECT * INTO v_run FROM kommo_import_runs WHERE id = p_run_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown Kommo import run %', p_run_id;
    END IF;
    IF v_run.status <> 'running' THEN
        RAISE EXCEPTION 'Kommo import run % is %, not running: start a new run', p_run_id, v_run.status;
    END IF;
    IF v_run.dry_run THEN
        RAISE EXCEPTION 'Kommo import run % is a dry run and never swaps', p_run_id;
    END IF;
    IF v_run.staged_at IS NULL THEN
        RAISE EXCEPTION 'Kommo import run % has not finished staging', p_run_id;
    END IF;
    IF v_run.guard_passed_at IS NULL THEN
        RAISE EXCEPTION 'Kommo import run % has not passed the drop guard', p_run_id;
    END IF;

    PERFORM set_config('kommo.suppress_outbox', 'on', true);

    -- The snapshot, resolved once (see kommo_snapshot in 15_kommo_snapshot.sql).
    DROP TABLE IF EXISTS pg_temp.kommo_snapshot;
    CREATE TEMP TABLE kommo_snapshot ON COMMIT DROP AS SELECT * FROM kommo_snapshot(p_run_id);
    CREATE UNIQUE INDEX ON kommo_snapshot (code);
    ANALYZE kommo_snapshot;

    -- Vehicles the bookings need and production lacks; names from the field's enum options.
    WITH ins AS (
        INSERT INTO vehicles (kommo_vehicle_id, name)
        SELECT DISTINCT ON (s.vehicle_enum_id) s.vehicle_enum_id, s.vehicle_name
          FROM kommo_snapshot s
         WHERE s.is_booking AND s.vehicle_enum_id IS NOT NULL
         ORDER BY s.vehicle_enum_id
        ON CONFLICT (kommo_vehicle_id) DO NOTHING
        RETURNING 1
    )
    SELECT count(*) INTO v_vehicles_created FROM ins;

    -- Clients: upsert on the Kommo contact id; never deleted.
    WITH up AS (
        INSERT INTO clients AS t (kommo_contact_id, name, phone, email)
        SELECT c.contact_id, c.name, c.phone, c.email
          FROM stg_kommo_contacts c
         WHERE c.run_id = p_run_id
        ON CONFLICT (kommo_contact_id) DO UPDATE
           SET name = EXCLUDED.name, phone = EXCLUDED.phone, email = EXCLUDED.email, updated_at = now()
         WHERE (t.name, t.phone, t.email) IS DISTINCT FROM (EXCLUDED.name, EXCLUDED.phone, EXCLUDED.email)
        RETURNING (xmax = 0) AS inserted
    )
    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
      INTO v_clients_added, v_clients_updated FROM up;

    -- Sales leads: every staged lead.
    WITH up AS (
        INSERT INTO sales_leads AS t (lead_code, client_id, name, stage_id, pipeline_id, value_amount, owner_id,
                                      expected_close_at, source, archived_at, kommo_created_at, kommo_updated_at)
        SELECT s.code, cl.id, s.name, s.status_id, s.pipeline_id, s.price, s.owner_id,
               s.closed_at, 'Kommo', NULL, s.created_at, s.updated_at
          FROM kommo_snapshot s
          LEFT JOIN clients cl ON cl.kommo_contact_id = s.contact_id
        ON CONFLICT (lead_code) DO UPDATE
           SET client_id = EXCLUDED.client_id, name = EXCLUDED.name, stage_id = EXCLUDED.stage_id,
               pipeline_id = EXCLUDED.pipeline_id, value_amount = EXCLUDED.value_amount,
               owner_id = EXCLUDED.owner_id, expected_close_at = EXCLUDED.expected_close_at,
               source = EXCLUDED.source, archived_at = NULL, kommo_created_at = EXCLUDED.kommo_created_at,
               kommo_updated_at = EXCLUDED.kommo_updated_at, updated_at = now()
         WHERE (t.client_id, t.name, t.stage_id, t.pipeline_id, t.value_amount, t.owner_id, t.expected_close_at,
                t.source, t.archived_at, t.kommo_created_at, t.kommo_updated_at)
               IS DISTINCT FROM
               (EXCLUDED.client_id, EXCLUDED.name, EXCLUDED.stage_id, EXCLUDED.pipeline_id, EXCLUDED.value_amount,
                EXCLUDED.owner_id, EXCLUDED.expected_close_at, EXCLUDED.source, NULL::timestamptz,
                EXCLUDED.kommo_created_at, EXCLUDED.kommo_updated_at)
        RETURNING (xmax = 0) AS inserted
    )
    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
      INTO v_leads_added, v_leads_updated FROM up;

    UPDATE sales_leads sl
       SET archived_at = now(), updated_at = now()
     WHERE sl.source = 'Kommo' AND sl.archived_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM kommo_snapshot s WHERE s.code = sl.lead_code);
    GET DIAGNOSTICS v_leads_archived = ROW_COUNT;

    -- Bookings: every staged lead outside the no-booking statuses.
    WITH up AS (
        INSERT INTO bookings AS t (client_id, sales_lead_id, channel, source, source_payload_id, status,
                                   kommo_status_id, owner_id, vehicle_id, start_at, end_at, is_active)
        SELECT cl.id, sl.id, 'Kommo', s.source, s.code, s.booking_status,
               s.status_id, s.owner_id, v.id, s.start_at, s.end_at, true
          FROM kommo_snapshot s
          JOIN sales_leads sl ON sl.lead_code = s.code
          LEFT JOIN clients cl ON cl.kommo_contact_id = s.contact_id
          LEFT JOIN vehicles v ON v.kommo_vehicle_id = s.vehicle_enum_id
         WHERE s.is_booking
        ON CONFLICT (source_payload_id) DO UPDATE
           SET client_id = EXCLUDED.client_id, sales_lead_id = EXCLUDED.sales_lead_id, channel = EXCLUDED.channel,
               source = EXCLUDED.source, status = EXCLUDED.status, kommo_status_id = EXCLUDED.kommo_status_id,
               owner_id = EXCLUDED.owner_id, vehicle_id = EXCLUDED.vehicle_id, start_at = EXCLUDED.start_at,
               end_at = EXCLUDED.end_at, is_active = true, updated_at = now()
         WHERE (t.client_id, t.sales_lead_id, t.channel, t.source, t.status, t.kommo_status_id, t.owner_id,
                t.vehicle_id, t.start_at, t.end_at, t.is_active)
               IS DISTINCT FROM
               (EXCLUDED.client_id, EXCLUDED.sales_lead_id, EXCLUDED.channel, EXCLUDED.source, EXCLUDED.status,
                EXCLUDED.kommo_status_id, EXCLUDED.owner_id, EXCLUDED.vehicle_id, EXCLUDED.start_at,
                EXCLUDED.end_at, true)
        RETURNING (xmax = 0) AS inserted
    )
    SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)
      INTO v_bookings_added, v_bookings_updated FROM up;

    UPDATE bookings b
       SET is_active = false, updated_at = now()
     WHERE b.channel = 'Kommo' AND b.is_active
       AND NOT EXISTS (SELECT 1 FROM kommo_snapshot s WHERE s.is_booking AND s.code = b.source_payload_id);
    GET DIAGNOSTICS v_bookings_deactivated = ROW_COUNT;

    -- The primary vehicle link of each snapshot booking follows its current vehicle. Links the app
    -- added by hand (not primary) are left alone.
    DELETE FROM booking_vehicles bv
     USING bookings b, kommo_snapshot s
     WHERE bv.booking_id = b.id AND b.source_payload_id = s.code AND s.is_booking
       AND bv."primary" AND bv.vehicle_id IS DISTINCT FROM b.vehicle_id;
    GET DIAGNOSTICS v_links_removed = ROW_COUNT;

    WITH ins AS (
        INSERT INTO booking_vehicles (booking_id, vehicle_id, "primary")
        SELECT b.id, b.vehicle_id, true
          FROM bookings b
          JOIN kommo_snapshot s ON s.code = b.source_payload_id AND s.is_booking
         WHERE b.vehicle_id IS NOT NULL
        ON CONFLICT (booking_id, vehicle_id) DO UPDATE SET "primary" = true
         WHERE NOT booking_vehicles."primary"
        RETURNING 1
    )
    SELECT count(*) INTO v_links_added FROM ins;

    v_counts := jsonb_build_object(
        'snapshot_leads', (SELECT count(*) FROM kommo_snapshot),
        'snapshot_bookings', (SELECT count(*) FROM kommo_snapshot WHERE is_booking),
        'vehicles_created', v_vehicles_created,
        'clients_added', v_clients_added,
        'clients_updated', v_clients_updated,
        'sales_leads_added', v_leads_added,
        'sales_leads_updated', v_leads_updated,
        'sales_leads_archived', v_leads_archived,
        'bookings_added', v_bookings_added,
        'bookings_updated', v_bookings_updated,
        'bookings_deactivated', v_bookings_deactivated,
        'booking_vehicles_removed', v_links_removed,
        'booking_vehicles_added', v_links_added,
        'swap_seconds', round(extract(epoch FROM clock_timestamp() - v_started)::numeric, 3)
    );

    UPDATE kommo_import_runs
       SET status = 'succeeded', finished_at = now(), swap_started_at = v_started,
           swap_counts = v_counts, error = NULL
     WHERE id = p_run_id;

    RETURN v_counts;
END;
$$;
