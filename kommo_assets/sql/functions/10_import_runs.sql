-- Lifecycle of kommo_import_runs: start (one running import at a time), the drop guard, closing.

-- The process running a live import holds this session advisory lock (kommo_lock_key('import_owner'), hashtext(run id)) on a
-- connection of its own from before the import starts until the run ends; a killed process or a lost host
-- drops its connections and so the lock. Any session may take any advisory key, so the lock counts only
-- when a session of a role that may write the run log holds it (the owner's, or one granted that by the
-- operator): nobody else can keep a dead import looking alive.
CREATE OR REPLACE FUNCTION kommo_import_run_owner_alive(p_id uuid) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1
          FROM pg_locks l
          JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database
                                                                        WHERE datname = current_database())
           AND l.classid = kommo_lock_key('import_owner')::oid AND l.objid = hashtext(p_id::text)::oid
           AND l.objsubid = 2
           AND has_table_privilege(a.usesysid, 'kommo_import_runs', 'UPDATE'))
$$;

DROP FUNCTION IF EXISTS start_kommo_import_run(uuid, text, text, text, boolean, timestamptz, timestamptz,
                                               numeric, interval);
-- p_kind: 'full_refresh', 'dry_run' or 'increment' (NULL: 'dry_run' when p_dry_run, else 'full_refresh').
-- An increment has no window (p_created_from and p_created_to NULL) and is never a dry run. (Earlier
-- versions took a grace interval: the owner lock now spans the whole run, so none is needed.)
DROP FUNCTION IF EXISTS start_kommo_import_run(uuid, text, text, text, boolean, timestamptz, timestamptz,
                                               numeric, interval, text);
CREATE OR REPLACE FUNCTION start_kommo_import_run(
    p_id uuid,
    p_dagster_run_id text,
    p_job_name text,
    p_triggered_by text,
    p_dry_run boolean,
    p_created_from timestamptz,
    p_created_to timestamptz,
    p_max_drop_ratio numeric,
    p_kind text DEFAULT NULL
) RETURNS kommo_import_runs
LANGUAGE plpgsql AS $$
DECLARE
    v_other kommo_import_runs;
    v_run kommo_import_runs;
BEGIN
    -- Serialize starters so the liveness check and the insert see the same picture.
    PERFORM pg_advisory_xact_lock(kommo_lock_key('import_start'));
    -- An import whose process died (killed, host lost) holds no owner lock any more: close it so it
    -- never wedges the next run. Its owner took the lock before starting it and holds it until the run
    -- ends, so there is no moment of a live import without one.
    UPDATE kommo_import_runs r
       SET status = 'failed',
           finished_at = now(),
           error = format('abandoned: the process running it died (last heartbeat %s); closed when run %s started',
                          r.heartbeat_at, p_id)
     WHERE r.status = 'running'
       AND NOT kommo_import_run_owner_alive(r.id);

    SELECT * INTO v_other FROM kommo_import_runs WHERE status = 'running' LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'another Kommo import is running: run % (Dagster run %, started %, last heartbeat %)',
            v_other.id, coalesce(v_other.dagster_run_id, '-'), v_other.started_at, v_other.heartbeat_at
            USING ERRCODE = 'lock_not_available',
                  HINT = 'wait for it to finish; an import whose process died is closed automatically';
    END IF;

    INSERT INTO kommo_import_runs (id, dagster_run_id, job_name, triggered_by, dry_run, kind,
                                   created_from, created_to, max_drop_ratio)
    VALUES (p_id, p_dagster_run_id, p_job_name, p_triggered_by, p_dry_run,
            coalesce(p_kind, CASE WHEN p_dry_run THEN 'dry_run' ELSE 'full_refresh' END),
            p_created_from, p_created_to, p_max_drop_ratio)
    RETURNING * INTO v_run;
    RETURN v_run;
END;
$$;

-- Closes a running import (the seed's finish_kommo_import_run): its status (succeeded, failed or
-- needs_review), finished_at and error; a no-op on an already closed one. The owner lock is the run's
-- process's own (session lock), released when its run ends, so nothing else is unlocked here.
CREATE OR REPLACE FUNCTION finish_kommo_import_run(p_id uuid, p_status text, p_error text)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_status NOT IN ('succeeded', 'failed', 'needs_review') THEN
        RAISE EXCEPTION 'cannot close an import run as %', p_status;
    END IF;
    UPDATE kommo_import_runs
       SET status = p_status, finished_at = now(), error = p_error
     WHERE id = p_id AND status = 'running';
    RETURN FOUND;
END;
$$;

-- The name this function had before finish_kommo_import_run, kept for scripts and runbooks that use it.
CREATE OR REPLACE FUNCTION close_kommo_import_run(p_id uuid, p_status text, p_error text)
RETURNS boolean
LANGUAGE sql AS $$
    SELECT finish_kommo_import_run(p_id, p_status, p_error)
$$;

