-- Least privilege in the app's database. On Supabase every function in an exposed schema is an RPC for
-- signed-in and anonymous users alike, and PostgreSQL lets PUBLIC execute every new function by default,
-- so nothing the project creates may keep that default. The web app gets a NOLOGIN group role,
-- kommo_app, that may call exactly request_kommo_refresh and kommo_refresh_request_status (SECURITY
-- DEFINER: the role needs no table privileges at all). The deployment grants it to the role its app
-- connects as:
--     GRANT kommo_app TO authenticated;           -- Supabase (the signed-in users' role)
--     GRANT kommo_app TO my_app_server_role;      -- an app server with its own login role
-- The EXECUTE grants themselves are in sql/functions/90_privileges.sql, re-applied on every migrate,
-- because a function file that drops and re-creates a function loses the grants made on it.

-- Roles are shared by every database of the server: create the group role only once.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kommo_app') THEN
        IF NOT (SELECT rolcreaterole OR rolsuper FROM pg_roles WHERE rolname = current_user) THEN
            RAISE EXCEPTION 'role kommo_app does not exist and % may not create roles', current_user
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'create it once as a role with CREATEROLE: CREATE ROLE kommo_app NOLOGIN; '
                             'then run kommo-assets migrate again';
        END IF;
        BEGIN
            CREATE ROLE kommo_app NOLOGIN;
        EXCEPTION WHEN duplicate_object THEN
            NULL;  -- created meanwhile by a migration of another database on the same server
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO kommo_app', current_schema());
END;
$$;

-- Functions the migrating role creates from now on (the function files run after the migrations, and
-- some drop and re-create their functions) are not executable by PUBLIC. Default privileges only remove
-- PUBLIC's EXECUTE when set database-wide (per-schema ones can only add), so this is database-wide for
-- this role. Grants a deployment adds per schema (Supabase grants EXECUTE on new functions in public to
-- anon and authenticated) are removed from the project's functions by 90_privileges.sql.
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- Functions created before this migration keep the EXECUTE they were created with: sql/functions/
-- 90_privileges.sql, which runs after the migrations on every migrate, revokes it.

-- Which years requests may ask for and how long after a refresh the next may be requested: like the live
-- flag (kommo_runtime_flags), SQL cannot read the code location's environment, so the request sensor
-- copies KOMMO_REFRESH_YEARS (a JSON array of years, the first is the default) and
-- KOMMO_REQUEST_COOLDOWN_MINUTES (a JSON number) here on every tick.
CREATE TABLE kommo_runtime_settings (
    name       text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    synced_at  timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON kommo_runtime_settings FROM PUBLIC;

-- The year a request asks for (NULL on requests made before years existed: the run's default year), and
-- when its run ended, which starts the cooldown.
ALTER TABLE kommo_refresh_requests
    ADD COLUMN year integer,
    ADD COLUMN finished_at timestamptz;
UPDATE kommo_refresh_requests SET finished_at = updated_at
 WHERE status IN ('succeeded', 'failed', 'needs_review');
CREATE INDEX kommo_refresh_requests_last_finished ON kommo_refresh_requests (finished_at DESC)
    WHERE finished_at IS NOT NULL;

-- What request_kommo_refresh answers: the request that now stands for the caller's press (new, waiting,
-- running, or the latest one while the cooldown lasts), whether it is new, and the message for the
-- app's toast. Nothing about who requested it.
CREATE TYPE kommo_refresh_request_answer AS (
    id           bigint,
    status       text,
    year         integer,
    run_id       text,
    requested_at timestamptz,
    finished_at  timestamptz,
    accepted     boolean,
    retry_after  timestamptz,
    message      text
);
