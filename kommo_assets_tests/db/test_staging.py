"""``stage_snapshot`` directly, against the simulator over HTTP: what it does to the interpreter while it streams."""

import gc
import sys
import uuid

import psycopg

from kommo_assets.db import runs
from kommo_assets.db.staging import STREAMING_SWITCH_INTERVAL_S, stage_snapshot
from kommo_assets.kommo import KommoClient


def test_while_streaming_the_collector_skips_old_objects_and_threads_switch_promptly(kommo_env, database_url):
    # Full collections over every object alive (Dagster's included) stopped the pacer's threads for
    # ~90 ms each; during the stream they are frozen, and everything is as it was afterwards.
    before = (gc.get_freeze_count(), sys.getswitchinterval())
    assert before[0] == 0
    seen = []
    run_id = str(uuid.uuid4())
    window = runs.window_for(2025)
    runs.start_run(database_url, run_id=run_id, dagster_run_id=None, job_name="test", triggered_by=None,
                   dry_run=True, window=window, max_drop_ratio=1.0)
    with KommoClient(kommo_env.base_url, kommo_env.config.token, max_rps=200.0) as client, \
            psycopg.connect(database_url) as conn:
        result = stage_snapshot(conn, run_id, client, window.created_from, window.created_to,
                                on_progress=lambda phase, _: seen.append(
                                    (phase, gc.get_freeze_count(), sys.getswitchinterval())))
    assert result.leads > 300 and {phase for phase, _, _ in seen} == {"leads", "contacts"}
    assert all(frozen > 10_000 and switch <= STREAMING_SWITCH_INTERVAL_S for _, frozen, switch in seen)
    assert (gc.get_freeze_count(), sys.getswitchinterval()) == before
