"""Least privilege in the app's database, from the catalog and as real roles: no project function is
executable by PUBLIC (nor by any role a deployment grants new functions to), and the app's role, created
as the deployment guide says, can request a refresh and poll it and do nothing else."""

import uuid

import psycopg
import pytest
from psycopg import sql

from kommo_assets.db import refresh_requests
from kommo_assets.db.migrate import migrate
from kommo_assets.settings import refresh_scope
from kommo_assets_tests.helpers import PRODUCTION_TABLES, fetch_all, fetch_one

APP_GROUP = "kommo_app"
ENTRY_POINTS = {"request_kommo_refresh(uuid,integer)", "kommo_refresh_request_status(bigint,uuid)"}
# created by the migrations as a stand-in for the app's own outbox trigger; the rest are the project's
APP_STAND_INS = {"zoho_outbox_enqueue()"}

# Every function of the schema (extensions aside) with every role that may execute it other than its owner
# (grantee 0 is PUBLIC).
GRANTS = """
SELECT p.oid::regprocedure::text, p.proname, a.grantee, coalesce(r.rolname, 'PUBLIC')
  FROM pg_proc p
 CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
  LEFT JOIN pg_roles r ON r.oid = a.grantee
 WHERE p.pronamespace = current_schema()::regnamespace
   AND a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner
   AND NOT EXISTS (SELECT 1 FROM pg_depend d
                    WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
"""


def _execute(url: str, statement) -> None:
    with psycopg.connect(url) as conn:
        conn.execute(statement)


def _functions(url: str) -> set[str]:
    return {r[0] for r in fetch_all(url, """
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = current_schema()::regnamespace
           AND NOT EXISTS (SELECT 1 FROM pg_depend d
                            WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')""")}


def _registered(url: str) -> set[str]:
    """The functions the project created, as it recorded them (kommo_schema_objects)."""
    return {r[0] for r in fetch_all(url, """
        SELECT p.oid::regprocedure::text FROM kommo_schema_objects o JOIN pg_proc p ON p.oid = o.objid
         WHERE o.classid = 'pg_proc'::regclass""")}


def assert_least_privilege(url: str) -> None:
    """Generic over the catalog, so it covers functions added later too."""
    functions = _functions(url)
    assert len(functions) > 20 and ENTRY_POINTS <= functions
    assert _registered(url) == functions, "every function of a schema holding only the project's is registered"
    grants = {(function, role) for function, _, _, role in fetch_all(url, GRANTS)}
    assert {g for g in grants if g[1] == "PUBLIC"} == set()
    assert grants == {(function, APP_GROUP) for function in ENTRY_POINTS}
    for function, definer, config in fetch_all(url, """
            SELECT p.oid::regprocedure::text, prosecdef, proconfig FROM pg_proc p
             WHERE p.pronamespace = current_schema()::regnamespace"""):
        assert definer == (function in ENTRY_POINTS), function
        assert "search_path=public, pg_temp" in (config or []), function


@pytest.fixture
def roles(pg_admin_url):
    """Login and group roles made for one test, dropped after its database (they are server-wide)."""
    made: list[str] = []

    def make(prefix: str, options: str = "NOLOGIN") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE {} " + options).format(sql.Identifier(name)))
        made.append(name)
        return name

    yield make
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def test_no_project_function_is_executable_by_public(database_url):
    assert_least_privilege(database_url)


def test_functions_the_owner_adds_later_keep_their_defaults_through_migrate(database_url):
    # The project changes no default privilege and sweeps nothing by name: a function the migrating role
    # creates afterwards (kommo in its name or not, in public or in a schema of its own) keeps PUBLIC's EXECUTE,
    # and so do the grants the app makes on it, through every migrate.
    _execute(database_url, "CREATE FUNCTION kommo_added_later() RETURNS int LANGUAGE sql AS 'SELECT 1';"
                           "CREATE SCHEMA private;"
                           "CREATE FUNCTION private.is_staff() RETURNS boolean LANGUAGE sql AS 'SELECT true'")
    for _ in range(2):
        assert ("kommo_added_later()", "PUBLIC") in {(r[0], r[3]) for r in fetch_all(database_url, GRANTS)}
        assert fetch_one(database_url, "SELECT has_function_privilege('public', 'private.is_staff()', 'EXECUTE')"
                         " AND has_function_privilege('public', 'kommo_added_later()', 'EXECUTE')")[0]
        assert fetch_one(database_url, "SELECT proconfig FROM pg_proc WHERE proname = 'kommo_added_later'")[0] is None
        assert migrate(database_url).applied == []
    assert fetch_one(database_url, "SELECT count(*) FROM pg_default_acl")[0] == 0


def test_the_catalog_check_sees_a_function_left_open(database_url):
    _execute(database_url, "GRANT EXECUTE ON FUNCTION kommo_restore_foreign_keys(text[]) TO PUBLIC")
    with pytest.raises(AssertionError):
        assert_least_privilege(database_url)


def test_migrate_closes_what_a_deployment_or_an_old_schema_left_open(roles, pg_admin_url, empty_database_url):
    # Supabase grants EXECUTE on every new function in public to its API roles
    anon = roles("anon")
    _execute(empty_database_url, sql.SQL("ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT EXECUTE ON FUNCTIONS "
                                         "TO {}").format(sql.Identifier(anon)))
    migrate(empty_database_url)
    assert_least_privilege(empty_database_url)
    # a schema from before (functions executable by PUBLIC), a grant added by hand: the next migrate
    _execute(empty_database_url, sql.SQL(
        "GRANT EXECUTE ON FUNCTION run_kommo_full_refresh(uuid), sync_kommo_runtime_flag(text, boolean) TO PUBLIC;"
        "GRANT EXECUTE ON FUNCTION kommo_restore_foreign_keys(text[]) TO {}").format(sql.Identifier(anon)))
    assert migrate(empty_database_url).applied == []
    assert_least_privilege(empty_database_url)


