-- Who may execute the project's functions, applied last on every migrate: their owner (the role that
-- migrates and runs the code location) and, for the web app's two entry points only, kommo_app (the
-- group role of sql/migrations/0008_app_role_and_least_privilege.sql). Re-applied because a function
-- file that drops and re-creates a function loses its grants, and because a deployment may grant
-- EXECUTE on new functions by default (Supabase grants it in public to anon and authenticated): every
-- other grant on a project function, PUBLIC's included, is revoked here.
-- The project's functions are those with kommo in their name, and 0001's trigger function
-- zoho_outbox_enqueue; kommo_assets_tests/db/test_privileges.py
-- fails on a function in the schema that breaks the rule or that PUBLIC may execute.
DO $$
DECLARE
    v_function regprocedure;
    v_grantee text;
BEGIN
    FOR v_function, v_grantee IN
        SELECT DISTINCT p.oid::regprocedure,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END
          FROM pg_proc p
         CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
          LEFT JOIN pg_roles r ON r.oid = a.grantee
         WHERE p.pronamespace = current_schema()::regnamespace
           AND (p.proname LIKE '%kommo%' OR p.proname = 'zoho_outbox_enqueue')
           AND a.grantee <> p.proowner
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
    LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', v_function, v_grantee);
    END LOOP;
END;
$$;

GRANT EXECUTE ON FUNCTION request_kommo_refresh(uuid, integer), kommo_refresh_request_status(bigint, uuid)
    TO kommo_app;
