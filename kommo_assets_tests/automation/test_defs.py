"""The code location loads and every job, schedule and sensor in it resolves, with the intended defaults."""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from kommo_assets.assets.catalog import STAGING_KEYS, STG_LEADS
from kommo_assets.definitions import defs
from kommo_assets.dev.dagster_dev import REPO_ROOT
from kommo_assets.jobs import KOMMO_POOL

JOBS = ("kommo_full_refresh_job", "kommo_dry_run_job", "kommo_incremental_sync_job")
SCHEDULES = {"kommo_nightly_dry_run_schedule": dg.DefaultScheduleStatus.RUNNING,
             "kommo_nightly_full_refresh_schedule": dg.DefaultScheduleStatus.STOPPED}
SENSORS = ("kommo_refresh_request_sensor", "kommo_run_started_sensor", "kommo_run_succeeded_sensor",
           "kommo_run_canceled_sensor", "kommo_run_failure_sensor", "kommo_incremental_sync_sensor",
           "kommo_drift_alert_sensor")


def test_every_job_schedule_and_sensor_resolves_with_its_default_status():
    for name in JOBS:
        assert defs.resolve_job_def(name).name == name
    for name, status in SCHEDULES.items():
        schedule = defs.resolve_schedule_def(name)
        assert schedule.default_status == status
    assert defs.resolve_schedule_def("kommo_nightly_dry_run_schedule").job_name == "kommo_dry_run_job"
    assert defs.resolve_schedule_def("kommo_nightly_full_refresh_schedule").job_name == "kommo_full_refresh_job"
    for name in SENSORS:
        sensor = defs.resolve_sensor_def(name)
        assert sensor.default_status == dg.DefaultSensorStatus.RUNNING, name
    assert defs.resolve_sensor_def("kommo_refresh_request_sensor").job_name == "kommo_full_refresh_job"
    assert defs.resolve_sensor_def("kommo_run_failure_sensor").required_resource_keys == {"postgres", "slack"}
    sync = defs.resolve_sensor_def("kommo_incremental_sync_sensor")
    assert sync.job_name == "kommo_incremental_sync_job" and sync.minimum_interval_seconds == 60
    # increments and refreshes share the run queue's one-at-a-time tag
    tags = {name: defs.resolve_job_def(name).tags.get("kommo/refresh") for name in JOBS}
    assert set(tags.values()) == {"kommo"}
    # and everything else the code location defines resolves too
    repository = defs.get_repository_def()
    for job in repository.get_all_jobs():
        defs.resolve_job_def(job.name)
    for schedule in repository.schedule_defs:
        defs.resolve_schedule_def(schedule.name)
    for sensor in repository.sensor_defs:
        defs.resolve_sensor_def(sensor.name)
    assert set(SENSORS) <= {s.name for s in repository.sensor_defs}
    assert set(SCHEDULES) <= {s.name for s in repository.schedule_defs}


def test_definitions_validate_without_slack_or_kommo_settings(tmp_path: Path):
    """`dagster definitions validate` with only KOMMO_DATABASE_URL set (and that one a dummy)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KOMMO_", "SLACK_", "DAGSTER_"))}
    env["KOMMO_DATABASE_URL"] = "x"
    dagster = Path(sys.executable).with_name("dagster")
    done = subprocess.run([str(dagster), "definitions", "validate", "-m", "kommo_assets.definitions"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "All code locations passed validation" in done.stdout + done.stderr


def _dg(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """The dg CLI of this venv on the project ([tool.dg] in pyproject.toml), with a throwaway Dagster home and
    none of the deployment's settings, as `make check-defs` runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOMMO_", "SLACK_", "DAGSTER_"))}
    env.update(DAGSTER_HOME=str(tmp_path), VIRTUAL_ENV=sys.prefix)
    dg_cli = Path(sys.executable).with_name("dg")
    return subprocess.run([str(dg_cli), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=180)


def test_dg_checks_and_lists_the_definitions(tmp_path: Path):
    checked = _dg("check", "defs", tmp_path=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "All definitions loaded successfully" in checked.stdout + checked.stderr

    listed = _dg("list", "defs", "--json", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    found = json.loads(listed.stdout)
    assert set(JOBS) <= {job["name"] for job in found["jobs"]}
    assert set(SCHEDULES) <= {schedule["name"] for schedule in found["schedules"]}
    assert set(SENSORS) <= {sensor["name"] for sensor in found["sensors"]}
    assets = {asset["asset_key"]: asset for asset in found["assets"]}
    assert {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()} == set(assets)
    assert assets["app_db/public/bookings"]["owners"] == [{"team": "data-platform"}]


def test_the_kommo_reading_assets_are_in_the_pool_that_dagster_yaml_limits_to_one_run():
    """Job runs and ad-hoc Materialize runs alike wait in the queue while a run that reads Kommo is in
    progress: the pool is on the staging asset itself, not on a job's tags."""
    staging = defs.resolve_assets_def(STG_LEADS)
    assert staging.op.pool == KOMMO_POOL
    assert all(defs.resolve_assets_def(key).op.pool == KOMMO_POOL for key in STAGING_KEYS)
    for job in (*[defs.resolve_job_def(name) for name in JOBS], defs.resolve_implicit_global_asset_job_def()):
        assert KOMMO_POOL in {node.definition.pool for node in job.graph.nodes}, job.name

    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    assert config["concurrency"]["pools"] == {"default_limit": 1, "granularity": "run"}
    # the instance accepts the file's queue and concurrency settings together
    with dg.instance_for_test(overrides={key: config[key] for key in ("run_coordinator", "concurrency")}) as instance:
        pools = instance.get_concurrency_config().pool_config
        assert (pools.default_pool_limit, pools.pool_granularity.value) == (1, "run")


def test_every_run_executes_in_one_process():
    """The jobs and the ad-hoc asset job (the UI's Materialize) run in process: the import's owner lock,
    held by the Postgres resource set up once per run, then spans every step."""
    assert defs.executor is dg.in_process_executor
    for job in (*[defs.resolve_job_def(name) for name in JOBS], defs.resolve_implicit_global_asset_job_def()):
        assert job.executor_def is dg.in_process_executor, job.name
