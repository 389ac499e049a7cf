-- The refresh request table's interface: what the web app calls (request_kommo_refresh,
-- kommo_refresh_request_status) and what the Dagster sensors call (flag sync, claim, refuse, started,
-- finished). Tables: sql/migrations/0004_refresh_requests.sql.

-- The Bookings-page button. Refuses (SQLSTATE 42501 insufficient_privilege, with the reason as message)
-- a user who is not staff and any request while the live flag is off; otherwise adds a pending request,
-- or returns the request already waiting for a run, so a double click never queues two refreshes.
-- p_user_id must be the id of the signed-in user taken from the app's session (e.g. auth.uid() in
-- Supabase), never a value the browser sends.
-- An app with its own roles table can replace the kommo_refresh_staff check below with its own lookup.
CREATE OR REPLACE FUNCTION request_kommo_refresh(p_user_id uuid) RETURNS kommo_refresh_requests
LANGUAGE plpgsql AS $$
DECLARE
    v_enabled boolean;
    v_request kommo_refresh_requests;
BEGIN
    IF p_user_id IS NULL
       OR NOT EXISTS (SELECT 1 FROM kommo_refresh_staff WHERE user_id = p_user_id) THEN
        RAISE EXCEPTION 'Kommo refresh refused: user % is not staff', coalesce(p_user_id::text, '(none)')
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'only users listed in kommo_refresh_staff may request a Kommo refresh';
    END IF;

    SELECT enabled INTO v_enabled FROM kommo_runtime_flags WHERE name = 'KOMMO_ENABLE_LIVE';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Kommo refresh is disabled: KOMMO_ENABLE_LIVE has not been synced from the Dagster '
                        'code location yet. Set KOMMO_ENABLE_LIVE=1 there and turn on the sensor '
                        'kommo_refresh_request_sensor, which copies the flag into kommo_runtime_flags.'
            USING ERRCODE = 'insufficient_privilege';
    ELSIF NOT v_enabled THEN
        RAISE EXCEPTION 'Kommo refresh is disabled: KOMMO_ENABLE_LIVE is off. Set KOMMO_ENABLE_LIVE=1 in the '
                        'environment of the Dagster code location to allow refreshes (the request sensor '
                        'copies it here on its next tick).'
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    -- Serialize callers so the "already waiting?" look and the insert see the same picture; the unique
    -- index kommo_refresh_requests_one_waiting backs this up.
    PERFORM pg_advisory_xact_lock(90903);
    SELECT * INTO v_request FROM kommo_refresh_requests
     WHERE status IN ('pending', 'queued') ORDER BY id LIMIT 1;
    IF FOUND THEN
        RETURN v_request;
    END IF;
    INSERT INTO kommo_refresh_requests (requested_by) VALUES (p_user_id) RETURNING * INTO v_request;
    RETURN v_request;
END;
$$;

-- What the app polls for its toast: {request_id, run_id, status, leads, contacts, vehicles, error}
-- (run_id is the Dagster run id, null until a run is started). NULL for an unknown request id.
CREATE OR REPLACE FUNCTION kommo_refresh_request_status(p_id bigint) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'request_id', r.id,
        'run_id', r.dagster_run_id,
        'status', r.status,
        'leads', r.leads,
        'contacts', r.contacts,
        'vehicles', r.vehicles,
        'error', coalesce(r.error, r.reason),
        'requested_by', r.requested_by,
        'requested_at', r.requested_at,
        'updated_at', r.updated_at
    )
      FROM kommo_refresh_requests r
     WHERE r.id = p_id;
$$;

-- The code location's copy of a flag (see kommo_runtime_flags). Returns the value stored.
CREATE OR REPLACE FUNCTION sync_kommo_runtime_flag(p_name text, p_enabled boolean) RETURNS boolean
LANGUAGE sql AS $$
    INSERT INTO kommo_runtime_flags AS f (name, enabled) VALUES (p_name, p_enabled)
    ON CONFLICT (name) DO UPDATE
       SET enabled = EXCLUDED.enabled,
           synced_at = now(),
           updated_at = CASE WHEN f.enabled IS DISTINCT FROM EXCLUDED.enabled THEN now() ELSE f.updated_at END
    RETURNING enabled;
$$;

-- The sensor's pick-up: marks every pending request queued and returns it, plus queued requests above
-- p_after_id (the sensor's cursor): those were claimed by a tick that never finished, and re-requesting
-- them is safe because the run key of a request is stable.
CREATE OR REPLACE FUNCTION claim_kommo_refresh_requests(p_after_id bigint) RETURNS SETOF kommo_refresh_requests
LANGUAGE sql AS $$
    UPDATE kommo_refresh_requests
       SET status = 'queued', updated_at = now()
     WHERE status = 'pending' OR (status = 'queued' AND id > coalesce(p_after_id, 0))
    RETURNING *;
$$;

-- While the live flag is off, pending requests are refused with the reason instead of started.
CREATE OR REPLACE FUNCTION refuse_kommo_refresh_requests(p_reason text) RETURNS SETOF kommo_refresh_requests
LANGUAGE sql AS $$
    UPDATE kommo_refresh_requests
       SET status = 'refused', reason = p_reason, updated_at = now()
     WHERE status = 'pending'
    RETURNING *;
$$;

-- The request's run started. Only a waiting request moves to running: the end of the run may have been
-- recorded first, since Dagster evaluates the started and ended sensors independently.
CREATE OR REPLACE FUNCTION kommo_refresh_request_started(p_id bigint, p_dagster_run_id text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE kommo_refresh_requests
       SET status = 'running', dagster_run_id = p_dagster_run_id, updated_at = now()
     WHERE id = p_id AND status IN ('pending', 'queued');
    RETURN FOUND;
END;
$$;

-- The request's run ended: status and counts come from its import run (succeeded, failed or
-- needs_review); without one (the run failed before the import started) it is failed with p_error.
-- A later run of the same request (a re-execution) overwrites the result. NULL for an unknown request.
CREATE OR REPLACE FUNCTION kommo_refresh_request_finished(
    p_id bigint, p_dagster_run_id text, p_import_run_id uuid, p_error text
) RETURNS kommo_refresh_requests
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs;
    v_status text;
    v_request kommo_refresh_requests;
BEGIN
    SELECT * INTO v_run FROM kommo_import_runs WHERE id = p_import_run_id;
    v_status := CASE WHEN v_run.status IN ('succeeded', 'failed', 'needs_review') THEN v_run.status
                     ELSE 'failed' END;
    UPDATE kommo_refresh_requests
       SET status = v_status,
           dagster_run_id = p_dagster_run_id,
           import_run_id = v_run.id,
           leads = v_run.leads_count,
           contacts = v_run.contacts_count,
           vehicles = v_run.vehicles_count,
           error = CASE WHEN v_status = 'succeeded' THEN NULL ELSE coalesce(v_run.error, p_error) END,
           updated_at = now()
     WHERE id = p_id AND status <> 'refused'
    RETURNING * INTO v_request;
    RETURN v_request;
END;
$$;
