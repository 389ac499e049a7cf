"""The project on a database set up as Supabase sets one up, called as PostgREST calls it.

A PostgreSQL server of its own (roles are server-wide, and ``authenticated`` existing changes who gets the
entry points): ``anon`` and ``authenticated`` NOLOGIN NOINHERIT, ``service_role`` NOLOGIN NOINHERIT
BYPASSRLS, ``authenticator`` LOGIN NOINHERIT holding the three, a non-superuser owner with CREATEROLE that
migrates and runs the import, Supabase's default privileges (ALL on every table, function and sequence the
owner creates in public, to the three API roles), USAGE on public for them, an ``auth`` schema whose
``auth.uid()`` / ``auth.jwt()`` read ``request.jwt.claims``, and ``pgrst.db_schemas = 'public'``.

Every API call logs in as ``authenticator`` and, per transaction, switches role with ``SET LOCAL ROLE`` and
sets ``request.jwt.claims`` transaction-locally, as PostgREST does. The linter checks at the end are our own
queries, written from the public definitions of the security rules of Supabase's linter (splinter).
"""

import json
import shutil
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from kommo_assets.db import refresh_requests
from kommo_assets.db.migrate import migrate
from kommo_assets.dev.local_postgres import LocalPostgres
from kommo_assets.dev.simulator import KommoSimulator, SimulatorConfig
from kommo_assets.settings import refresh_scope
from kommo_assets_tests.helpers import run_job, url_for_database

OWNER = "supa_owner"  # Supabase's "postgres": owns the app, migrates, is not a superuser
DATABASE = "supa"
ENTRY_POINTS = {"public.request_kommo_refresh", "public.kommo_refresh_request_status"}

SUPABASE_SETUP = f"""
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
CREATE ROLE {OWNER} LOGIN CREATEROLE;
"""

DATABASE_SETUP = f"""
ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
CREATE SCHEMA auth;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role, {OWNER};
CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                    nullif(current_setting('request.jwt.claims', true), ''))::jsonb
$$;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
    SELECT nullif(coalesce(current_setting('request.jwt.claim.sub', true),
                           current_setting('request.jwt.claims', true)::jsonb ->> 'sub'), '')::uuid
$$;
GRANT EXECUTE ON FUNCTION auth.jwt(), auth.uid() TO anon, authenticated, service_role;
ALTER DATABASE {DATABASE} SET pgrst.db_schemas = 'public';
"""


class Supabase:
    def __init__(self, admin_url: str):
        self.admin_url = admin_url
        self.owner_url = psycopg.conninfo.make_conninfo(url_for_database(admin_url, DATABASE), user=OWNER)
        self.api_url = psycopg.conninfo.make_conninfo(self.owner_url, user="authenticator")

    def owner(self, query, params=None):
        with psycopg.connect(self.owner_url) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else None

    def api(self, role: str, user: uuid.UUID | None, query, params=None):
        """One PostgREST request: log in as authenticator, switch role, claims for this transaction."""
        claims = {"role": role, **({"sub": str(user)} if user else {})}
        with psycopg.connect(self.api_url) as conn, conn.transaction():
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            conn.execute("SELECT set_config('request.jwt.claims', %s, true), set_config('request.method', 'POST', true)",
                         (json.dumps(claims),))
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else cur.rowcount


@pytest.fixture(scope="module")
def supabase():
    root = Path(tempfile.mkdtemp(prefix="kommo-supabase-pg-"))
    server = LocalPostgres(root / "data", durable=False)
    server.start()
    try:
        admin = server.url("postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(SUPABASE_SETUP)
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(DATABASE), sql.Identifier(OWNER)))
        with psycopg.connect(url_for_database(admin, DATABASE), autocommit=True) as conn:
            conn.execute(DATABASE_SETUP)
        env = Supabase(admin)
        assert env.owner("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") == [(False,)]
        migrate(env.owner_url)
        # a refresh, run by the owner as the code location runs it
        sim = KommoSimulator(SimulatorConfig(leads=120, seed=17, token=f"supa-{uuid.uuid4().hex}"))
        with sim, pytest.MonkeyPatch.context() as mp:
            mp.setenv("KOMMO_DATABASE_URL", env.owner_url)
            mp.setenv("KOMMO_BASE_URL", sim.base_url)
            mp.setenv("KOMMO_ACCESS_TOKEN", sim.config.token)
            mp.setenv("KOMMO_ENABLE_LIVE", "1")
            for name in ("KOMMO_ENABLE_SLACK_ALERTS", "KOMMO_SNAPSHOT_DIR"):
                mp.delenv(name, raising=False)
            assert run_job("kommo_full_refresh_job").success
        assert env.owner("SELECT count(*) FROM bookings")[0][0] > 0
        env.owner("INSERT INTO calendar_events (title, start_at, end_at) VALUES ('private', now(), now())")
        refresh_requests.sync_flag(env.owner_url, refresh_requests.LIVE_FLAG, True)
        refresh_requests.sync_settings(env.owner_url, {refresh_requests.YEARS_SETTING: refresh_scope({}).as_json(),
                                                    refresh_requests.COOLDOWN_SETTING: 10})
        yield env
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


