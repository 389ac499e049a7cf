-- The production swap: one transaction, set-based, from a run's staging into the production tables.
-- kommo_apply_snapshot writes a run's resolved snapshot into production within a scope; the full refresh
-- (run_kommo_full_refresh, below) applies it to its window, an increment (run_kommo_increment,
-- 55_kommo_increment.sql) to the leads it staged. Both go through the same statements.
--
-- Decisions (see the README): history is kept, so rows present in the snapshot are upserted (and
-- re-activated) and Kommo rows missing from it are deactivated (bookings.is_active = false) or
-- archived (sales_leads.archived_at); ids stay stable and unchanged rows are not written at all.
-- A run replaces its own scope only: it archives and deactivates the import's own rows (codes
-- 'kommo:<id>') whose Kommo created_at is in the run's [created_from, created_to), as kommo_owned
-- (15_kommo_snapshot.sql) defines them, or, for an increment, whose code it staged
-- (kommo_increment_scope). Rows of other windows, and rows the app wrote (whatever their
-- source or channel), are never archived or deactivated. Upserts match on the codes the snapshot makes,
-- so they too only ever touch the import's own rows; clients are matched on kommo_contact_id.
-- The Zoho outbox triggers are suppressed for this transaction only. Any error rolls everything back.
--
-- How it stays fast (README, "Benchmark"): each table is written by one statement that joins the snapshot
-- with production once, then updates the rows that differ and inserts the rows that are missing. An
-- unchanged row is only read: not rewritten, and not even locked (INSERT ... ON CONFLICT DO UPDATE
-- would lock every conflicting row, i.e. write every page of the table, on a re-run that changes
-- nothing). New rows are plain inserts, which cost less than speculative ON CONFLICT inserts. A bulk load
-- checks its foreign keys once at the end rather than row by row (17_kommo_bulk_load.sql).
-- Concurrent writers are not expected on Kommo rows (codes 'kommo:<id>'); one that inserted such a
-- row meanwhile would fail this transaction on the unique key, leaving production unchanged.

-- Applies run p_run_id to production and returns the counts. First its staging is written into the
-- current-state mirror (kommo_mirror_write: a window replaced, or an increment's leads upserted and
-- removed), then production is derived from the mirror (kommo_snapshot) for the run's leads (its window,
-- or the leads an increment staged) and for every lead whose rules changed since production was last
-- derived (kommo_take_rules_changes: a mapping edit, a source option renamed in Kommo), wherever it was
-- created. The scope the removals may touch: the import's own rows of [p_from, p_to) (kommo_owned), and
-- when p_codes is given only those among them whose code is in p_codes ('-infinity' to 'infinity' and the
-- codes: an increment). Upserts only ever touch the snapshot's codes. The caller holds the swap's lock
-- (kommo_lock_key('swap')), has checked the run and turned the Zoho outbox off; it owns the transaction.
-- The scope is written "p_codes IS NULL OR code = ANY (p_codes)": planned with the actual values
-- (plan_cache_mode below), a window folds it away and keeps the partial indexes of kommo_owned, and an
-- increment's codes become index lookups on the code.
CREATE OR REPLACE FUNCTION kommo_apply_snapshot(p_run_id uuid, p_from timestamptz, p_to timestamptz,
                                                p_codes text[]) RETURNS jsonb
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    v_started timestamptz := clock_timestamp();
    v_snapshot_leads bigint;
    v_snapshot_bookings bigint;
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
    v_new_leads bigint;
    v_keys_restore text[];
    v_keys_refused text;
    v_key_checks text := 'per row';
    v_stats_target text := current_setting('default_statistics_target');
    v_window boolean := p_codes IS NULL;
    v_mirror jsonb;
    v_rederive bigint[];
    v_leads bigint[];
