-- Who may use what the project created. kommo_assets/db/migrate.py runs this in the transaction of every
-- migration and of the function files, right after registering what that transaction created
-- (kommo_schema_objects), so no object of the project is ever committed with the privileges a platform
-- grants by default (Supabase grants ALL on every new table, sequence and function in public to anon,
-- authenticated and service_role). It acts on registered objects only: nothing the app or the platform
-- created, whatever its name, and no default privilege of any role. docs/security.md explains the rules.
--
--   * Every registered table has row level security enabled (never disabled here). The owner, which runs
--     the import, is not subject to it; any other role sees no row until the app adds a policy.
--   * Every registered view runs as its reader (security_invoker), so the tables' RLS applies through it.
--   * Every registered function pins its search_path (its schema, then pg_temp) and is executable by its
--     owner only; SECURITY DEFINER is allowed on the two entry points only.
--   * The internals (every registered relation not in v_app_facing below: run records, staging, requests,
--     runtime settings, the sync cursor, the migration ledger, this registry) keep no privilege of any
--     other role: whatever was granted on them is revoked on every migrate.
--   * The app-facing relations (the production tables the web app reads and writes, the calendar view, the
--     mapping tables, the staff list, the Zoho outbox) are shut when they are created; grants the app
--     adds on them later (with its own RLS policies) are the app's and are left alone.
--   * The two entry points are executable by the app's roles: KOMMO_APP_ROLES (the setting
--     kommo.app_roles, set by migrate) when given, else authenticated where that role exists (Supabase's
--     signed-in users), else the group role kommo_app. Never anon.
-- Input: the transaction-local setting kommo.app_roles (comma-separated role names, may be empty).
DO $privileges$
DECLARE
    v_entry_points constant text[] := ARRAY['request_kommo_refresh', 'kommo_refresh_request_status'];
    v_app_facing constant text[] := ARRAY[
        'clients', 'vehicles', 'sales_leads', 'bookings', 'booking_vehicles', 'calendar_events',
        'calendar_events_expanded', 'zoho_outbox', 'zoho_outbox_id_seq', 'kommo_user_map', 'kommo_status_map',
        'kommo_source_map', 'kommo_refresh_staff'];
    v_setting text := nullif(btrim(coalesce(current_setting('kommo.app_roles', true), '')), '');
    v_relations oid[];
    v_new oid[];
    v_functions oid[];
    v_roles text[];
    v_role text;
    v_grantee text;
    r record;
BEGIN
    -- A login role named kommo_app would let whoever logs in as it call the entry points of every
    -- database on the server that grants them to kommo_app.
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'kommo_app' AND rolcanlogin) THEN
        RAISE EXCEPTION 'role kommo_app can log in: kommo-assets grants the web app''s entry points to this '
                        'group role, which must be NOLOGIN'
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'ALTER ROLE kommo_app NOLOGIN (grant it to the app''s own login role instead), or name '
                         'the app''s roles in KOMMO_APP_ROLES; then run kommo-assets migrate again';
    END IF;

    -- Forget what no longer exists (dropped, or re-created under a new oid and registered again).
    DELETE FROM kommo_schema_objects o
     WHERE (pg_identify_object(o.classid, o.objid, 0)).identity IS DISTINCT FROM o.identity;

    -- (Read first: the registry itself is among the tables altered below.)
    SELECT coalesce(array_agg(o.objid) FILTER (WHERE o.classid = 'pg_class'::regclass), '{}'),
           coalesce(array_agg(o.objid) FILTER (WHERE o.classid = 'pg_class'::regclass
                                                 AND o.registered_xact = pg_current_xact_id()), '{}'),
           coalesce(array_agg(o.objid) FILTER (WHERE o.classid = 'pg_proc'::regclass), '{}')
      INTO v_relations, v_new, v_functions
      FROM kommo_schema_objects o;

    -- Relations.
    FOR r IN
        SELECT c.oid::regclass AS rel, c.relkind, c.relrowsecurity, c.relowner, c.reloptions,
               c.oid = ANY (v_new) OR NOT (c.relname = ANY (v_app_facing)) AS shut
          FROM pg_class c
         WHERE c.oid = ANY (v_relations)
    LOOP
        IF r.shut THEN
            FOR v_grantee IN
                SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.rolname) END
                  FROM (SELECT (aclexplode(c.relacl)).grantee FROM pg_class c WHERE c.oid = r.rel
                        UNION ALL
                        SELECT (aclexplode(t.attacl)).grantee FROM pg_attribute t
                         WHERE t.attrelid = r.rel AND t.attacl IS NOT NULL) a
                  LEFT JOIN pg_roles g ON g.oid = a.grantee
                 WHERE a.grantee <> r.relowner
            LOOP
                EXECUTE format('REVOKE ALL ON %s %s FROM %s CASCADE',
                               CASE WHEN r.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END, r.rel, v_grantee);
            END LOOP;
        END IF;
        IF r.relkind IN ('r', 'p') AND NOT r.relrowsecurity THEN
            EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', r.rel);
        ELSIF r.relkind = 'v' AND NOT coalesce('security_invoker=true' = ANY (r.reloptions), false) THEN
            EXECUTE format('ALTER VIEW %s SET (security_invoker = true)', r.rel);
        END IF;
    END LOOP;

    -- Functions.
    FOR r IN
        SELECT p.oid::regprocedure AS fn, p.proname, p.prosecdef, p.proowner, n.nspname,
               EXISTS (SELECT 1 FROM unnest(p.proconfig) s WHERE s LIKE 'search_path=%') AS pinned,
               p.proacl
          FROM pg_proc p
          JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE p.oid = ANY (v_functions)
    LOOP
        IF r.prosecdef AND NOT r.proname = ANY (v_entry_points) THEN
            RAISE EXCEPTION 'function % is SECURITY DEFINER: only the web app''s entry points (%) may be',
                            r.fn, array_to_string(v_entry_points, ', ');
        END IF;
        FOR v_grantee IN
            SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.rolname) END
              FROM aclexplode(coalesce(r.proacl, acldefault('f', r.proowner))) a
              LEFT JOIN pg_roles g ON g.oid = a.grantee
             WHERE a.grantee <> r.proowner
        LOOP
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s CASCADE', r.fn, v_grantee);
        END LOOP;
        IF NOT r.pinned THEN
            EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp', r.fn, r.nspname);
        END IF;
        IF r.proname = ANY (v_entry_points) THEN
            IF v_roles IS NULL THEN
                v_roles := CASE
                    WHEN v_setting IS NOT NULL THEN
                        ARRAY(SELECT btrim(x) FROM unnest(string_to_array(v_setting, ',')) x WHERE btrim(x) <> '')
                    WHEN EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN ARRAY['authenticated']
                    ELSE ARRAY['kommo_app'] END;
                FOREACH v_role IN ARRAY v_roles LOOP
                    IF lower(v_role) IN ('anon', 'public') THEN
                        RAISE EXCEPTION 'KOMMO_APP_ROLES may not name %: the entry points are for signed-in users',
                                        v_role USING ERRCODE = 'invalid_parameter_value';
                    ELSIF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
                        RAISE EXCEPTION 'role % (the web app''s role that may call the entry points) does not exist',
                                        v_role
                            USING ERRCODE = 'undefined_object',
                                  HINT = 'create it, or set KOMMO_APP_ROLES to the roles the app uses';
                    END IF;
                END LOOP;
            END IF;
            FOREACH v_role IN ARRAY v_roles LOOP
                EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', r.fn, v_role);
            END LOOP;
        END IF;
    END LOOP;
END;
$privileges$;
