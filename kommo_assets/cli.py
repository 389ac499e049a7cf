"""``kommo-assets``: migrate the schema, run a refresh on the embedded default, serve the simulator."""

import argparse
import json
import os
import sys
from pathlib import Path

from kommo_assets.kommo.errors import redact
from kommo_assets.scope import current_year
from kommo_assets.settings import ConfigError, database_url, refresh_scope


def _secrets() -> list[str]:
    """What no message of the CLI may print: the database password (every form), the Kommo and Slack tokens."""
    from kommo_assets.resources.postgres import database_secrets

    url = os.environ.get("KOMMO_DATABASE_URL", "")
    tokens = [os.environ.get(name, "").strip() for name in ("KOMMO_ACCESS_TOKEN", "SLACK_BOT_TOKEN")]
    return [*database_secrets(url), *(token for token in tokens if token)]


def _database_url() -> str:
    """KOMMO_DATABASE_URL, checked as the code location's resource checks it."""
    from kommo_assets.resources.postgres import validate_database_url

    return validate_database_url(database_url())


def _migrate(args: argparse.Namespace) -> int:
    from kommo_assets.db.migrate import migrate

    result = migrate(_database_url())
    print(f"applied {len(result.applied)} migrations {result.applied}; re-applied {len(result.functions)} function files")
    return 0


def _run(args: argparse.Namespace) -> int:
    import dagster as dg

    from kommo_assets.db import connect
    from kommo_assets.db.runs import get_run
    from kommo_assets.db.windows import coverage
    from kommo_assets.definitions import defs
    from kommo_assets.dev.dagster_dev import prepare_instance
    from kommo_assets.dev.environment import start_local_environment
    from kommo_assets.jobs import DRY_RUN_JOB, FULL_REFRESH_JOB

    scope = refresh_scope()
    year = current_year() if args.year is None else args.year
    if not scope.contains(year):
        raise ConfigError(f"year {year} is not in scope (KOMMO_REFRESH_YEARS={scope}): pick one of "
                          f"{', '.join(map(str, scope.years())) or 'none yet'}")
    if os.environ.get("KOMMO_DATABASE_URL", "").strip():
        _database_url()
    home = Path(args.home).resolve()
    env = start_local_environment(home, leads=args.leads)
    for note in env.notes:
        print(f"* {note}")
    job_name = DRY_RUN_JOB if args.dry_run else FULL_REFRESH_JOB
    config = {"max_drop_ratio": args.max_drop_ratio}
    print(f"* running {job_name} for {year} (partition {year}; years in scope: {scope}) ...")
    try:
        # The Dagster instance of DAGSTER_HOME when set, else the one `kommo-assets dev` serves: either way
        # the run, its materializations and checks are in a UI afterwards.
        if os.environ.get("DAGSTER_HOME", "").strip():
            print(f"* Dagster instance: DAGSTER_HOME ({os.environ['DAGSTER_HOME']})")
        else:
            local = prepare_instance(home, env)
            print(f"* {local.note}; the run is recorded there for `make dev`")
            os.environ.update(local.environ)
        with dg.DagsterInstance.get() as instance:
            result = defs.resolve_job_def(job_name).execute_in_process(
                instance=instance,
                partition_key=str(year),
                run_config={
                    "ops": {"kommo_staging": {"config": config}},
                    # Progress (pages, rows, swap counts) at INFO; Dagster's own step events are DEBUG.
                    "loggers": {"console": {"config": {"log_level": "INFO"}}},
                },
                raise_on_error=False,
            )
        record = get_run(env.database_url, result.run_id)
        with connect(env.database_url) as conn:
            covered = coverage(conn, scope.windows())
    finally:
        env.close()
    print(f"* Dagster run {result.run_id}: {'success' if result.success else 'FAILURE'}")
    if env.postgres is not None:
        print(f"* the local PostgreSQL keeps running for `make dev` and psql ({env.database_url}); "
              "`make stop` stops it")
    if record is None:
        print("* no import run was recorded (the run failed before staging; see the error above)")
        return 1
    summary = {
        key: record[key]
        for key in ("status", "leads_count", "contacts_count", "previous_leads_count", "drop_ratio", "error")
    }
    # The record's vehicles_count (the seed's name) counts the staged leads' vehicle links, not vehicles:
    # the swap's vehicles_created says how many vehicles were new.
    summary["vehicle_links"] = record["vehicles_count"]
    summary["swap"] = record["swap_counts"]
    print(json.dumps(summary, indent=2, default=str))
    print("* years in scope, and how far Kommo has been read for each (the incremental sync reads a year "
          "never read from its first second):")
    for key, covered_to in covered.items():
        print(f"    {key}: {'read up to ' + covered_to.isoformat() if covered_to else 'not read yet'}")
    _print_warnings(result)
    print("* `make dev` serves this run in the Dagster UI at http://127.0.0.1:3000")
    return 0 if result.success else 1


