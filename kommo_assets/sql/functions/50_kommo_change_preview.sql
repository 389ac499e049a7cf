-- The change preview: what run_kommo_full_refresh(p_run_id) would do to production right now, from the
-- same resolved snapshot (kommo_snapshot) and the same "is anything different" rules as the swap.
-- Counts match the swap's counters one for one; samples show up to p_sample rows of each kind. Like the
-- swap it archives and deactivates only the import's own rows in scope, and resolves clients with
-- kommo_snapshot_clients. kommo_snapshot_preview computes it for a scope, as kommo_apply_snapshot
-- (20_run_kommo_full_refresh.sql) applies it: a window (kommo_change_preview, a full refresh or dry run)
-- or an increment's codes (kommo_increment_preview, what run_kommo_increment would do). With no run
-- (p_run_id NULL) the snapshot is the current-state mirror's window instead of a run's staging: the
-- local drift check (kommo_mirror_drift, 18_kommo_mirror.sql), which has no staging warnings.
--
-- It runs between the last Kommo answer and the swap, so it reads each table once where it can: the
-- snapshot is resolved into a narrow temporary table, every booking of it is compared with production
-- in one join (keeping only which fields change), and the before/after detail is built for the sampled
-- rows only. The scope is planned with its actual values, as in kommo_apply_snapshot.
CREATE OR REPLACE FUNCTION kommo_snapshot_preview(p_run_id uuid, p_from timestamptz, p_to timestamptz,
                                                  p_codes text[], p_sample integer) RETURNS jsonb
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_bookings jsonb;
    v_leads jsonb;
    v_clients jsonb;
    v_clients_add bigint[];
    v_clients_update bigint[];
    v_vehicles jsonb;
    v_samples jsonb;
    v_warnings jsonb;
    v_stats_target text := current_setting('default_statistics_target');
