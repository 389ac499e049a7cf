-- Shut by default, acting only on what the project created (docs/security.md, "Deploying on Supabase").
--
-- 1. The objects the project created are registered in kommo_schema_objects (made by kommo-assets migrate,
--    which from now on registers what each migration and function file creates, and shuts it in the same
--    transaction: sql/privileges.sql). Register here what the migrations before this one created, and every
--    function the function files have ever defined that still exists (older signatures included), so the
--    first migrate with this migration shuts all of them, on a database set up before it too.
--    By name, once, within this schema: names the project itself used; nothing is matched by a pattern.
INSERT INTO kommo_schema_objects (classid, objid, identity)
SELECT 'pg_class'::regclass, c.oid, (pg_identify_object('pg_class'::regclass, c.oid, 0)).identity
  FROM pg_class c
 WHERE c.relnamespace = current_schema()::regnamespace
   AND c.relkind IN ('r', 'p', 'v', 'S')
   AND c.relname IN ('clients', 'vehicles', 'sales_leads', 'bookings', 'booking_vehicles', 'calendar_events',
                     'kommo_user_map', 'kommo_status_map', 'kommo_source_map', 'zoho_outbox', 'zoho_outbox_id_seq',
                     'kommo_import_runs', 'stg_kommo_leads', 'stg_kommo_contacts', 'stg_kommo_booking_vehicles',
                     'stg_kommo_field_options', 'kommo_refresh_staff', 'kommo_runtime_flags',
                     'kommo_refresh_requests', 'kommo_refresh_requests_id_seq', 'kommo_runtime_settings',
                     'kommo_sync_state', 'stg_kommo_lead_removals', 'calendar_events_expanded',
                     'schema_migrations', 'kommo_schema_objects')
UNION ALL
SELECT 'pg_proc'::regclass, p.oid, (pg_identify_object('pg_proc'::regclass, p.oid, 0)).identity
  FROM pg_proc p
 WHERE p.pronamespace = current_schema()::regnamespace
   AND p.proname IN ('zoho_outbox_enqueue', 'claim_kommo_refresh_requests', 'close_kommo_import_run',
                     'finish_kommo_import_run', 'kommo_apply_snapshot', 'kommo_change_preview', 'kommo_drop_guard',
                     'kommo_holds_lock', 'kommo_import_run_owner_alive', 'kommo_increment_preview',
                     'kommo_increment_scope', 'kommo_is_bulk_load', 'kommo_lead_code', 'kommo_lock_key',
                     'kommo_owned', 'kommo_refresh_caller', 'kommo_refresh_request_finished',
                     'kommo_refresh_request_started', 'kommo_refresh_request_status', 'kommo_restore_foreign_keys',
                     'kommo_runtime_setting', 'kommo_snapshot', 'kommo_snapshot_clients', 'kommo_snapshot_preview',
                     'kommo_staging_warnings', 'kommo_suspend_foreign_keys', 'kommo_sync_cursor',
                     'kommo_unknown_lock_key', 'lock_running_kommo_import_run', 'prune_kommo_staging',
                     'refuse_kommo_refresh_requests', 'request_kommo_refresh', 'run_kommo_full_refresh',
                     'run_kommo_increment', 'start_kommo_import_run', 'sync_kommo_runtime_flag',
                     'sync_kommo_runtime_setting')
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
ON CONFLICT (classid, objid) DO NOTHING;

-- 2. Migration 0008 set ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC for the migrating
--    role, in every schema: functions the app created afterwards (an RLS helper such as private.is_staff())
--    were then executable by nobody but their owner. The project no longer changes default privileges (its
--    own functions are shut one by one, sql/privileges.sql): give PUBLIC back what 0008 took, for this role,
--    only where 0008's revocation is still in place.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_default_acl d
                WHERE d.defaclrole = current_user::regrole AND d.defaclnamespace = 0 AND d.defaclobjtype = 'f'
                  AND NOT EXISTS (SELECT 1 FROM aclexplode(d.defaclacl) a
                                   WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE')) THEN
        ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO PUBLIC;
    END IF;
END;
$$;

-- 3. Migration 0004's closing comment (grant the app's role SELECT/INSERT on the request tables) is void:
--    the app's role needs no table privilege at all, and whatever is granted on the internals is revoked by
--    the next migrate. The app gets EXECUTE on the two entry points, nothing else (docs/security.md).
