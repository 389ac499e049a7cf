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
