-- Staging retention: drops the staging rows (never the run record) of closed runs past their age.
-- Succeeded runs' staging is only needed for a while; failed and needs_review runs keep theirs longer
-- for inspection. Running imports are never touched.
CREATE OR REPLACE FUNCTION prune_kommo_staging(p_succeeded_after interval, p_failed_after interval)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_runs uuid[];
    v_leads bigint;
    v_contacts bigint;
BEGIN
    SELECT coalesce(array_agg(id), '{}') INTO v_runs
      FROM kommo_import_runs
     WHERE (status = 'succeeded' AND finished_at < now() - p_succeeded_after)
        OR (status IN ('failed', 'needs_review') AND finished_at < now() - p_failed_after);
    DELETE FROM stg_kommo_booking_vehicles WHERE run_id = ANY (v_runs);
    DELETE FROM stg_kommo_field_options WHERE run_id = ANY (v_runs);
    DELETE FROM stg_kommo_lead_removals WHERE run_id = ANY (v_runs);
    DELETE FROM stg_kommo_contacts WHERE run_id = ANY (v_runs);
    GET DIAGNOSTICS v_contacts = ROW_COUNT;
    DELETE FROM stg_kommo_leads WHERE run_id = ANY (v_runs);
    GET DIAGNOSTICS v_leads = ROW_COUNT;
    RETURN jsonb_build_object('runs', cardinality(v_runs), 'leads', v_leads, 'contacts', v_contacts);
END;
$$;

-- Run record retention: an increment a minute adds half a million records a year. Succeeded increments
-- that changed nothing in production go first (after p_noop_increments_after), then every closed run
-- (after p_closed_after), except what later runs read: the last succeeded full refresh of each window
-- (the drop guard's reference, the sync cursor's start) and the run the sync cursor names. Running
-- imports are never touched; a deleted run's staging goes with it (ON DELETE CASCADE).
CREATE OR REPLACE FUNCTION prune_kommo_import_runs(p_noop_increments_after interval, p_closed_after interval)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_noop bigint;
    v_closed bigint;
BEGIN
    DELETE FROM kommo_import_runs r
     WHERE r.kind = 'increment' AND r.status = 'succeeded' AND r.finished_at < now() - p_noop_increments_after
       AND NOT EXISTS (SELECT 1 FROM jsonb_each_text(coalesce(r.swap_counts, '{}')) c
                        WHERE c.key IN ('vehicles_created', 'clients_added', 'clients_updated', 'sales_leads_added',
                                        'sales_leads_updated', 'sales_leads_archived', 'bookings_added',
                                        'bookings_updated', 'bookings_deactivated', 'booking_vehicles_removed',
                                        'booking_vehicles_added')
                          AND c.value <> '0')
       AND r.id IS DISTINCT FROM (SELECT s.run_id FROM kommo_sync_state s);
    GET DIAGNOSTICS v_noop = ROW_COUNT;
    DELETE FROM kommo_import_runs r
     WHERE r.finished_at < now() - p_closed_after
       AND r.id IS DISTINCT FROM (SELECT s.run_id FROM kommo_sync_state s)
       AND r.id NOT IN (SELECT DISTINCT ON (k.created_from, k.created_to) k.id
                          FROM kommo_import_runs k
                         WHERE k.status = 'succeeded' AND k.kind = 'full_refresh'
                         ORDER BY k.created_from, k.created_to, k.finished_at DESC);
    GET DIAGNOSTICS v_closed = ROW_COUNT;
    RETURN jsonb_build_object('noop_increments', v_noop, 'closed_runs', v_closed);
END;
$$;
