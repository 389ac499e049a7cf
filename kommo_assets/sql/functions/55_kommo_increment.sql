-- The incremental sync: the cursor, and an increment applied in one transaction.
--
-- An increment stages the leads Kommo changed since the cursor (whatever their status), the contacts it
-- changed, the new main contacts of those leads, and the leads it deleted (stg_kommo_lead_removals). It
-- is applied by the full swap's own statements (kommo_apply_snapshot), its scope being the leads it
-- staged or removes instead of a window (kommo_increment_scope), under the swap's lock: never beside a
-- full refresh's swap, and start_kommo_import_run never lets two imports of any kind run at once.

-- Where an increment reads from: kommo_sync_cursor(windows) in 16_kommo_windows.sql. The cursor of one
-- global row it replaced is dropped.
DROP FUNCTION IF EXISTS kommo_sync_cursor();

-- Applies the staged increment p_run_id in the caller's transaction (one transaction: the changes, the
-- cursor and the run's record commit together, or none of them does) and returns the counts of
-- kommo_apply_snapshot plus "status". p_cursor is Kommo's clock up to which the run read every change
-- of the leads created in the windows (p_froms[i], p_tos[i]); each window's coverage moves to it, never
-- back. The guard: when the increment would deactivate more than
-- p_max_deactivations bookings, nothing is applied, the cursor stays, and the run is closed as
-- needs_review with its change preview, so the same changes are read again by the next sync.
DROP FUNCTION IF EXISTS run_kommo_increment(uuid, timestamptz, integer);
CREATE OR REPLACE FUNCTION run_kommo_increment(p_run_id uuid, p_cursor timestamptz, p_max_deactivations integer,
                                               p_froms timestamptz[], p_tos timestamptz[])
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs;
    v_started timestamptz := clock_timestamp();
    v_from timestamptz;
    v_preview jsonb;
    v_deactivate bigint;
    v_reason text;
    v_counts jsonb;
BEGIN
    -- The swap's lock: one swap at a time, full or incremental; released at commit or rollback.
    PERFORM pg_advisory_xact_lock(kommo_lock_key('swap'));

    v_run := lock_running_kommo_import_run(p_run_id);
    IF v_run.kind <> 'increment' THEN
        RAISE EXCEPTION 'Kommo import run % is a %, not an increment', p_run_id, replace(v_run.kind, '_', ' ');
    END IF;
    IF v_run.staged_at IS NULL THEN
        RAISE EXCEPTION 'Kommo import run % has not finished staging', p_run_id;
    END IF;
    IF p_cursor IS NULL OR p_max_deactivations IS NULL OR p_max_deactivations < 0 THEN
        RAISE EXCEPTION 'run_kommo_increment needs a cursor and a max_deactivations of 0 or more (got %, %)',
            p_cursor, p_max_deactivations;
    END IF;
    IF coalesce(cardinality(p_froms), 0) = 0 OR cardinality(p_froms) <> cardinality(p_tos) THEN
        RAISE EXCEPTION 'run_kommo_increment needs the windows it covers (got % starts and % ends)',
            coalesce(cardinality(p_froms), 0), coalesce(cardinality(p_tos), 0);
    END IF;
    v_from := kommo_sync_cursor(p_froms, p_tos);
    UPDATE kommo_import_runs
       SET leads_count = (SELECT count(*) FROM stg_kommo_leads WHERE run_id = p_run_id),
           contacts_count = (SELECT count(*) FROM stg_kommo_contacts WHERE run_id = p_run_id),
           vehicles_count = (SELECT count(*) FROM stg_kommo_booking_vehicles WHERE run_id = p_run_id)
     WHERE id = p_run_id;

    v_preview := kommo_increment_preview(p_run_id);
    v_deactivate := (v_preview -> 'bookings' ->> 'deactivate')::bigint;
    IF v_deactivate > p_max_deactivations THEN
        v_reason := format(
            'the increment would deactivate %s bookings, more than KOMMO_SYNC_MAX_DEACTIVATIONS (%s); production '
            'and the sync cursor left unchanged. If the change is real, re-run the sync with a higher '
            'KOMMO_SYNC_MAX_DEACTIVATIONS, or run a full refresh.', v_deactivate, p_max_deactivations);
        UPDATE kommo_import_runs
           SET status = 'needs_review', finished_at = now(), heartbeat_at = now(), error = v_reason,
               change_preview = v_preview, sync_from = coalesce(sync_from, v_from),
               sync_to = coalesce(sync_to, p_cursor)
         WHERE id = p_run_id;
        RETURN jsonb_build_object(
            'status', 'needs_review', 'reason', v_reason, 'max_deactivations', p_max_deactivations,
            'bookings_added', v_preview -> 'bookings' -> 'add', 'bookings_updated', v_preview -> 'bookings' -> 'update',
            'bookings_deactivated', v_deactivate,
            'sales_leads_added', v_preview -> 'sales_leads' -> 'add',
            'sales_leads_updated', v_preview -> 'sales_leads' -> 'update',
            'sales_leads_archived', v_preview -> 'sales_leads' -> 'archive',
            'clients_added', v_preview -> 'clients' -> 'add', 'clients_updated', v_preview -> 'clients' -> 'update',
            'vehicles_created', v_preview -> 'vehicles' -> 'create');
    END IF;

    PERFORM set_config('kommo.suppress_outbox', 'on', true);
    v_counts := kommo_apply_snapshot(p_run_id, '-infinity', 'infinity', kommo_increment_scope(p_run_id))
                || jsonb_build_object('status', 'succeeded');

    PERFORM kommo_cover_windows(p_froms, p_tos, p_cursor, p_run_id);
    INSERT INTO kommo_sync_state AS s (run_id, updated_at)
    VALUES (p_run_id, now())
    ON CONFLICT (singleton) DO UPDATE SET run_id = EXCLUDED.run_id, updated_at = EXCLUDED.updated_at;

    UPDATE kommo_import_runs
       SET status = 'succeeded', finished_at = clock_timestamp(), heartbeat_at = now(), swap_started_at = v_started,
           swap_counts = v_counts, change_preview = v_preview, error = NULL,
           sync_from = coalesce(sync_from, v_from), sync_to = coalesce(sync_to, p_cursor)
     WHERE id = p_run_id;

    RETURN v_counts;
END;
$$;