@pytest.fixture
def app(roles, database_url, staff_user):
    """The app's login role exactly as the deployment guide creates it: a plain login role (not a
    superuser, no other grants) that is a member of kommo_app."""
    role = roles("app", "LOGIN")
    _execute(database_url, sql.SQL("GRANT {} TO {}").format(sql.Identifier(APP_GROUP), sql.Identifier(role)))
    assert fetch_one(database_url, "SELECT rolsuper, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = %s",
                     (role,)) == (False, False, False)
    refresh_requests.sync_flag(database_url, refresh_requests.LIVE_FLAG, True)
    refresh_requests.sync_settings(database_url, {refresh_requests.YEARS_SETTING: refresh_scope({}).as_json(),
                                               refresh_requests.COOLDOWN_SETTING: 10})
    conn = psycopg.connect(psycopg.conninfo.make_conninfo(database_url, user=role), autocommit=True)
    assert conn.execute("SELECT current_user").fetchone()[0] == role
    yield conn
    conn.close()


@pytest.fixture
def staff_user(database_url) -> uuid.UUID:
    user = uuid.uuid4()
    fetch_one(database_url, "INSERT INTO kommo_refresh_staff (user_id) VALUES (%s) RETURNING 1", (user,))
    return user


def _as_user(conn: psycopg.Connection, user: uuid.UUID, query: str, params=()):
    """One transaction of the app server: it names its signed-in user, then calls."""
    with conn.transaction():
        conn.execute("SELECT set_config('kommo.user_id', %s, true)", (str(user),))
        return conn.execute(query, params).fetchone()


def test_the_app_role_can_request_and_poll(app, database_url, staff_user):
    request_id, accepted = _as_user(app, staff_user, "SELECT id, accepted FROM request_kommo_refresh()")
    assert accepted
    status = _as_user(app, staff_user, "SELECT kommo_refresh_request_status(%s)", (request_id,))[0]
    assert status["request_id"] == request_id and status["status"] == "pending" and "requested_by" not in status
    assert fetch_one(database_url, "SELECT requested_by FROM kommo_refresh_requests")[0] == staff_user
    # Supabase: PostgREST names the user in the request's JWT claims
    with app.transaction():
        app.execute("SELECT set_config('request.jwt.claims', %s, true)", (f'{{"sub": "{staff_user}"}}',))
        assert app.execute("SELECT kommo_refresh_request_status(%s)", (request_id,)).fetchone()[0] == status


def test_the_app_role_cannot_act_as_another_user(app, database_url, staff_user):
    stranger = uuid.uuid4()
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not the signed-in user"):
        _as_user(app, stranger, "SELECT id FROM request_kommo_refresh(%s)", (staff_user,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not staff"):
        _as_user(app, stranger, "SELECT id FROM request_kommo_refresh()")
    request_id = _as_user(app, staff_user, "SELECT id FROM request_kommo_refresh()")[0]
    assert _as_user(app, stranger, "SELECT kommo_refresh_request_status(%s)", (request_id,))[0] is None
    # its own objects cannot stand in for the ones the functions use (search_path is pinned)
    app.execute("CREATE TEMP TABLE kommo_refresh_staff (user_id uuid)")
    app.execute("INSERT INTO kommo_refresh_staff VALUES (%s)", (stranger,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="is not staff"):
        _as_user(app, stranger, "SELECT id FROM request_kommo_refresh()")
    assert fetch_one(database_url, "SELECT count(*) FROM kommo_refresh_requests")[0] == 1


TABLES = ("kommo_refresh_requests", "kommo_refresh_staff", "kommo_runtime_flags", "kommo_runtime_settings",
          "kommo_import_runs", "stg_kommo_leads", "stg_kommo_contacts", "stg_kommo_booking_vehicles",
          "schema_migrations", "kommo_user_map", "kommo_status_map", "kommo_source_map", *PRODUCTION_TABLES)


@pytest.mark.parametrize("statement", ["SELECT * FROM {}", "DELETE FROM {}", "INSERT INTO {} DEFAULT VALUES"])
def test_the_app_role_has_no_table_privileges(app, database_url, statement):
    for table in TABLES:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            app.execute(sql.SQL(statement).format(sql.Identifier(table)))
    assert fetch_one(database_url, "SELECT count(*) FROM kommo_refresh_requests")[0] == 0


def test_the_app_role_can_call_no_other_project_function(app, database_url, staff_user):
    role = app.execute("SELECT current_user").fetchone()[0]
    callable_ = {r[0] for r in fetch_all(database_url, """
        SELECT p.oid::regprocedure::text FROM pg_proc p
         WHERE p.pronamespace = current_schema()::regnamespace AND has_function_privilege(%s, p.oid, 'EXECUTE')""",
                                         (role,))}
    assert callable_ == ENTRY_POINTS
    for call in ("SELECT kommo_restore_foreign_keys(ARRAY['DROP TABLE bookings CASCADE'])",
                 "SELECT sync_kommo_runtime_flag('KOMMO_ENABLE_LIVE', true)",
                 "SELECT * FROM claim_kommo_refresh_requests(0)",
                 "SELECT run_kommo_full_refresh('00000000-0000-0000-0000-000000000000')",
                 "SELECT * FROM kommo_snapshot('00000000-0000-0000-0000-000000000000')",
                 "SELECT prune_kommo_staging('0 days', '0 days')",
                 "SELECT kommo_refresh_caller(NULL)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function"):
            app.execute(call)
    assert fetch_one(database_url, "SELECT to_regclass('bookings') IS NOT NULL")[0]