BEGIN
    DROP TABLE IF EXISTS pg_temp.kommo_preview_snapshot;
    CREATE TEMP TABLE kommo_preview_snapshot ON COMMIT DROP AS
    SELECT s.*,
           -- the contact the swap will link to: one that is staged now or already a client
           CASE WHEN sc.contact_id IS NOT NULL OR nc.id IS NOT NULL THEN s.contact_id END AS linked_contact_id
      FROM kommo_snapshot(p_run_id, p_from, p_to) s
      -- the contacts Kommo holds: the run's staged ones, or the mirror's
      LEFT JOIN (SELECT c.contact_id FROM stg_kommo_contacts c WHERE p_run_id IS NOT NULL AND c.run_id = p_run_id
                 UNION ALL
                 SELECT c.contact_id FROM kommo_contacts c WHERE p_run_id IS NULL) sc ON sc.contact_id = s.contact_id
      LEFT JOIN clients nc ON nc.kommo_contact_id = s.contact_id;
    -- Every anti-join against the snapshot can probe this index, whatever the planner estimates.
    CREATE UNIQUE INDEX ON kommo_preview_snapshot (code);
    -- Plans only need row counts and key distributions: a small sample is enough.
    PERFORM set_config('default_statistics_target', '10', true);
    ANALYZE kommo_preview_snapshot;

    -- Every booking of the snapshot beside its production row (if any): which fields change.
    DROP TABLE IF EXISTS pg_temp.kommo_preview_bookings;
    CREATE TEMP TABLE kommo_preview_bookings ON COMMIT DROP AS
    SELECT s.code,
           b.id AS booking_id,
           b.id IS NULL AS is_new,
           array_remove(ARRAY[
               CASE WHEN NOT b.is_active THEN 'reactivated' END,
               CASE WHEN (b.status, b.kommo_status_id) IS DISTINCT FROM (s.booking_status, s.status_id)
                    THEN 'status' END,
               CASE WHEN (b.start_at, b.end_at) IS DISTINCT FROM (s.start_at, s.end_at) THEN 'dates' END,
               CASE WHEN ov.kommo_vehicle_id IS DISTINCT FROM s.vehicle_enum_id THEN 'vehicle' END,
               CASE WHEN oc.kommo_contact_id IS DISTINCT FROM s.linked_contact_id THEN 'client' END,
               CASE WHEN b.owner_id IS DISTINCT FROM s.owner_id THEN 'owner' END,
               CASE WHEN b.source IS DISTINCT FROM s.source THEN 'source' END,
               CASE WHEN b.channel IS DISTINCT FROM 'Kommo' THEN 'channel' END,
               CASE WHEN b.kommo_created_at IS DISTINCT FROM s.created_at THEN 'created_at' END
           ], NULL) AS changes
      FROM kommo_preview_snapshot s
      LEFT JOIN bookings b ON b.source_payload_id = s.code
      LEFT JOIN vehicles ov ON ov.id = b.vehicle_id
      LEFT JOIN clients oc ON oc.id = b.client_id
     WHERE s.is_booking;
    ANALYZE kommo_preview_bookings;
    PERFORM set_config('default_statistics_target', v_stats_target, true);

    DROP TABLE IF EXISTS pg_temp.kommo_preview_deactivate;
    CREATE TEMP TABLE kommo_preview_deactivate ON COMMIT DROP AS
    SELECT b.source_payload_id AS code, b.status, b.start_at, b.end_at
      FROM bookings b
     -- (kommo_owned, written out: a function with a pinned search_path is never inlined)
     WHERE b.source_payload_id LIKE 'kommo:%' AND b.kommo_created_at >= p_from AND b.kommo_created_at < p_to
       AND (p_codes IS NULL OR b.source_payload_id = ANY (p_codes))
       AND b.is_active
       AND NOT EXISTS (SELECT 1 FROM kommo_preview_snapshot s WHERE s.is_booking AND s.code = b.source_payload_id);

    SELECT jsonb_build_object(
               'add', count(*) FILTER (WHERE is_new),
               'update', count(*) FILTER (WHERE NOT is_new AND cardinality(changes) > 0),
               'unchanged', count(*) FILTER (WHERE NOT is_new AND cardinality(changes) = 0),
               'deactivate', (SELECT count(*) FROM kommo_preview_deactivate),
               'field_changes', (SELECT coalesce(jsonb_object_agg(field, n), '{}'::jsonb)
                                   FROM (SELECT field, count(*) AS n
                                           FROM kommo_preview_bookings, unnest(changes) AS field
                                          WHERE NOT is_new GROUP BY field) f))
      INTO v_bookings
      FROM kommo_preview_bookings;

    SELECT jsonb_build_object(
               'add', count(*) FILTER (WHERE sl.id IS NULL),
               'update', count(*) FILTER (
                   WHERE sl.id IS NOT NULL
                     AND (oc.kommo_contact_id, sl.name, sl.stage_id, sl.pipeline_id, sl.value_amount, sl.owner_id,
                          sl.expected_close_at, sl.source, sl.archived_at, sl.created_at, sl.kommo_created_at,
                          sl.kommo_updated_at)
                         IS DISTINCT FROM
                         (s.linked_contact_id, s.name, s.status_id, s.pipeline_id, s.price::numeric(14, 2), s.owner_id,
                          s.closed_at, 'Kommo'::text, NULL::timestamptz, s.created_at, s.created_at, s.updated_at)),
               'archive', (SELECT count(*) FROM sales_leads x
                            WHERE x.lead_code LIKE 'kommo:%' AND x.kommo_created_at >= p_from  -- kommo_owned
                              AND x.kommo_created_at < p_to
                              AND (p_codes IS NULL OR x.lead_code = ANY (p_codes))
                              AND x.archived_at IS NULL
                              AND NOT EXISTS (SELECT 1 FROM kommo_preview_snapshot s2 WHERE s2.code = x.lead_code)))
      INTO v_leads
      FROM kommo_preview_snapshot s
      LEFT JOIN sales_leads sl ON sl.lead_code = s.code
      LEFT JOIN clients oc ON oc.id = sl.client_id;

    -- Staged contacts beside their clients: counts, and the ids of the first few of each kind, in one
    -- pass over the run's contacts (the samples' details are then looked up for those ids only).
    SELECT jsonb_build_object('add', count(*) FILTER (WHERE c.client_id IS NULL AND c.linked),
                              'update', count(*) FILTER (WHERE c.differs)),
           (array_agg(c.contact_id ORDER BY c.contact_id) FILTER (WHERE c.client_id IS NULL AND c.linked))[1:p_sample],
           (array_agg(c.contact_id ORDER BY c.contact_id) FILTER (WHERE c.differs))[1:p_sample]
      INTO v_clients, v_clients_add, v_clients_update
      FROM kommo_snapshot_clients(p_run_id, p_from, p_to) c;

    SELECT jsonb_build_object('create', count(DISTINCT s.vehicle_enum_id))
      INTO v_vehicles
      FROM kommo_preview_snapshot s
     WHERE s.is_booking AND s.vehicle_enum_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM vehicles v WHERE v.kommo_vehicle_id = s.vehicle_enum_id);

    -- The counts of the non-blocking checks (kommo_assets/sql/functions/55_kommo_staging_warnings.sql), stored with
    -- the preview for the checks to read.
    IF p_run_id IS NOT NULL THEN
        v_warnings := kommo_staging_warnings(p_run_id, (v_vehicles ->> 'create')::int);
    END IF;

    v_samples := jsonb_build_object(
        'bookings_add', (SELECT coalesce(jsonb_agg(x), '[]') FROM (
            SELECT p.code,
                   jsonb_build_object('status', s.booking_status, 'kommo_status_id', s.status_id,
                                      'start_at', s.start_at, 'end_at', s.end_at, 'vehicle', s.vehicle_enum_id,
                                      'client', s.linked_contact_id, 'owner_id', s.owner_id, 'source', s.source,
                                      'is_active', true) AS after
              FROM (SELECT code FROM kommo_preview_bookings WHERE is_new ORDER BY code LIMIT p_sample) p
              JOIN kommo_preview_snapshot s ON s.code = p.code
             ORDER BY p.code) x),
        'bookings_update', (SELECT coalesce(jsonb_agg(x), '[]') FROM (
            SELECT p.code, p.changes,
                   jsonb_build_object('status', b.status, 'kommo_status_id', b.kommo_status_id,
                                      'start_at', b.start_at, 'end_at', b.end_at, 'vehicle', ov.kommo_vehicle_id,
                                      'client', oc.kommo_contact_id, 'owner_id', b.owner_id, 'source', b.source,
                                      'is_active', b.is_active) AS before,
                   jsonb_build_object('status', s.booking_status, 'kommo_status_id', s.status_id,
                                      'start_at', s.start_at, 'end_at', s.end_at, 'vehicle', s.vehicle_enum_id,
                                      'client', s.linked_contact_id, 'owner_id', s.owner_id, 'source', s.source,
                                      'is_active', true) AS after
              FROM (SELECT code, booking_id, changes FROM kommo_preview_bookings
                     WHERE NOT is_new AND cardinality(changes) > 0 ORDER BY code LIMIT p_sample) p
              JOIN kommo_preview_snapshot s ON s.code = p.code
              JOIN bookings b ON b.id = p.booking_id
              LEFT JOIN vehicles ov ON ov.id = b.vehicle_id
              LEFT JOIN clients oc ON oc.id = b.client_id
             ORDER BY p.code) x),
        'bookings_deactivate', (SELECT coalesce(jsonb_agg(x), '[]') FROM (
            SELECT code, status, start_at, end_at FROM kommo_preview_deactivate ORDER BY code LIMIT p_sample) x),
        'clients_add', (SELECT coalesce(jsonb_agg(x), '[]') FROM (
            SELECT c.contact_id, c.name
              FROM (SELECT x.contact_id, x.name FROM stg_kommo_contacts x
                     WHERE p_run_id IS NOT NULL AND x.run_id = p_run_id AND x.contact_id = ANY (v_clients_add)
                    UNION ALL
                    SELECT x.contact_id, x.name FROM kommo_contacts x
                     WHERE p_run_id IS NULL AND x.contact_id = ANY (v_clients_add)) c
             ORDER BY c.contact_id) x),
        'clients_update', (SELECT coalesce(jsonb_agg(x), '[]') FROM (
            SELECT c.contact_id,
                   jsonb_build_object('name', cl.name, 'phone', cl.phone, 'email', cl.email) AS before,
                   jsonb_build_object('name', c.name, 'phone', c.phone, 'email', c.email) AS after
              FROM kommo_snapshot_clients(p_run_id, p_from, p_to) c JOIN clients cl ON cl.id = c.client_id
             WHERE c.contact_id = ANY (v_clients_update)
             ORDER BY c.contact_id) x),
        'vehicles_create', (SELECT coalesce(jsonb_agg(x), '[]') FROM (
            SELECT DISTINCT s.vehicle_enum_id AS kommo_vehicle_id, s.vehicle_name AS name
              FROM kommo_preview_snapshot s
             WHERE s.is_booking AND s.vehicle_enum_id IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM vehicles v WHERE v.kommo_vehicle_id = s.vehicle_enum_id)
             ORDER BY 1 LIMIT p_sample) x)
    );

    DROP TABLE kommo_preview_snapshot, kommo_preview_bookings, kommo_preview_deactivate;
    RETURN jsonb_build_object('bookings', v_bookings, 'sales_leads', v_leads, 'clients', v_clients,
                              'vehicles', v_vehicles, 'warnings', v_warnings, 'samples', v_samples);
