"""The Kommo client's messages (retries, 429s, pace changes, Kommo's error bodies) reach the run's event log
through dagster.yaml's python_logs, from the client's own threads too, and never carry the token."""

from pathlib import Path

import dagster as dg
import yaml

from kommo_assets_tests.helpers import run_job

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_a_client_retry_appears_in_the_runs_event_log_without_the_token(kommo_env):
    python_logs = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())["python_logs"]
    # Page 1 of the leads fails once with Kommo's problem+json body: the client retries it.
    kommo_env.add_fault(kind="status", status=500, path="/api/v4/leads", times=1)
    with dg.instance_for_test(overrides={"python_logs": python_logs}) as instance:
        result = run_job("kommo_full_refresh_job", instance=instance)
        assert result.success
        entries = instance.all_logs(result.run_id)
    messages = [entry.user_message for entry in entries]
    (retry,) = [m for m in messages if "retrying in" in m]
    assert "HTTP 500" in retry and "Injected fault" in retry and "GET /api/v4/leads" in retry
    assert not any(kommo_env.config.token in m for m in messages)
