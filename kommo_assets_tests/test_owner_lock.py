"""The import run's owner lock spans the whole Dagster run: the Postgres resource takes it once as the run
starts, on a connection of its own, holds it through every step and the moments between them, and lets
it go when the run ends. Sensors and schedules, which are no run, take none."""

import dagster as dg

from kommo_assets.definitions import defs
from kommo_assets.resources.postgres import PostgresResource, import_run_id
from kommo_assets_tests.helpers import fetch_all, fetch_one

OWNERS_SQL = """
SELECT l.pid, a.application_name
  FROM pg_locks l JOIN pg_stat_activity a USING (pid)
 WHERE l.locktype = 'advisory' AND l.granted AND l.classid = kommo_lock_key('import_owner')
   AND l.objid = hashtext(%s)::oid
"""


def _owners(url: str, run_id: str) -> list[tuple]:
    return fetch_all(url, OWNERS_SQL, (run_id,))


def test_one_session_holds_the_owner_lock_from_the_first_step_to_the_last(database_url):
    seen: dict[str, list[tuple]] = {}

    def observe(context: dg.AssetExecutionContext, postgres: PostgresResource) -> None:
        run_id = import_run_id(context.run)
        seen[context.op_def.name] = _owners(postgres.database_url, run_id)
        with postgres.connect() as conn:
            alive = conn.execute("SELECT kommo_import_run_owner_alive(%s::uuid)", (run_id,)).fetchone()[0]
        assert alive

    @dg.asset
    def first(context: dg.AssetExecutionContext, postgres: PostgresResource) -> None:
        observe(context, postgres)

    @dg.asset(deps=[first])
    def second(context: dg.AssetExecutionContext, postgres: PostgresResource) -> None:
        # a step working on the run uses the run's lock, not one of its own
        with postgres.owning(import_run_id(context.run)):
            observe(context, postgres)

    job = dg.Definitions(assets=[first, second], resources={"postgres": PostgresResource(database_url=database_url)},
                         executor=defs.executor).resolve_implicit_global_asset_job_def()
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(instance=instance)
    assert result.success
    assert len(seen["first"]) == 1 and seen["first"] == seen["second"], seen
    assert seen["first"][0][1] == "kommo-assets owner"
    assert _owners(database_url, result.run_id) == []  # let go when the run ended
    assert fetch_one(database_url, "SELECT kommo_import_run_owner_alive(%s::uuid)", (result.run_id,)) == (False,)


def test_resources_built_outside_a_run_take_no_owner_lock(database_url):
    """What sensors and schedules do: no run, no lock."""
    with dg.build_resources({"postgres": PostgresResource(database_url=database_url)}) as resources:
        with resources.postgres.connect() as conn:
            conn.execute("SELECT 1")
        held = fetch_one(database_url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                         " AND classid = kommo_lock_key('import_owner')")[0]
    assert held == 0


def test_the_owner_lock_is_taken_again_if_the_database_dropped_it(database_url):
    """A restart between two steps drops the owner's session: the next step takes the lock again."""
    postgres = PostgresResource(database_url=database_url)
    run = dg.DagsterRun(job_name="t", run_id="6f1b7c1e-3a52-4b8e-9d0a-0c1b2d3e4f50")
    with dg.build_resources({"postgres": postgres}, dagster_run=run) as resources:
        owned = resources.postgres
        (pid, _), = _owners(database_url, run.run_id)
        fetch_one(database_url, "SELECT pg_terminate_backend(%s)", (pid,))
        with owned.owning(run.run_id):
            (new_pid, _), = _owners(database_url, run.run_id)
        assert new_pid != pid
    assert _owners(database_url, run.run_id) == []
