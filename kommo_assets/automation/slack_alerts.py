"""The Slack text of a failed or needs_review Kommo run: what happened, the numbers, what to do, a link.

Pure formatting: every free text goes through ``redact`` with the secrets it is given (the Kommo and Slack
tokens, the database password) before it is escaped for Slack.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kommo_assets.jobs import DRY_RUN_JOB, FULL_REFRESH_JOB, INCREMENTAL_SYNC_JOB
from kommo_assets.kommo.errors import redact
from kommo_assets.reporting import preview_summary

ERROR_MAX_CHARS = 1500
NEEDS_REVIEW_FIX = (
    "if the drop is real, re-run with a higher max_drop_ratio "
    "(run config `ops.kommo_staging.config.max_drop_ratio`); otherwise look for what hid the leads "
    "(Kommo filters, pipeline permissions, the token's account) before re-running."
)
NEEDS_REVIEW_INCREMENT_FIX = (
    "read the change preview: if the deactivations are real, start kommo_incremental_sync_job with a higher "
    "KOMMO_SYNC_MAX_DEACTIVATIONS, or run a full refresh; otherwise find what removed the leads in Kommo "
    "first. Syncs stay stopped until then."
)


@dataclass(frozen=True)
class RunAlert:
    """What the alert says about one ended run."""

    run_id: str
    job_name: str
    import_run: dict[str, Any] | None  # the kommo_import_runs row, if the run got that far
    error: str | None  # Dagster's own error when the import record has none
    requested_by: str | None = None
    request_id: str | None = None
    bookkeeping_failed: bool = False  # the import record could not be read or closed
    heal_note: str | None = None  # KOMMO_HEAL_DRIFT: a heal that failed, or why a dry run started none


def _escape(text: str) -> str:
    """Slack mrkdwn treats &, < and > as control characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _safe(text: str, secrets: Iterable[str]) -> str:
    text = redact(text, secrets)
    if len(text) > ERROR_MAX_CHARS:
        text = text[:ERROR_MAX_CHARS] + " …"
    return _escape(text)


def _subject(job_name: str) -> str:
    return {FULL_REFRESH_JOB: "Kommo full refresh", DRY_RUN_JOB: "Kommo dry run",
            INCREMENTAL_SYNC_JOB: "Kommo incremental sync"}.get(job_name, f"Kommo run {job_name}")


def _ratio(value: Any) -> str:
    return f"{float(value) * 100:.1f}%"


def failure_message(alert: RunAlert, webserver_url: str, secrets: Iterable[str] = ()) -> str:
    """Slack mrkdwn for a run that ended failed (or needs_review, which Dagster reports as a failure)."""
    record = alert.import_run or {}
    status = record.get("status")
    subject = _subject(alert.job_name)
    increment = record.get("kind") == "increment"
    if status == "needs_review" and increment:
        lines = [f":warning: *{subject} needs review*: the increment would deactivate more bookings than "
                 "KOMMO_SYNC_MAX_DEACTIVATIONS; production and the sync cursor were left unchanged."]
    elif status == "needs_review":
        lines = [f":warning: *{subject} needs review*: the drop guard stopped the run; production was left "
                 "unchanged."]
    else:
        lines = [f":rotating_light: *{subject} failed*"]
    lines.append(f"*Job:* `{alert.job_name}`")

    if alert.bookkeeping_failed:
        lines.append("*Import status:* unknown (the run record could not be read; see the sensor tick)")
    elif not record:
        lines.append("*Import status:* none (the run failed before the import started)")
    elif status == "succeeded":
        lines.append("*Import status:* succeeded (production was updated; a later step failed)")
    else:
        lines.append(f"*Import status:* {status}")

    if record.get("leads_count") is not None:
        lines.append(f"*Counts:* {record['leads_count']} leads, {record.get('contacts_count')} contacts, "
                     f"{record.get('vehicles_count')} vehicle links")
    if status == "needs_review" and not increment:
        previous = record.get("previous_leads_count")
        lines.append(f"*Drop:* {_ratio(record.get('drop_ratio') or 0)} against the previous {previous} leads "
                     f"(max_drop_ratio {float(record.get('max_drop_ratio') or 0):.2f})")

    if record.get("change_preview"):
        lines.append(f"*Change preview:* {_escape(preview_summary(record['change_preview']))}")

    error = record.get("error") or alert.error
    if error:
        lines.append(f"*{'Reason' if status == 'needs_review' else 'Error'}:* {_safe(error, secrets)}")
    if status == "needs_review":
        lines.append(f"*Fix:* {NEEDS_REVIEW_INCREMENT_FIX if increment else NEEDS_REVIEW_FIX}")
    if alert.request_id:
        lines.append(f"*Requested by:* {_escape(alert.requested_by or 'unknown')} "
                     f"(refresh request #{_escape(alert.request_id)})")
    if alert.heal_note:
        lines.append(f"*Heal:* {_escape(alert.heal_note)}")
    lines.append(f"*Run:* <{webserver_url}/runs/{alert.run_id}|{alert.run_id}>")
    return "\n".join(lines)


def drift_message(run_id: str, import_run: dict[str, Any], drift: int, webserver_url: str,
                  year: str | None = None, heal_note: str | None = None, healing: bool = False) -> str:
    """Slack mrkdwn for a nightly dry run whose preview is not empty: the incremental syncs left drift in its
    year. ``heal_note`` (only with KOMMO_HEAL_DRIFT set) says whether a full refresh of the year was started
    (``healing``) or why not."""
    where = f" in {year}" if year else ""
    lines = [f":warning: *Kommo drift*: the nightly dry run found {drift} production row(s){where} a full "
             "refresh would still change after the incremental syncs; it should be 0.",
             f"*Change preview:* {_escape(preview_summary(import_run.get('change_preview')))}"]
    if heal_note:
        lines.append(f"*Heal:* {_escape(heal_note)}")
    if healing:
        lines.append("*What to do:* look at the preview's samples in the run and report what the syncs missed; "
                     "the heal repairs production.")
    else:
        lines.append("*What to do:* look at the preview's samples in the run; run a full refresh to repair, and "
                     "report what the syncs missed.")
    lines.append(f"*Run:* <{webserver_url}/runs/{run_id}|{run_id}>")
    return "\n".join(lines)
