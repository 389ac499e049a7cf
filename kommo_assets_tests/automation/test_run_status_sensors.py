"""The run-status sensors after REAL runs (simulator over HTTP, real Postgres, the fake Slack API over HTTP):
import records closed, results written back to the request row, one Slack message per failed or
needs_review run and none for a succeeded one, no secrets in the message."""

import json

import dagster as dg

from kommo_assets.automation.run_status_sensors import kommo_run_canceled_sensor
from kommo_assets.db import refresh_requests, runs
from kommo_assets.resources.postgres import PostgresResource
from kommo_assets.scope import window_for
from kommo_assets_tests.automation.conftest import RUN_STATUS_SENSORS, SLACK_CHANNEL, SLACK_TOKEN
from kommo_assets_tests.helpers import fetch_all, fetch_one, run_job

FULL, DRY = "kommo_full_refresh_job", "kommo_dry_run_job"
FAILURE = "kommo_run_failure_sensor"


def _requested_run_tags(url: str, user, ticker) -> tuple[int, dict]:
    """The button pressed, then the request sensor's tick: the request id and its run's tags. The refresh
    these tests ran just before would hold the button for the cooldown: these tests turn it off."""
    refresh_requests.sync_settings(url, {refresh_requests.COOLDOWN_SETTING: 0})
    request_id = fetch_one(url, "SELECT id FROM request_kommo_refresh(%s)", (user,))[0]
    (run_request,) = ticker.tick("kommo_refresh_request_sensor").run_requests
    return request_id, dict(run_request.tags)


def _assert_no_secrets(fake_slack, kommo_token: str) -> None:
    for request in fake_slack.requests:
        assert kommo_token not in request.raw_body
        assert SLACK_TOKEN not in request.raw_body  # the bot token travels only in the Authorization header
        assert request.headers["Authorization"] == f"Bearer {SLACK_TOKEN}"


def test_requested_refresh_writes_running_then_its_result_back(automation_env, database_url, staff,
                                                               live_synced, ticker, instance, fake_slack):
    ticker.prime(*RUN_STATUS_SENSORS)
    request_id, tags = _requested_run_tags(database_url, staff, ticker)

    result = run_job(FULL, instance=instance, tags=tags)
    assert result.success
    ticker.tick("kommo_run_started_sensor")
    assert fetch_one(database_url, "SELECT status, dagster_run_id FROM kommo_refresh_requests WHERE id = %s",
                     (request_id,)) == ("running", result.run_id)

    ticker.tick("kommo_run_succeeded_sensor")
    record = runs.get_run(database_url, result.run_id)
    assert record["triggered_by"] == str(staff)
    status = refresh_requests.request_status(database_url, request_id)
    assert {k: status[k] for k in ("request_id", "run_id", "status", "leads", "contacts", "vehicles", "error")} == {
        "request_id": request_id, "run_id": result.run_id, "status": "succeeded",
        "leads": record["leads_count"], "contacts": record["contacts_count"],
        "vehicles": record["vehicles_count"], "error": None,
    }
    assert status["leads"] > 0
    # a late started tick does not move a finished request back to running
    assert not refresh_requests.mark_started(database_url, request_id, result.run_id)

    # a succeeded run alerts nobody
    assert ticker.tick(FAILURE).dagster_run_reactions == []
    assert fake_slack.requests == []


def test_needs_review_runs_post_exactly_one_slack_message_each(automation_env, database_url, staff, live_synced,
                                                          ticker, instance, fake_slack, monkeypatch):
    sim = automation_env
    monkeypatch.setenv("DAGSTER_WEBSERVER_URL", "https://dagster.example.com/")
    ticker.prime(*RUN_STATUS_SENSORS)
    first = run_job(FULL, instance=instance)
    assert first.success
    staged = [r[0] for r in fetch_all(database_url, "SELECT lead_id FROM stg_kommo_leads WHERE run_id = %s "
                                      "ORDER BY lead_id", (first.run_id,))]
    sim.dataset.delete_leads(staged[: int(len(staged) * 0.4)])

    request_id, tags = _requested_run_tags(database_url, staff, ticker)
    second = run_job(FULL, instance=instance, tags=tags)
    assert not second.success
    record = runs.get_run(database_url, second.run_id)
    assert record["status"] == "needs_review"

    ticker.tick("kommo_run_succeeded_sensor")  # the first run: no alert
    ticker.tick(FAILURE)
    ticker.tick(FAILURE)  # a later tick does not repeat it
    assert len(fake_slack.messages) == 1
    message = fake_slack.messages[0].body
    assert message["channel"] == SLACK_CHANNEL
    text = message["text"]
    assert "Kommo full refresh needs review" in text
    assert "*Import status:* needs_review" in text
    assert f"{record['leads_count']} leads, {record['contacts_count']} contacts" in text
    assert f"against the previous {len(staged)} leads" in text
    assert f"{float(record['drop_ratio']) * 100:.1f}%" in text
    assert "re-run with a higher max_drop_ratio" in text
    # the drift alert quotes the change preview: the deleted leads' bookings would be deactivated
    deactivate = record["change_preview"]["bookings"]["deactivate"]
    assert deactivate > 0 and f"*Change preview:* bookings +0 ~0 -{deactivate}" in text
    assert f"<https://dagster.example.com/runs/{second.run_id}|{second.run_id}>" in text
    assert f"refresh request #{request_id}" in text and str(staff) in text
    _assert_no_secrets(fake_slack, sim.config.token)

    row = fetch_one(database_url, "SELECT status, leads, dagster_run_id, error FROM kommo_refresh_requests "
                    "WHERE id = %s", (request_id,))
    assert row[:3] == ("needs_review", record["leads_count"], second.run_id)
    assert "max_drop_ratio" in row[3]

    # the nightly dry run sees the same drift and alerts once too
    dry = run_job(DRY, instance=instance)
    assert not dry.success and runs.get_run(database_url, dry.run_id)["status"] == "needs_review"
    ticker.tick(FAILURE)
    assert len(fake_slack.messages) == 2
    assert "Kommo dry run needs review" in fake_slack.messages[1].body["text"]


