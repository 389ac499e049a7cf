"""``stage_snapshot`` directly, against the simulator over HTTP, in the interpreter a run sets up for it."""

import gc
import sys
import uuid

import dagster as dg
import psycopg

from kommo_assets.db import runs
from kommo_assets.db.staging import stage_snapshot
from kommo_assets.kommo.pacing import PROMPT_SWITCH_INTERVAL_S
from kommo_assets.resources.kommo import KommoResource
from kommo_assets.scope import window_for


def test_while_a_run_streams_the_collector_skips_old_objects_and_threads_switch_promptly(kommo_env, database_url):
    # Full collections over every object alive (Dagster's included) stopped the pacer's threads for
    # ~90 ms each; the Kommo resource freezes them for the run, and everything is as it was afterwards.
    before = (gc.get_freeze_count(), sys.getswitchinterval())
    assert before[0] == 0
    seen = []
    run_id = str(uuid.uuid4())
    window = window_for(2025)
    runs.start_run(database_url, run_id=run_id, dagster_run_id=None, job_name="test", triggered_by=None,
                   dry_run=True, window=window, max_drop_ratio=1.0)
    kommo = KommoResource(base_url=kommo_env.base_url, access_token=kommo_env.config.token, max_rps=200.0)
    with dg.build_resources({"kommo": kommo}, dagster_run=dg.DagsterRun(job_name="t", run_id=run_id)) as resources, \
            resources.kommo.client() as client, psycopg.connect(database_url) as conn:
        result = stage_snapshot(conn, run_id, client, window.created_from, window.created_to,
                                on_progress=lambda phase, _: seen.append(
                                    (phase, gc.get_freeze_count(), sys.getswitchinterval())))
    assert result.leads > 300 and {phase for phase, _, _ in seen} == {"leads", "contacts"}
    assert all(frozen > 10_000 and switch <= PROMPT_SWITCH_INTERVAL_S for _, frozen, switch in seen)
    assert (gc.get_freeze_count(), sys.getswitchinterval()) == before
    # outside a run (a sensor's resources) the interpreter is left as it is
    with dg.build_resources({"kommo": kommo}):
        assert (gc.get_freeze_count(), sys.getswitchinterval()) == before