BEGIN
    IF NOT kommo_holds_lock('swap') THEN
        RAISE EXCEPTION 'kommo_apply_snapshot runs only inside run_kommo_full_refresh or run_kommo_increment';
    END IF;

    -- The mirror first (18_kommo_mirror.sql), then what production is derived for from it.
    v_mirror := kommo_mirror_write(p_run_id, CASE WHEN v_window THEN p_from END, CASE WHEN v_window THEN p_to END);
    v_rederive := kommo_take_rules_changes(CASE WHEN v_window THEN p_from END, CASE WHEN v_window THEN p_to END);
    IF v_window THEN
        v_leads := v_rederive;
    ELSE
        SELECT coalesce(array_agg(x.lead_id), '{}') INTO v_leads
          FROM (SELECT s.lead_id FROM stg_kommo_leads s WHERE s.run_id = p_run_id
                UNION
                SELECT unnest(v_rederive)) x;
    END IF;

    -- The snapshot, resolved once from the mirror (see kommo_snapshot in 15_kommo_snapshot.sql).
    DROP TABLE IF EXISTS pg_temp.kommo_snapshot;
    -- The index matters even where a hash join is expected: right after this transaction's own bulk
    -- inserts, production tables have no statistics yet, the planner may take 100,000 fresh rows for
    -- one, and a nested loop must then probe this index instead of scanning the whole snapshot per row.
    CREATE TEMP TABLE kommo_snapshot ON COMMIT DROP AS
    SELECT * FROM kommo_snapshot(NULL, CASE WHEN v_window THEN p_from END, CASE WHEN v_window THEN p_to END, v_leads);
    CREATE UNIQUE INDEX ON kommo_snapshot (code);
    -- Plans only need row counts and key distributions: a small sample is enough.
    PERFORM set_config('default_statistics_target', '10', true);
    ANALYZE kommo_snapshot;
    PERFORM set_config('default_statistics_target', v_stats_target, true);
    SELECT count(*), count(*) FILTER (WHERE is_booking) INTO v_snapshot_leads, v_snapshot_bookings
      FROM kommo_snapshot;

    -- A bulk load (many new leads, and many against the table) checks its foreign keys in one pass at
    -- the end instead of row by row (17_kommo_bulk_load.sql). Decided before the first write, so the
    -- locks it needs are taken before the swap writes anything. Only a window is ever a bulk load: an
    -- increment is small, and its ACCESS EXCLUSIVE locks would hold the app up every few minutes.
    SELECT count(*) INTO v_new_leads
      FROM kommo_snapshot s
     WHERE NOT EXISTS (SELECT 1 FROM sales_leads t WHERE t.lead_code = s.code);
    IF p_codes IS NULL AND kommo_is_bulk_load(v_new_leads) THEN
        SELECT k.restore, k.refused INTO v_keys_restore, v_keys_refused FROM kommo_suspend_foreign_keys() k;
        v_key_checks := CASE WHEN v_keys_restore IS NULL THEN 'per row: ' || v_keys_refused
                             WHEN v_keys_restore = '{}' THEN 'none to check'
                             ELSE 'bulk' END;
    END IF;

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

    -- Clients: matched on the Kommo contact id, updated where name, phone or email differ, added when
    -- missing and the main contact of a snapshot lead; never deleted. A field Kommo has empty keeps the
    -- client's value (kommo_snapshot_clients).
    WITH src AS MATERIALIZED (
        SELECT * FROM kommo_snapshot_clients(p_run_id)
    ), upd AS (
        UPDATE clients t
           SET name = src.name, phone = src.phone, email = src.email, updated_at = now()
          FROM src
         WHERE t.id = src.client_id AND src.differs
        RETURNING 1
    ), ins AS (
        INSERT INTO clients (kommo_contact_id, name, phone, email)
        SELECT src.contact_id, src.name, src.phone, src.email FROM src WHERE src.client_id IS NULL AND src.linked
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM upd) INTO v_clients_added, v_clients_updated;

    -- Sales leads: every staged lead, matched on lead_code (re-activated if archived). created_at is the
    -- lead's Kommo created_at (as kommo_created_at, which the window predicate reads), on insert and update.
    WITH src AS MATERIALIZED (
        SELECT s.code, cl.id AS client_id, s.name, s.status_id, s.pipeline_id, s.price::numeric(14, 2) AS price,
               s.owner_id, s.closed_at, s.created_at, s.updated_at, t.id AS lead_pk,
               (t.client_id, t.name, t.stage_id, t.pipeline_id, t.value_amount, t.owner_id, t.expected_close_at,
                t.source, t.archived_at, t.created_at, t.kommo_created_at, t.kommo_updated_at)
               IS DISTINCT FROM
               (cl.id, s.name, s.status_id, s.pipeline_id, s.price::numeric(14, 2), s.owner_id, s.closed_at,
                'Kommo'::text, NULL::timestamptz, s.created_at, s.created_at, s.updated_at) AS differs
          FROM kommo_snapshot s
          LEFT JOIN clients cl ON cl.kommo_contact_id = s.contact_id
          LEFT JOIN sales_leads t ON t.lead_code = s.code
    ), upd AS (
        UPDATE sales_leads t
           SET client_id = src.client_id, name = src.name, stage_id = src.status_id,
               pipeline_id = src.pipeline_id, value_amount = src.price, owner_id = src.owner_id,
               expected_close_at = src.closed_at, source = 'Kommo', archived_at = NULL,
               created_at = src.created_at, kommo_created_at = src.created_at, kommo_updated_at = src.updated_at,
               updated_at = now()
          FROM src
         WHERE t.id = src.lead_pk AND src.differs
        RETURNING 1
    ), ins AS (
        INSERT INTO sales_leads (lead_code, client_id, name, stage_id, pipeline_id, value_amount, owner_id,
                                 expected_close_at, source, archived_at, created_at, kommo_created_at,
                                 kommo_updated_at)
        SELECT src.code, src.client_id, src.name, src.status_id, src.pipeline_id, src.price, src.owner_id,
               src.closed_at, 'Kommo', NULL, src.created_at, src.created_at, src.updated_at
          FROM src
         WHERE src.lead_pk IS NULL
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM upd) INTO v_leads_added, v_leads_updated;

    -- The import's own live leads in scope that left the snapshot.
    UPDATE sales_leads sl
       SET archived_at = now(), updated_at = now()
     -- (kommo_owned, written out: a function with a pinned search_path is never inlined)
     WHERE sl.lead_code LIKE 'kommo:%' AND sl.kommo_created_at >= p_from AND sl.kommo_created_at < p_to
       AND (p_codes IS NULL OR sl.lead_code = ANY (p_codes))
       AND sl.archived_at IS NULL
       AND NOT EXISTS (SELECT 1 FROM kommo_snapshot s WHERE s.code = sl.lead_code);
    GET DIAGNOSTICS v_leads_archived = ROW_COUNT;

    -- Bookings: every staged lead outside the no-booking statuses, matched on source_payload_id.
    WITH src AS MATERIALIZED (
        SELECT s.code, cl.id AS client_id, sl.id AS sales_lead_id, s.source, s.booking_status, s.status_id,
               s.owner_id, v.id AS vehicle_id, s.start_at, s.end_at, s.created_at, t.id AS booking_pk,
               (t.client_id, t.sales_lead_id, t.channel, t.source, t.status, t.kommo_status_id, t.owner_id,
                t.vehicle_id, t.start_at, t.end_at, t.is_active, t.kommo_created_at)
               IS DISTINCT FROM
               (cl.id, sl.id, 'Kommo'::text, s.source, s.booking_status, s.status_id, s.owner_id, v.id,
                s.start_at, s.end_at, true, s.created_at) AS differs
          FROM kommo_snapshot s
          JOIN sales_leads sl ON sl.lead_code = s.code
          LEFT JOIN clients cl ON cl.kommo_contact_id = s.contact_id
          LEFT JOIN vehicles v ON v.kommo_vehicle_id = s.vehicle_enum_id
          LEFT JOIN bookings t ON t.source_payload_id = s.code
         WHERE s.is_booking
    ), upd AS (
        UPDATE bookings t
           SET client_id = src.client_id, sales_lead_id = src.sales_lead_id, channel = 'Kommo',
               source = src.source, status = src.booking_status, kommo_status_id = src.status_id,
               owner_id = src.owner_id, vehicle_id = src.vehicle_id, start_at = src.start_at,
               end_at = src.end_at, is_active = true, kommo_created_at = src.created_at, updated_at = now()
          FROM src
         WHERE t.id = src.booking_pk AND src.differs
        RETURNING 1
    ), ins AS (
        INSERT INTO bookings (client_id, sales_lead_id, channel, source, source_payload_id, status,
                              kommo_status_id, owner_id, vehicle_id, start_at, end_at, is_active, kommo_created_at)
        SELECT src.client_id, src.sales_lead_id, 'Kommo', src.source, src.code, src.booking_status,
               src.status_id, src.owner_id, src.vehicle_id, src.start_at, src.end_at, true, src.created_at
          FROM src
         WHERE src.booking_pk IS NULL
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM upd) INTO v_bookings_added, v_bookings_updated;

    -- The import's own active bookings in scope whose lead left the snapshot or its booking statuses.
    UPDATE bookings b
       SET is_active = false, updated_at = now()
     -- (kommo_owned, written out)
     WHERE b.source_payload_id LIKE 'kommo:%' AND b.kommo_created_at >= p_from AND b.kommo_created_at < p_to
       AND (p_codes IS NULL OR b.source_payload_id = ANY (p_codes))
       AND b.is_active
       AND NOT EXISTS (SELECT 1 FROM kommo_snapshot s WHERE s.is_booking AND s.code = b.source_payload_id);
    GET DIAGNOSTICS v_bookings_deactivated = ROW_COUNT;

    -- The primary vehicle link of each snapshot booking follows its current vehicle: a primary link to
    -- another vehicle goes, a link to the vehicle becomes primary or is added. Links the app added by
    -- hand (not primary) are left alone.
    WITH b AS MATERIALIZED (
        SELECT b.id, b.vehicle_id
          FROM bookings b
          JOIN kommo_snapshot s ON s.code = b.source_payload_id AND s.is_booking
    ), del AS (
        DELETE FROM booking_vehicles bv
         USING b
         WHERE bv.booking_id = b.id AND bv."primary" AND bv.vehicle_id IS DISTINCT FROM b.vehicle_id
        RETURNING 1
    ), promoted AS (
        UPDATE booking_vehicles bv
           SET "primary" = true
          FROM b
         WHERE bv.booking_id = b.id AND bv.vehicle_id = b.vehicle_id AND NOT bv."primary"
        RETURNING 1
    ), ins AS (
        INSERT INTO booking_vehicles (booking_id, vehicle_id, "primary")
        SELECT b.id, b.vehicle_id, true
          FROM b
         WHERE b.vehicle_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM booking_vehicles bv WHERE bv.booking_id = b.id AND bv.vehicle_id = b.vehicle_id)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM del), (SELECT count(*) FROM promoted) + (SELECT count(*) FROM ins)
      INTO v_links_removed, v_links_added;

    IF v_keys_restore IS NOT NULL THEN
        PERFORM kommo_restore_foreign_keys(v_keys_restore);
    END IF;

    RETURN jsonb_build_object(
        'snapshot_leads', v_snapshot_leads,
        'snapshot_bookings', v_snapshot_bookings,
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
        'new_leads', v_new_leads,
        'rederived_leads', cardinality(v_rederive),
        'mirror', v_mirror,
        'foreign_key_checks', v_key_checks,
        'swap_seconds', round(extract(epoch FROM clock_timestamp() - v_started)::numeric, 3)
    );