def test_failed_run_posts_one_message_with_the_error_and_no_token(automation_env, database_url, ticker,
                                                                  instance, fake_slack):
    sim = automation_env
    token = sim.config.token
    sim.add_fault(path="/api/v4/leads", times=-1, kind="status", status=401,
                  body=json.dumps({"title": "Unauthorized", "detail": f"token {token} was revoked"}),
                  content_type="application/problem+json")
    ticker.prime(*RUN_STATUS_SENSORS)
    result = run_job(FULL, instance=instance)
    assert not result.success
    record = runs.get_run(database_url, result.run_id)
    assert record["status"] == "failed"

    ticker.tick(FAILURE)
    (posted,) = fake_slack.messages
    text = posted.body["text"]
    assert "Kommo full refresh failed" in text and "*Import status:* failed" in text
    assert "401" in text
    assert f"<http://127.0.0.1:3000/runs/{result.run_id}|" in text
    assert "max_drop_ratio" not in text
    _assert_no_secrets(fake_slack, token)


def test_alerts_off_posts_nothing_and_needs_no_slack_settings(automation_env, database_url, staff, live_synced,
                                                               ticker, instance, fake_slack, monkeypatch):
    request_id, tags = _requested_run_tags(database_url, staff, ticker)
    for name in ("KOMMO_ENABLE_SLACK_ALERTS", "SLACK_BOT_TOKEN", "KOMMO_SLACK_CHANNEL"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")
    ticker.prime(*RUN_STATUS_SENSORS)
    result = run_job(FULL, instance=instance, tags=tags)
    assert not result.success

    ticker.tick(FAILURE)
    assert fake_slack.requests == []
    # the request still gets its answer, with the reason the run failed
    status = refresh_requests.request_status(database_url, request_id)
    assert status["status"] == "failed" and status["run_id"] == result.run_id
    assert "KOMMO_ENABLE_LIVE is off" in status["error"]


def test_dry_run_failure_alerts_too(automation_env, database_url, ticker, instance, fake_slack, monkeypatch):
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")
    ticker.prime(*RUN_STATUS_SENSORS)
    result = run_job(DRY, instance=instance)
    assert not result.success
    ticker.tick(FAILURE)
    (posted,) = fake_slack.messages
    text = posted.body["text"]
    assert "Kommo dry run failed" in text and "*Import status:* none" in text
    assert "step kommo_staging failed: Failure: Kommo refresh is disabled: KOMMO_ENABLE_LIVE is off" in text


def test_run_that_ended_with_its_import_open_closes_it(automation_env, database_url, staff, live_synced,
                                                       ticker, instance, fake_slack, monkeypatch):
    """A killed step leaves the import running; the end of the Dagster run closes it as failed."""
    request_id, tags = _requested_run_tags(database_url, staff, ticker)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "0")  # the run fails before it opens the import itself
    ticker.prime(*RUN_STATUS_SENSORS)
    failed = run_job(FULL, instance=instance, tags=tags)
    assert not failed.success
    window = window_for(2025)
    runs.start_run(database_url, run_id=failed.run_id, dagster_run_id=failed.run_id, job_name=FULL,
                   triggered_by=None, dry_run=False, window=window, max_drop_ratio=0.3)

    ticker.tick(FAILURE)
    record = runs.get_run(database_url, failed.run_id)
    assert record["status"] == "failed" and record["finished_at"] is not None
    assert record["error"].startswith("Dagster run ended (FAILURE) before the import closed")
    assert refresh_requests.request_status(database_url, request_id)["status"] == "failed"
    assert len(fake_slack.messages) == 1

    # the same for a canceled run, through the canceled sensor (invoked directly on that run)
    canceled = run_job(DRY, instance=instance)
    runs.start_run(database_url, run_id=canceled.run_id, dagster_run_id=canceled.run_id, job_name=DRY,
                   triggered_by=None, dry_run=True, window=window, max_drop_ratio=0.3)
    run = instance.get_run_by_id(canceled.run_id)
    event = instance.all_logs(canceled.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)[0].dagster_event
    # a context manager, as the daemon opens it: the Postgres resource has a setup (a no-op outside a run)
    with dg.build_run_status_sensor_context(
        sensor_name="kommo_run_canceled_sensor", dagster_event=event, dagster_instance=instance, dagster_run=run,
        resources={"postgres": PostgresResource(database_url=database_url)},
    ) as context:
        kommo_run_canceled_sensor(context)
    record = runs.get_run(database_url, canceled.run_id)
    assert record["status"] == "failed"
    assert record["error"] == "Dagster run ended (CANCELED) before the import closed"