def _relations(env: Supabase) -> list[tuple[str, str, str]]:
    """(name, kind, a column) of every relation the project created, as it recorded them."""
    return env.owner("""
        SELECT c.oid::regclass::text, c.relkind::text,
               (SELECT quote_ident(a.attname) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                   AND NOT a.attisdropped ORDER BY a.attnum LIMIT 1)
          FROM kommo_schema_objects o JOIN pg_class c ON c.oid = o.objid
         WHERE o.classid = 'pg_class'::regclass ORDER BY 1""")


def _contents(env: Supabase) -> dict[str, str]:
    return {name: env.owner(sql.SQL("SELECT md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) FROM {} t")
                            .format(sql.SQL(name)))[0][0]
            for name, kind, _ in _relations(env) if kind != "S"}


def assert_anon_and_non_staff_reach_nothing(env: Supabase) -> None:
    relations = _relations(env)
    names = {name for name, _, _ in relations}
    assert {"stg_kommo_contacts", "kommo_refresh_requests", "kommo_refresh_staff", "kommo_import_runs",
            "schema_migrations", "kommo_sync_state", "bookings", "calendar_events_expanded"} <= names
    # every relation in public is the project's here: the registry missed none
    assert {r[0] for r in env.owner("SELECT oid::regclass::text FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                                    " AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f')")} == names
    before = _contents(env)
    assert env.owner("SELECT count(*) FROM stg_kommo_contacts")[0][0] > 0  # there is something to steal
    for role, user in (("anon", None), ("authenticated", uuid.uuid4())):
        for name, kind, column in relations:
            ident = sql.SQL(name)
            if kind == "S":
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    env.api(role, user, sql.SQL("SELECT nextval({})").format(sql.Literal(name)))
                continue
            try:
                assert env.api(role, user, sql.SQL("SELECT * FROM {}").format(ident)) == [], (role, name)
            except psycopg.errors.InsufficientPrivilege:
                pass
            statements = [sql.SQL("INSERT INTO {} DEFAULT VALUES").format(ident),
                          sql.SQL("UPDATE {0} SET {1} = {1}").format(ident, sql.SQL(column)),
                          sql.SQL("DELETE FROM {}").format(ident),
                          sql.SQL("TRUNCATE {}").format(ident)]
            for statement in statements:
                with pytest.raises(psycopg.errors.InsufficientPrivilege if kind == "r" else psycopg.Error):
                    env.api(role, user, statement)
        # the two rules that matter most, with real values
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            env.api(role, user, "INSERT INTO kommo_refresh_staff (user_id) VALUES (%s)", (user or uuid.uuid4(),))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            env.api(role, user, "INSERT INTO kommo_refresh_requests (requested_by, year) VALUES (%s, 2031)",
                    (user or uuid.uuid4(),))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function"):
        env.api("anon", None, "SELECT * FROM request_kommo_refresh()")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not staff"):
        env.api("authenticated", uuid.uuid4(), "SELECT * FROM request_kommo_refresh()")
    # what each API role may execute of the project's functions: authenticated the two entry points only
    for role, expected in (("anon", set()), ("service_role", set()), ("authenticated", ENTRY_POINTS)):
        executable = {r[0] for r in env.owner("""
            SELECT p.pronamespace::regnamespace || '.' || p.proname
              FROM kommo_schema_objects o JOIN pg_proc p ON p.oid = o.objid
             WHERE o.classid = 'pg_proc'::regclass AND has_function_privilege(%s, p.oid, 'EXECUTE')""", (role,))}
        assert executable == expected, role
    assert _contents(env) == before


# --- the linter's security rules, our own queries ---------------------------------------------------

# Schemas PostgREST exposes (pgrst.db_schemas, 'public' when unset), and schemas the platform owns.
EXPOSED = ("ARRAY(SELECT btrim(s) FROM unnest(string_to_array(coalesce(nullif(current_setting('pgrst.db_schemas', true),"
           " ''), 'public'), ',')) s)")
PLATFORM = ("'pg_catalog', 'information_schema', 'auth', 'storage', 'realtime', 'extensions', 'graphql', "
            "'graphql_public', 'vault', 'pgsodium', 'supabase_functions', 'supabase_migrations', 'cron', 'net'")
SENSITIVE = ("'password', 'passwd', 'secret', 'token', 'access_token', 'refresh_token', 'api_key', 'jwt', 'ssn', "
             "'passport', 'passport_number', 'national_id', 'tax_id', 'credit_card', 'card_number', 'iban', 'email', "
             "'phone', 'payload', 'raw', 'documents'")
LINT = f"""
WITH exposed AS (SELECT n.oid, n.nspname FROM pg_namespace n WHERE n.nspname::text = ANY ({EXPOSED})),
user_functions AS (
    SELECT p.oid, n.nspname, p.proname, p.prosecdef, p.proconfig
      FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
     WHERE n.nspname NOT IN ({PLATFORM}) AND n.nspname !~ '^pg_'
       AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                                   AND d.deptype = 'e'))
-- a table PostgREST serves without row level security
SELECT 'rls_disabled_in_public' AS rule, e.nspname || '.' || c.relname AS object
  FROM pg_class c JOIN exposed e ON e.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND NOT c.relrowsecurity
UNION ALL
-- a view PostgREST serves that reads its tables with its owner's rights
SELECT 'security_definer_view', e.nspname || '.' || c.relname
  FROM pg_class c JOIN exposed e ON e.oid = c.relnamespace
 WHERE c.relkind = 'v' AND NOT coalesce('security_invoker=true' = ANY (c.reloptions)
                                         OR 'security_invoker=on' = ANY (c.reloptions), false)
UNION ALL
-- a function whose name resolution follows the caller's search_path
SELECT 'function_search_path_mutable', f.nspname || '.' || f.proname
  FROM user_functions f
 WHERE NOT EXISTS (SELECT 1 FROM unnest(f.proconfig) s WHERE s LIKE 'search_path=%')
UNION ALL
-- a function running with its owner's rights that the API's roles may call
SELECT r.role || '_security_definer_function_executable', f.nspname || '.' || f.proname
  FROM user_functions f CROSS JOIN (VALUES ('anon'), ('authenticated')) r(role)
 WHERE f.prosecdef AND has_function_privilege(r.role, f.oid, 'EXECUTE')
UNION ALL
-- columns that look personal or secret in a relation the API's roles may read, unguarded by RLS
SELECT DISTINCT 'sensitive_columns_exposed', e.nspname || '.' || c.relname
  FROM pg_class c JOIN exposed e ON e.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
   AND (has_any_column_privilege('anon', c.oid, 'SELECT') OR has_any_column_privilege('authenticated', c.oid, 'SELECT'))
   AND CASE WHEN c.relkind = 'v' THEN NOT coalesce('security_invoker=true' = ANY (c.reloptions), false)
            ELSE NOT c.relrowsecurity END
   AND replace(lower(a.attname), '-', '_') IN ({SENSITIVE})
"""


def lint(env: Supabase) -> set[tuple[str, str]]:
    return {tuple(r) for r in env.owner(LINT)}


ALLOWED = {("authenticated_security_definer_function_executable", name) for name in ENTRY_POINTS}


# --- the tests -----------------------------------------------------------------------------------------


def test_anon_and_a_signed_in_user_who_is_not_staff_reach_nothing(supabase):
    assert_anon_and_non_staff_reach_nothing(supabase)


def test_the_linter_rules_find_nothing_beyond_the_entry_points(supabase):
    assert lint(supabase) == ALLOWED


def test_the_linter_queries_see_what_they_look_for(supabase):
    # Each rule on an object built to break it (in a transaction rolled back: nothing stays).
    with psycopg.connect(supabase.owner_url) as conn:
        conn.execute("""
            CREATE TABLE leaky (id int, email text);
            CREATE VIEW leaky_view AS SELECT * FROM leaky;
            CREATE FUNCTION leaky_fn() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1';""")
        found = {tuple(r) for r in conn.execute(LINT).fetchall()}
        conn.rollback()
    assert {("rls_disabled_in_public", "public.leaky"), ("security_definer_view", "public.leaky_view"),
            ("function_search_path_mutable", "public.leaky_fn"),
            ("anon_security_definer_function_executable", "public.leaky_fn"),
            ("authenticated_security_definer_function_executable", "public.leaky_fn"),
            ("sensitive_columns_exposed", "public.leaky"),
            ("sensitive_columns_exposed", "public.leaky_view")} <= found


def _staff(env: Supabase) -> uuid.UUID:
    user = uuid.uuid4()
    env.owner("INSERT INTO kommo_refresh_staff (user_id) VALUES (%s)", (user,))
    return user


def assert_staff_request_and_poll(env: Supabase) -> None:
    env.owner("UPDATE kommo_refresh_requests SET status = 'refused', finished_at = now() - interval '1 day'"
              " WHERE status IN ('pending', 'queued', 'running') OR finished_at IS NOT NULL")
    env.owner("UPDATE kommo_import_runs SET finished_at = now() - interval '1 day' WHERE finished_at IS NOT NULL")
    staff, other = _staff(env), _staff(env)
    cols = "id, accepted, status, run_id, requested_at, message"
    [(request_id, accepted, status, _, _, _)] = env.api("authenticated", staff,
                                                        f"SELECT {cols} FROM request_kommo_refresh()")
    assert accepted and status == "pending"
    [(polled,)] = env.api("authenticated", staff, "SELECT kommo_refresh_request_status(%s)", (request_id,))
    assert polled["request_id"] == request_id and polled["status"] == "pending" and "requested_by" not in polled
    # another staff user learns nothing of it: not by polling, not from the refusal
    assert env.api("authenticated", other, "SELECT kommo_refresh_request_status(%s)", (request_id,)) == [(None,)]
    [(other_id, accepted, _, run_id, requested_at, message)] = env.api(
        "authenticated", other, f"SELECT {cols} FROM request_kommo_refresh()")
    assert (other_id, accepted, run_id, requested_at) == (None, False, None, None)
    assert "#" not in message and "someone else" in message
    # nor does anon
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        env.api("anon", staff, "SELECT kommo_refresh_request_status(%s)", (request_id,))


def test_a_staff_user_requests_and_polls_through_the_api(supabase):
    assert_staff_request_and_poll(supabase)


def test_a_function_the_owner_adds_later_stays_executable_after_migrate(supabase):
    supabase.owner("""
        CREATE SCHEMA private;
        GRANT USAGE ON SCHEMA private TO authenticated;
        CREATE FUNCTION private.is_staff() RETURNS boolean LANGUAGE sql STABLE SET search_path = ''
            AS $$ SELECT auth.uid() IS NOT NULL $$;
        CREATE FUNCTION public.kommo_app_greeting() RETURNS text LANGUAGE sql STABLE SET search_path = ''
            AS $$ SELECT 'hello' $$;""")
    user = uuid.uuid4()
    for _ in range(2):
        assert supabase.api("authenticated", user, "SELECT private.is_staff(), public.kommo_app_greeting()") == [
            (True, "hello")]
        assert migrate(supabase.owner_url).applied == []
    # the owner's own objects are not the project's
    assert supabase.owner("SELECT count(*) FROM kommo_schema_objects o JOIN pg_proc p ON p.oid = o.objid"
                          " WHERE p.proname IN ('is_staff', 'kommo_app_greeting')") == [(0,)]
    supabase.owner("DROP FUNCTION public.kommo_app_greeting()")


def test_all_of_it_again_after_a_second_migrate(supabase):
    assert migrate(supabase.owner_url).applied == []
    assert_anon_and_non_staff_reach_nothing(supabase)
    assert lint(supabase) == ALLOWED
    assert_staff_request_and_poll(supabase)


def test_an_existing_kommo_app_that_can_log_in_is_refused(supabase):
    with psycopg.connect(supabase.admin_url, autocommit=True) as admin:
        admin.execute("ALTER ROLE kommo_app LOGIN")
        try:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="role kommo_app can log in"):
                migrate(supabase.owner_url)
        finally:
            admin.execute("ALTER ROLE kommo_app NOLOGIN")
    assert supabase.owner("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'kommo_app'") == [(False,)]