END;
$$;

CREATE OR REPLACE FUNCTION run_kommo_full_refresh(p_run_id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs;
    v_started timestamptz := clock_timestamp();
    v_counts jsonb;
BEGIN
    -- One swap at a time, across processes and hosts; released at commit or rollback.
    PERFORM pg_advisory_xact_lock(kommo_lock_key('swap'));

    v_run := lock_running_kommo_import_run(p_run_id);
    IF v_run.kind = 'dry_run' THEN
        RAISE EXCEPTION 'Kommo import run % is a dry run and never swaps', p_run_id;
    ELSIF v_run.kind <> 'full_refresh' THEN
        RAISE EXCEPTION 'Kommo import run % is an increment: run_kommo_increment applies it', p_run_id;
    END IF;
    IF v_run.staged_at IS NULL THEN
        RAISE EXCEPTION 'Kommo import run % has not finished staging', p_run_id;
    END IF;
    IF v_run.guard_passed_at IS NULL THEN
        RAISE EXCEPTION 'Kommo import run % has not passed the drop guard', p_run_id;
    END IF;

    PERFORM set_config('kommo.suppress_outbox', 'on', true);
    v_counts := kommo_apply_snapshot(p_run_id, v_run.created_from, v_run.created_to, NULL);
    -- Every change Kommo stamped before the run's first answer, to a lead of the window, is now in
    -- production: the window is covered from there (a refresh that predates Kommo's clock proves nothing).
    PERFORM kommo_cover_windows(ARRAY[v_run.created_from], ARRAY[v_run.created_to], v_run.kommo_clock_at,
                                p_run_id);

    UPDATE kommo_import_runs
       SET status = 'succeeded', finished_at = clock_timestamp(), swap_started_at = v_started,
           swap_counts = v_counts, error = NULL
     WHERE id = p_run_id;

    RETURN v_counts;
END;
$$;