def _print_warnings(result) -> None:
    """The warning checks that failed, with what each means (their counts are on the run in the UI too)."""
    from kommo_assets.assets.staging import CHECK_DESCRIPTIONS

    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    if not failed:
        print("* every check passed")
        return
    print("* checks that did not pass (warnings do not stop the swap):")
    for evaluation in failed:
        count = evaluation.metadata.get("count")
        print(f"    {evaluation.check_name}: {count.value if count is not None else 'failed'}"
              f" - {CHECK_DESCRIPTIONS.get(evaluation.check_name, evaluation.description or '')}")


def _stop(args: argparse.Namespace) -> int:
    from kommo_assets.dev.local_postgres import LocalPostgres

    server = LocalPostgres(Path(args.home) / "pg")
    if not server.is_running():
        print(f"no local PostgreSQL running in {server.data_dir}")
        return 0
    server.stop()
    print(f"stopped the local PostgreSQL in {server.data_dir} (its data stays there)")
    return 0


def _dev(args: argparse.Namespace) -> int:
    from kommo_assets.dev.dagster_dev import serve

    return serve(args)


def _benchmark(argv: list[str]) -> int:
    from kommo_assets.dev.benchmark import main as benchmark_main

    return benchmark_main(argv)


def _simulator(argv: list[str]) -> int:
    from kommo_assets.dev.simulator.cli import main as simulator_main

    return simulator_main(argv)


# Subcommands with options of their own: everything after the name is theirs.
PASSTHROUGH = {"simulator": _simulator, "benchmark": _benchmark}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kommo-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("migrate", help="apply sql/ to KOMMO_DATABASE_URL (idempotent)").set_defaults(func=_migrate)

    run = sub.add_parser(
        "run",
        help="run the full refresh once; starts a local Postgres and the simulator for whatever is not configured",
    )
    run.add_argument("--year", type=int, default=None,
                     help="the window's calendar year, a partition (default: the current year)")
    run.add_argument("--max-drop-ratio", type=float, default=0.30)
    run.add_argument("--dry-run", action="store_true", help="stage and check only; production untouched")
    run.add_argument("--leads", type=int, default=3000, help="size of the simulator's dataset")
    run.add_argument("--home", default=os.environ.get("KOMMO_DEV_HOME", ".kommo-dev"),
                     help="where the local Postgres keeps its data")
    run.set_defaults(func=_run)

    stop = sub.add_parser("stop", help="stop the local PostgreSQL that `run` or `dev` started (data is kept)")
    stop.add_argument("--home", default=os.environ.get("KOMMO_DEV_HOME", ".kommo-dev"))
    stop.set_defaults(func=_stop)

    dev = sub.add_parser(
        "dev",
        help="start the Dagster UI and daemon on the embedded default (local Postgres + simulator when unset)",
    )
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=3000)
    dev.add_argument("--leads", type=int, default=3000, help="size of the simulator's dataset")
    dev.add_argument("--home", default=os.environ.get("KOMMO_DEV_HOME", ".kommo-dev"),
                     help="where the local Postgres and the Dagster instance keep their data")
    dev.set_defaults(func=_dev)

    sub.add_parser("simulator", help="serve the Kommo API simulator (kommo-assets simulator --help)")

    sub.add_parser("benchmark", help="measure a full refresh against the rate-limit floor (kommo-assets benchmark --help)")

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]](argv[1:])
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"kommo-assets: {redact(str(exc), _secrets())}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - printed redacted, without the traceback that would quote it
        print(f"kommo-assets: {args.command} failed: {redact(f'{type(exc).__name__}: {exc}', _secrets())}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
