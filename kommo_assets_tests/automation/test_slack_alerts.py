"""The alert text: the right wording per outcome, the numbers, and nothing secret or Slack-breaking."""

from decimal import Decimal

from kommo_assets.automation.slack_alerts import RunAlert, failure_message

URL = "http://127.0.0.1:3000"
NEEDS_REVIEW = {"status": "needs_review", "leads_count": 60, "contacts_count": 50, "vehicles_count": 40,
                "previous_leads_count": 100, "drop_ratio": Decimal("0.4000"), "max_drop_ratio": Decimal("0.30"),
                "error": "leads dropped by 40.0% (100 -> 60), more than max_drop_ratio 0.30"}


def test_needs_review_names_the_drop_and_the_fix():
    text = failure_message(RunAlert("run-1", "kommo_dry_run_job", NEEDS_REVIEW, None), URL)
    assert text.startswith(":warning: *Kommo dry run needs review*")
    assert "*Drop:* 40.0% against the previous 100 leads (max_drop_ratio 0.30)" in text
    assert "*Counts:* 60 leads, 50 contacts, 40 vehicle links" in text
    assert "*Reason:* leads dropped by 40.0% (100 -&gt; 60)" in text
    assert "*Fix:* if the drop is real, re-run with a higher max_drop_ratio" in text
    assert text.endswith(f"*Run:* <{URL}/runs/run-1|run-1>")


def test_failure_error_is_redacted_escaped_and_bounded():
    record = {"status": "failed", "error": "KommoError: <html> & token SECRET-123 " + "x" * 5000}
    text = failure_message(RunAlert("run-2", "kommo_full_refresh_job", record, None), URL, secrets=["SECRET-123"])
    assert "SECRET-123" not in text and "&lt;redacted&gt;" in text
    assert "&lt;html&gt; &amp;" in text and "<html>" not in text
    assert len(text) < 2500
    assert "Drop" not in text and "Fix" not in text


def test_without_an_import_record_the_dagster_error_is_shown():
    alert = RunAlert("run-3", "kommo_full_refresh_job", None, "step kommo_staging failed: boom",
                     requested_by="u-1", request_id="7")
    text = failure_message(alert, URL)
    assert "*Import status:* none (the run failed before the import started)" in text
    assert "*Error:* step kommo_staging failed: boom" in text
    assert "*Requested by:* u-1 (refresh request #7)" in text


def test_a_failed_run_whose_import_succeeded_says_production_was_updated():
    record = {"status": "succeeded", "leads_count": 10, "contacts_count": 9, "vehicles_count": 8, "error": None}
    text = failure_message(RunAlert("run-4", "kommo_full_refresh_job", record, "step calendar failed"), URL)
    assert "*Import status:* succeeded (production was updated; a later step failed)" in text
    assert "*Error:* step calendar failed" in text


def test_unreadable_run_record_still_alerts():
    text = failure_message(RunAlert("run-5", "kommo_full_refresh_job", None, "boom", bookkeeping_failed=True), URL)
    assert "*Import status:* unknown" in text
