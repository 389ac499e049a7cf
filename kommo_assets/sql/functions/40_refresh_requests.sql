-- The refresh request table's interface: what the web app calls (request_kommo_refresh,
-- kommo_refresh_request_status) and what the Dagster sensors call (flag and setting sync, claim, refuse,
-- started, finished). Tables: kommo_assets/sql/migrations/0004_refresh_requests.sql, 0008_app_role_and_least_privilege.sql.

-- The web app's two entry points run as their owner (SECURITY DEFINER, search_path pinned at the end of
-- this file), so the app's role (kommo_app, kommo_assets/sql/migrations/0008_app_role_and_least_privilege.sql) needs
-- no table privileges, and they decide whose request it is rather than trust the caller:
--   * PostgREST / Supabase: the signed-in user of the request (the JWT's sub, what auth.uid() reads);
--     a request without one (anonymous) is nobody's.
--   * An app server on its own connection: it sets kommo.user_id for each transaction from its verified
--     session (SET LOCAL kommo.user_id = '<uuid>', or set_config('kommo.user_id', $1, true)).
--   * Neither: the user_id argument is the user (the app server must take it from its session, never
--     from the browser). Use this only where the app's database role is not reachable by browsers.
-- When the session names a user, a user_id argument must be NULL or that user, else the call is refused:
-- nobody can act as someone else by passing their id.
CREATE OR REPLACE FUNCTION kommo_refresh_caller(p_user_id uuid) RETURNS uuid
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_claims text := nullif(current_setting('request.jwt.claims', true), '');
    v_sub text := nullif(current_setting('request.jwt.claim.sub', true), '');
    v_app_user text := nullif(btrim(current_setting('kommo.user_id', true)), '');
    v_session_user uuid;
BEGIN
    -- PostgREST sets these on every request it serves, with or without a signed-in user.
    IF v_claims IS NOT NULL OR v_sub IS NOT NULL
       OR nullif(current_setting('request.method', true), '') IS NOT NULL THEN
        v_session_user := nullif(coalesce(v_sub, v_claims::jsonb ->> 'sub'), '')::uuid;
    ELSIF v_app_user IS NOT NULL THEN
        v_session_user := v_app_user::uuid;
    ELSE
        RETURN p_user_id;
    END IF;
    IF p_user_id IS NOT NULL AND p_user_id IS DISTINCT FROM v_session_user THEN
        RAISE EXCEPTION 'Kommo refresh refused: user_id % is not the signed-in user', p_user_id
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'pass NULL (or omit user_id): the signed-in user is taken from the session';
    END IF;
    RETURN v_session_user;
END;
$$;

-- A setting the request sensor copies from the code location (kommo_runtime_settings); refuses, saying
-- how to fix it, while it has never been copied.
CREATE OR REPLACE FUNCTION kommo_runtime_setting(p_name text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_value jsonb;
BEGIN
    SELECT value INTO v_value FROM kommo_runtime_settings WHERE name = p_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Kommo refresh is disabled: % has not been synced from the Dagster code location yet. '
                        'Turn on the sensor kommo_refresh_request_sensor, which copies it into '
                        'kommo_runtime_settings on every tick.', p_name
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN v_value;
END;
$$;

-- The years in scope now (UTC, the database's clock), ascending, from the KOMMO_REFRESH_YEARS the request
-- sensor copied: a JSON array of [first, last] ranges, last null for an open range (through the current
-- year; no year before its first second), so a new year is in scope from its first second without
-- waiting for a tick. Plain years (the
-- form copied before ranges existed) are read too.
CREATE OR REPLACE FUNCTION kommo_years_in_scope() RETURNS integer[]
LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(DISTINCT y ORDER BY y), '{}')
      FROM jsonb_array_elements(kommo_runtime_setting('KOMMO_REFRESH_YEARS')) AS e(item)
     CROSS JOIN LATERAL generate_series(
           (CASE jsonb_typeof(e.item) WHEN 'array' THEN e.item ->> 0 ELSE e.item #>> '{}' END)::integer,
           least(coalesce((CASE jsonb_typeof(e.item) WHEN 'array' THEN e.item ->> 1 ELSE e.item #>> '{}' END)::integer,
                          extract(year FROM now() AT TIME ZONE 'UTC')::integer),
                 extract(year FROM now() AT TIME ZONE 'UTC')::integer)) AS y
$$;

-- The Bookings-page button. Refuses (SQLSTATE 42501 insufficient_privilege, with the reason as message)
-- a user who is not staff and any request while the live flag is off, and (22023) a year outside
-- KOMMO_REFRESH_YEARS (kommo_years_in_scope); year NULL is the current year (UTC). Otherwise it queues a request, unless one
-- is already waiting or running, or the last one finished less than KOMMO_REQUEST_COOLDOWN_MINUTES ago:
-- then it answers with that request and says why (accepted false, retry_after when the cooldown ends).
-- A double click never queues two refreshes, and the button cannot keep refreshes running back to back
-- on the account's shared rate limit.
-- An app with its own roles table can replace the kommo_refresh_staff check below with its own lookup.
DROP FUNCTION IF EXISTS request_kommo_refresh(uuid);
CREATE OR REPLACE FUNCTION request_kommo_refresh(user_id uuid DEFAULT NULL, year integer DEFAULT NULL)
RETURNS kommo_refresh_request_answer
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    v_user uuid := kommo_refresh_caller(request_kommo_refresh.user_id);
    v_enabled boolean;
    v_years integer[];
    v_year integer;
    v_minutes numeric;
    v_cooldown interval;
    v_request kommo_refresh_requests;
    v_import kommo_import_runs;
    v_answer kommo_refresh_request_answer;
BEGIN
    -- The checks below read what other callers and the sensors committed, after taking the queue's lock:
    -- a REPEATABLE READ or SERIALIZABLE transaction would read a snapshot older than the lock and could
    -- queue a second refresh beside a running one.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'Kommo refresh refused: call request_kommo_refresh in a READ COMMITTED transaction '
                        '(this one is %)', upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'PostgREST and most clients use READ COMMITTED, PostgreSQL''s default';
    END IF;
    IF v_user IS NULL
       OR NOT EXISTS (SELECT 1 FROM kommo_refresh_staff s WHERE s.user_id = v_user) THEN
        RAISE EXCEPTION 'Kommo refresh refused: user % is not staff', coalesce(v_user::text, '(none)')
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

    v_years := kommo_years_in_scope();
    v_year := coalesce(request_kommo_refresh.year, extract(year FROM now() AT TIME ZONE 'UTC')::integer);
    IF NOT v_year = ANY (v_years) THEN
        RAISE EXCEPTION 'Kommo refresh refused: year % is not one of the years requests may ask for (%)',
                        v_year, coalesce(nullif(array_to_string(v_years, ', '), ''), 'none yet')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'KOMMO_REFRESH_YEARS in the environment of the Dagster code location lists them';
    END IF;
    v_minutes := (kommo_runtime_setting('KOMMO_REQUEST_COOLDOWN_MINUTES'))::numeric;
    v_cooldown := make_interval(secs => v_minutes * 60);

    -- Serialize callers so the look at waiting, running and recent requests and the insert see the same
    -- picture (the caller's transaction is READ COMMITTED, checked above: each statement below sees what
    -- the previous caller committed); the unique index kommo_refresh_requests_one_open backs this up. A
    -- table lock rather than an advisory lock: only the owner may lock this table, whereas any session
    -- can hold any advisory key. lock_timeout (set on this function, at the end of this file) bounds the
    -- wait whoever holds it.
    BEGIN
        LOCK TABLE kommo_refresh_requests IN SHARE ROW EXCLUSIVE MODE;
    EXCEPTION WHEN lock_not_available THEN
        RAISE EXCEPTION 'Kommo refresh: the request queue is busy (another request is being answered); '
                        'please try again in a moment'
            USING ERRCODE = 'lock_not_available';
    END;
    -- What the answer may say about a request depends on whose it is: the caller's own in full, anyone
    -- else's (another staff member's, a run launched from Dagster) only that one is waiting, running or
    -- cooling down, and when the next request is possible; never its id, run id or times.
    SELECT * INTO v_request FROM kommo_refresh_requests r
     WHERE r.status IN ('pending', 'queued', 'running') ORDER BY r.id DESC LIMIT 1;
    IF FOUND THEN
        v_answer.accepted := false;
        v_answer.message := CASE
            WHEN v_request.requested_by IS DISTINCT FROM v_user THEN format(
                CASE WHEN v_request.status = 'running' THEN 'A Kommo refresh requested by someone else is running; '
                     ELSE 'A Kommo refresh requested by someone else is waiting to start; ' END
                || 'a new one can be requested %s minutes after it ends.', trim_scale(v_minutes))
            ELSE format(
                CASE WHEN v_request.status = 'running'
                     THEN 'A Kommo refresh is running (request #%s, %s); a new one can be requested %s minutes after it ends.'
                     ELSE 'A Kommo refresh is already waiting to start (request #%s, %s); '
                          'a new one can be requested %s minutes after it ends.' END,
                v_request.id, coalesce(v_request.year::text, 'default year'), trim_scale(v_minutes)) END;
    ELSE
        SELECT * INTO v_request FROM kommo_refresh_requests r
         WHERE r.finished_at IS NOT NULL ORDER BY r.finished_at DESC, r.id DESC LIMIT 1;
        IF FOUND AND v_request.finished_at + v_cooldown > now() THEN
            v_answer.accepted := false;
            v_answer.retry_after := v_request.finished_at + v_cooldown;
            v_answer.message := CASE
                WHEN v_request.requested_by IS DISTINCT FROM v_user THEN format(
                    'A Kommo refresh ended less than %s minutes ago; the next one can be requested from %s '
                    '(KOMMO_REQUEST_COOLDOWN_MINUTES).', trim_scale(v_minutes),
                    to_char(v_answer.retry_after AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'))
                ELSE format(
                    'The last Kommo refresh (request #%s, %s) ended at %s; the next one can be requested from %s '
                    '(KOMMO_REQUEST_COOLDOWN_MINUTES).',
                    v_request.id, v_request.status,
                    to_char(v_request.finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'),
                    to_char(v_answer.retry_after AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"')) END;
        ELSE
            -- A refresh launched elsewhere (the Dagster UI, a schedule) holds the account's rate limit
            -- just the same: while it runs, and for the cooldown after it, the button waits too. Dry runs
            -- and increments (a few requests each) do not hold it. Two index lookups (the one running
            -- import, kommo_import_runs_one_running; the last finished refresh,
            -- kommo_import_runs_refresh_finished): increments add a row a minute to this table.
            SELECT * INTO v_import FROM kommo_import_runs r
             WHERE r.status = 'running' AND NOT r.dry_run AND r.kind <> 'increment';
            IF NOT FOUND THEN
                SELECT * INTO v_import FROM kommo_import_runs r
                 WHERE NOT r.dry_run AND r.kind <> 'increment' AND r.finished_at > now() - v_cooldown
                 ORDER BY r.finished_at DESC LIMIT 1;
            END IF;
            IF FOUND THEN
                v_answer.accepted := false;
                v_answer.status := v_import.status;
                IF v_import.status = 'running' THEN
                    v_answer.message := format(
                        'A Kommo refresh started from Dagster is running; a new one can be requested %s minutes '
                        'after it ends.', trim_scale(v_minutes));
                ELSE
                    v_answer.retry_after := v_import.finished_at + v_cooldown;
                    v_answer.message := format(
                        'A Kommo refresh started from Dagster ended less than %s minutes ago; the next one can be '
                        'requested from %s (KOMMO_REQUEST_COOLDOWN_MINUTES).', trim_scale(v_minutes),
                        to_char(v_answer.retry_after AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'));
                END IF;
                RETURN v_answer;
            END IF;
            INSERT INTO kommo_refresh_requests (requested_by, year) VALUES (v_user, v_year)
            RETURNING * INTO v_request;
            v_answer.accepted := true;
            v_answer.message := format('Kommo refresh of %s requested (request #%s).', v_year, v_request.id);
        END IF;
    END IF;
    v_answer.status := v_request.status;
    IF v_request.requested_by IS NOT DISTINCT FROM v_user THEN
        v_answer.id := v_request.id;
        v_answer.year := v_request.year;
        v_answer.run_id := v_request.dagster_run_id;
        v_answer.requested_at := v_request.requested_at;
        v_answer.finished_at := v_request.finished_at;
    END IF;
    RETURN v_answer;
END;
$$;

-- What the app polls for its toast: {request_id, run_id, status, year, leads, contacts, vehicles, error,
-- requested_at, updated_at, finished_at} (run_id is the Dagster run id, null until a run is started).
-- Only the caller's own requests (the caller as request_kommo_refresh decides it): NULL for any other id.
DROP FUNCTION IF EXISTS kommo_refresh_request_status(bigint);
CREATE OR REPLACE FUNCTION kommo_refresh_request_status(request_id bigint, user_id uuid DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER AS $$
    SELECT jsonb_build_object(
        'request_id', r.id,
        'run_id', r.dagster_run_id,
        'status', r.status,
        'year', r.year,
        'leads', r.leads,
        'contacts', r.contacts,
        'vehicles', r.vehicles,
        'error', coalesce(r.error, r.reason),
        'requested_at', r.requested_at,
        'updated_at', r.updated_at,
        'finished_at', r.finished_at
    )
      FROM kommo_refresh_requests r
     WHERE r.id = kommo_refresh_request_status.request_id
       AND r.requested_by = kommo_refresh_caller(kommo_refresh_request_status.user_id);
$$;

-- The code location's copy of a setting (see kommo_runtime_settings). Returns the value stored.
CREATE OR REPLACE FUNCTION sync_kommo_runtime_setting(p_name text, p_value jsonb) RETURNS jsonb
LANGUAGE sql AS $$
    INSERT INTO kommo_runtime_settings AS s (name, value) VALUES (p_name, p_value)
    ON CONFLICT (name) DO UPDATE
       SET value = EXCLUDED.value,
           synced_at = now(),
           updated_at = CASE WHEN s.value IS DISTINCT FROM EXCLUDED.value THEN now() ELSE s.updated_at END
    RETURNING value;
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
           updated_at = now(),
           finished_at = now()
     WHERE id = p_id AND status <> 'refused'
    RETURNING * INTO v_request;
    RETURN v_request;
END;
$$;

-- The entry points resolve names only in the project's schema (pg_catalog first, as always, and pg_temp
-- last), so a caller's own objects can never stand in for the tables or functions they use.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION request_kommo_refresh(uuid, integer) SET search_path = %I, pg_temp',
                   current_schema());
    -- The queue's lock is waited for 4 s at most: the button answers within 5 s whoever holds it.
    ALTER FUNCTION request_kommo_refresh(uuid, integer) SET lock_timeout = '4s';
    EXECUTE format('ALTER FUNCTION kommo_refresh_request_status(bigint, uuid) SET search_path = %I, pg_temp',
                   current_schema());
END;
$$;