END;
$$;

-- What the full refresh or dry run p_run_id would change in its window.
CREATE OR REPLACE FUNCTION kommo_change_preview(p_run_id uuid, p_sample integer DEFAULT 10) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs := kommo_import_run(p_run_id);
BEGIN
    IF v_run.kind = 'increment' THEN
        RAISE EXCEPTION 'Kommo import run % is an increment: kommo_increment_preview previews it', p_run_id;
    END IF;
    RETURN kommo_snapshot_preview(p_run_id, v_run.created_from, v_run.created_to, NULL, p_sample);
END;
$$;

-- What the increment p_run_id would change: its snapshot upserted, and the import's own rows of the leads
-- it staged or removes (kommo_increment_scope) archived or deactivated where the snapshot lacks them.
CREATE OR REPLACE FUNCTION kommo_increment_preview(p_run_id uuid, p_sample integer DEFAULT 10) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs := kommo_import_run(p_run_id);
BEGIN
    IF v_run.kind <> 'increment' THEN
        RAISE EXCEPTION 'Kommo import run % is a %, not an increment: kommo_change_preview previews it',
            p_run_id, replace(v_run.kind, '_', ' ');
    END IF;
    RETURN kommo_snapshot_preview(p_run_id, '-infinity', 'infinity', kommo_increment_scope(p_run_id), p_sample);
END;
$$;