-- The run a step may work on: locked for this transaction; unknown or closed runs are refused.
-- Run p_run_id's record (locked FOR UPDATE when p_lock), or an error naming the run when there is none:
-- the one lookup of a run by the functions that are given its id.
CREATE OR REPLACE FUNCTION kommo_import_run(p_run_id uuid, p_lock boolean DEFAULT false) RETURNS kommo_import_runs
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs;
BEGIN
    IF p_lock THEN
        SELECT * INTO v_run FROM kommo_import_runs WHERE id = p_run_id FOR UPDATE;
    ELSE
        SELECT * INTO v_run FROM kommo_import_runs WHERE id = p_run_id;
    END IF;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'unknown Kommo import run %', p_run_id;
    END IF;
    RETURN v_run;
END;
$$;

CREATE OR REPLACE FUNCTION lock_running_kommo_import_run(p_run_id uuid) RETURNS kommo_import_runs
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs := kommo_import_run(p_run_id, true);
BEGIN
    IF v_run.status <> 'running' THEN
        RAISE EXCEPTION 'Kommo import run % is %, not running: start a new run', p_run_id, v_run.status;
    END IF;
    RETURN v_run;
END;
$$;

-- The drop guard: zero leads or contacts fails the run; a drop of more than max_drop_ratio against
-- the last succeeded refresh of the same window marks it needs_review. Either way the swap will refuse
-- it. A dry run that passes is closed as succeeded here.
-- Same window: the same created_from and created_to. A refresh replaces only its own window (the swap's
-- kommo_owned), so only a refresh of that window says how many leads it held: 2026 holding far fewer
-- leads than 2025 is no drop. Dry runs only look, and increments stage only what changed, so neither is
-- a reference (kind = 'full_refresh' only).
-- Why a ratio guard at all: a wrong filter, a revoked pipeline permission or a half-broken Kommo answer
-- look like "most bookings were deleted", and the swap would faithfully deactivate them.
CREATE OR REPLACE FUNCTION kommo_drop_guard(p_run_id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_run kommo_import_runs;
    v_leads integer;
    v_contacts integer;
    v_vehicles integer;
    v_previous integer;
    v_ratio numeric := 0;
    v_status text;
    v_reason text;
BEGIN
    v_run := lock_running_kommo_import_run(p_run_id);
    IF v_run.kind = 'increment' THEN
        RAISE EXCEPTION 'Kommo import run % is an increment: its guard is in run_kommo_increment', p_run_id;
    END IF;

    SELECT count(*) INTO v_leads FROM stg_kommo_leads WHERE run_id = p_run_id;
    SELECT count(*) INTO v_contacts FROM stg_kommo_contacts WHERE run_id = p_run_id;
    SELECT count(*) INTO v_vehicles FROM stg_kommo_booking_vehicles WHERE run_id = p_run_id;
    SELECT leads_count INTO v_previous
      FROM kommo_import_runs
     WHERE status = 'succeeded' AND kind = 'full_refresh' AND id <> p_run_id
       AND created_from = v_run.created_from AND created_to = v_run.created_to
     ORDER BY finished_at DESC
     LIMIT 1;
    IF v_previous > 0 THEN
        v_ratio := round(greatest(0, (v_previous - v_leads)::numeric / v_previous), 4);
    END IF;

    IF v_leads = 0 THEN
        v_status := 'failed';
        v_reason := 'the snapshot has zero leads: Kommo returned nothing for the window; production left unchanged';
    ELSIF v_contacts = 0 THEN
        v_status := 'failed';
        v_reason := format('the snapshot has %s leads but zero contacts; production left unchanged', v_leads);
    ELSIF v_ratio > v_run.max_drop_ratio THEN
        v_status := 'needs_review';
        v_reason := format(
            'leads dropped by %s%% (%s -> %s), more than max_drop_ratio %s; production left unchanged. '
            'If the drop is real, re-run with a higher max_drop_ratio.',
            round(v_ratio * 100, 1), v_previous, v_leads, v_run.max_drop_ratio);
    END IF;

    -- A dry run ends here: staged and checked, nothing to swap.
    IF v_reason IS NULL AND v_run.dry_run THEN
        v_status := 'succeeded';
    END IF;

    UPDATE kommo_import_runs
       SET leads_count = v_leads,
           contacts_count = v_contacts,
           vehicles_count = v_vehicles,
           previous_leads_count = v_previous,
           drop_ratio = v_ratio,
           heartbeat_at = now(),
           guard_passed_at = CASE WHEN v_reason IS NULL THEN now() END,
           status = coalesce(v_status, status),
           finished_at = CASE WHEN v_status IS NULL THEN NULL ELSE now() END,
           error = v_reason
     WHERE id = p_run_id;

    RETURN jsonb_build_object(
        'passed', v_reason IS NULL,
        'status', coalesce(v_status, 'running'),
        'reason', v_reason,
        'leads', v_leads,
        'contacts', v_contacts,
        'vehicle_links', v_vehicles,
        'previous_leads', v_previous,
        'drop_ratio', v_ratio,
        'max_drop_ratio', v_run.max_drop_ratio
    );
END;
$$;
