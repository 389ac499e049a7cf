-- The advisory lock keys of the project, named once (besides kommo_assets/db/migrate.py's MIGRATE_LOCK_KEY,
-- 90900, which migrations take before any of these functions exists):
--   import_start     start_kommo_import_run: starters one at a time (transaction lock)
--   swap             run_kommo_full_refresh and run_kommo_increment: one apply at a time (transaction lock)
--   import_owner     the class of each run's owner lock, pg_advisory_lock(class, hashtext(run id)), held
--                    by the process running the import for the whole run (session lock); it counts only when
--                    held by a role that may write the run log (kommo_import_run_owner_alive)
--   refresh_request  reserved: request_kommo_refresh took it until it locked its table instead (any session
--                    may hold any advisory key, only the owner may lock the table)
-- An unknown name raises: pg_advisory_lock(NULL) would silently lock nothing.
CREATE OR REPLACE FUNCTION kommo_lock_key(p_name text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN CASE p_name
               WHEN 'import_start' THEN 90901
               WHEN 'swap' THEN 90902
               WHEN 'import_owner' THEN 90903
               WHEN 'refresh_request' THEN 90904
               ELSE kommo_unknown_lock_key(p_name)
           END;
END;
$$;

CREATE OR REPLACE FUNCTION kommo_unknown_lock_key(p_name text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RAISE EXCEPTION 'no Kommo advisory lock is named %', p_name;
END;
$$;

-- Whether this session holds the named transaction lock: functions that may only run inside the swap or the
-- increment (they suspend foreign keys, or write production) check it.
CREATE OR REPLACE FUNCTION kommo_holds_lock(p_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM pg_locks
                    WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                      AND classid = 0 AND objid = kommo_lock_key(p_name) AND objsubid = 1)
$$;
