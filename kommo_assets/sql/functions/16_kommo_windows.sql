-- Windows: how far Kommo has been read for each (kommo_window_coverage, kommo_assets/sql/migrations/0012_window_coverage.sql)
-- and what production holds of each. A window is a half-open range [created_from, created_to) of Kommo
-- lead creation times; the windows of a call come as two arrays of the same length.

-- Where an increment covering the given windows reads from, on Kommo's clock: the oldest coverage among
-- them, a window never read counting from its first second (no lead created in it can have been changed
-- before). NULL only without windows.
CREATE OR REPLACE FUNCTION kommo_sync_cursor(p_froms timestamptz[], p_tos timestamptz[]) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT min(greatest(c.covered_to, w.created_from))
      FROM unnest(p_froms, p_tos) AS w(created_from, created_to)
      LEFT JOIN kommo_window_coverage c ON c.created_from = w.created_from AND c.created_to = w.created_to
$$;

-- Records that every change Kommo stamped before p_covered_to, to a lead created in one of the windows, is
-- in production (run p_run_id applied it, in the caller's transaction). Never moves a window back.
CREATE OR REPLACE FUNCTION kommo_cover_windows(p_froms timestamptz[], p_tos timestamptz[],
                                               p_covered_to timestamptz, p_run_id uuid) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO kommo_window_coverage AS c (created_from, created_to, covered_to, run_id, updated_at)
    SELECT w.created_from, w.created_to, p_covered_to, p_run_id, now()
      FROM unnest(p_froms, p_tos) AS w(created_from, created_to)
     WHERE p_covered_to IS NOT NULL
    ON CONFLICT (created_from, created_to) DO UPDATE
       SET covered_to = EXCLUDED.covered_to, run_id = EXCLUDED.run_id, updated_at = EXCLUDED.updated_at
     WHERE EXCLUDED.covered_to > c.covered_to
$$;

-- The given windows that no refresh or increment has read yet, in order.
CREATE OR REPLACE FUNCTION kommo_uncovered_windows(p_froms timestamptz[], p_tos timestamptz[])
RETURNS TABLE (created_from timestamptz, created_to timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT w.created_from, w.created_to
      FROM unnest(p_froms, p_tos) AS w(created_from, created_to)
     WHERE NOT EXISTS (SELECT 1 FROM kommo_window_coverage c
                        WHERE c.created_from = w.created_from AND c.created_to = w.created_to)
     ORDER BY 1
$$;

-- What production holds of one window, per table: the live rows of the import's own leads created in it
-- (kommo_owned's predicate, written out so the partial indexes on live rows serve it: a function with a
-- pinned search_path is never inlined), the clients of those leads, and the vehicles and links of their
-- active bookings. The row count of every materialization of a production table's partition, after a
-- refresh or an increment.
CREATE OR REPLACE FUNCTION kommo_window_row_counts(p_from timestamptz, p_to timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    WITH leads AS (
        SELECT s.client_id FROM sales_leads s
         WHERE s.lead_code LIKE 'kommo:%' AND s.archived_at IS NULL
           AND s.kommo_created_at >= p_from AND s.kommo_created_at < p_to
    ), active AS (
        SELECT b.id FROM bookings b
         WHERE b.source_payload_id LIKE 'kommo:%' AND b.is_active
           AND b.kommo_created_at >= p_from AND b.kommo_created_at < p_to
    ), links AS (
        SELECT bv.vehicle_id FROM booking_vehicles bv JOIN active a ON a.id = bv.booking_id
    )
    SELECT jsonb_build_object(
        'sales_leads', (SELECT count(*) FROM leads),
        'clients', (SELECT count(DISTINCT client_id) FROM leads),
        'bookings', (SELECT count(*) FROM active),
        'booking_vehicles', (SELECT count(*) FROM links),
        'vehicles', (SELECT count(DISTINCT vehicle_id) FROM links))
$$;

-- What increment p_run_id staged per window: the leads changed (by their Kommo created_at) and the leads
-- removed (by the created_at production holds for them), for the windows that have any, in order.
CREATE OR REPLACE FUNCTION kommo_increment_changes_by_window(p_run_id uuid, p_froms timestamptz[],
                                                              p_tos timestamptz[])
RETURNS TABLE (created_from timestamptz, created_to timestamptz, leads bigint, removals bigint)
LANGUAGE sql STABLE AS $$
    SELECT w.created_from, w.created_to,
           (SELECT count(*) FROM stg_kommo_leads l
             WHERE l.run_id = p_run_id AND l.created_at >= w.created_from AND l.created_at < w.created_to),
           (SELECT count(*) FROM stg_kommo_lead_removals r
              JOIN sales_leads s ON s.lead_code = kommo_lead_code(r.lead_id)
             WHERE r.run_id = p_run_id AND s.kommo_created_at >= w.created_from AND s.kommo_created_at < w.created_to)
      FROM unnest(p_froms, p_tos) AS w(created_from, created_to)
     ORDER BY 1
$$;
