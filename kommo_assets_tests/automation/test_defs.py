"""The code location loads and every job, schedule and sensor in it resolves, with the intended defaults."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from kommo_assets.definitions import defs

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
