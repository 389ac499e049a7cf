"""What the fault, corpus and security tests share: running the real jobs with a quick-retry Kommo
resource, a normalized view of production (no generated ids or timestamps), and the token scanner."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql

from kommo_assets.resources.kommo import KommoResource
from kommo_assets_tests.helpers import PRODUCTION_TABLES, run_job, with_resources

LEADS, SEED = 600, 11  # the standard simulator of these tests (as kommo_env's)
FULL_REFRESH = "kommo_full_refresh_job"
DRY_RUN = "kommo_dry_run_job"

STAGING_TABLES = ("stg_kommo_leads", "stg_kommo_contacts", "stg_kommo_booking_vehicles", "stg_kommo_field_options")
RUN_TABLES = ("kommo_import_runs", "kommo_refresh_requests", "kommo_refresh_staff", "kommo_runtime_flags")


def set_code_location_env(monkeypatch, url: str, sim) -> None:
    """The environment the code location reads, pointed at ``url`` and the simulator, live on."""
    monkeypatch.setenv("KOMMO_DATABASE_URL", url)
    monkeypatch.setenv("KOMMO_BASE_URL", sim.base_url)
    monkeypatch.setenv("KOMMO_ACCESS_TOKEN", sim.config.token)
    monkeypatch.setenv("KOMMO_ENABLE_LIVE", "1")
    for name in ("KOMMO_ENABLE_SLACK_ALERTS", "KOMMO_SNAPSHOT_DIR"):
        monkeypatch.delenv(name, raising=False)


# --- running the jobs -----------------------------------------------------------------------------


def definitions(*, timeout: float = 10.0, max_retries: int = 6, backoff: float = 0.02,
                max_in_flight: int = 6) -> dg.Definitions:
    """The code location's Definitions with a Kommo resource that retries as production does (6 retries,
    same codes) but backs off in milliseconds; ``timeout`` is the client's per-request timeout and
    ``max_in_flight`` its concurrency (production: 6). The token still comes from
    ``KOMMO_ACCESS_TOKEN`` through an EnvVar, as in production."""
    from kommo_assets.definitions import defs

    kommo = KommoResource(base_url=dg.EnvVar("KOMMO_BASE_URL"), access_token=dg.EnvVar("KOMMO_ACCESS_TOKEN"),
                          timeout_seconds=timeout, max_retries=max_retries, backoff_base_seconds=backoff,
                          max_in_flight=max_in_flight)
    return with_resources(defs, kommo=kommo)


def run(job: str = FULL_REFRESH, *, instance: dg.DagsterInstance | None = None, timeout: float = 10.0,
        max_retries: int = 6, max_in_flight: int = 6, **config: Any) -> dg.ExecuteInProcessResult:
    """Runs ``job`` in process (errors are results, not exceptions)."""
    return run_job(job, instance=instance, definitions=definitions(timeout=timeout, max_retries=max_retries,
                                                                   max_in_flight=max_in_flight), **config)


def step_failure(result: dg.ExecuteInProcessResult, step: str = "kommo_staging") -> str:
    """The error text Dagster shows for ``step``'s failure (message of the error and its causes)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_key == step:
            error = event.event_specific_data.error
            texts = []
            while error is not None:
                texts.append(error.message)
                error = error.cause
            return "\n".join(texts)
    raise AssertionError(f"step {step} did not fail: {[e.event_type_value for e in result.all_events]}")


def materializations(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {
        event.event_specific_data.materialization.asset_key.path[-1]:
            {k: v.value for k, v in event.event_specific_data.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }


# --- production, normalized -----------------------------------------------------------------------

_NORMALIZED = {
    "vehicles": "SELECT kommo_vehicle_id, name FROM vehicles",
    "clients": "SELECT kommo_contact_id, name, phone, email FROM clients",
    "sales_leads": """
        SELECT sl.lead_code, c.kommo_contact_id, sl.name, sl.stage_id, sl.pipeline_id, sl.value_amount,
               sl.owner_id, sl.expected_close_at, sl.source, sl.archived_at IS NULL, sl.kommo_created_at,
               sl.kommo_updated_at
          FROM sales_leads sl LEFT JOIN clients c ON c.id = sl.client_id""",
    "bookings": """
        SELECT b.source_payload_id, c.kommo_contact_id, sl.lead_code, b.channel, b.source, b.status,
               b.kommo_status_id, b.owner_id, v.kommo_vehicle_id, b.start_at, b.end_at, b.is_active
          FROM bookings b LEFT JOIN clients c ON c.id = b.client_id
          LEFT JOIN sales_leads sl ON sl.id = b.sales_lead_id LEFT JOIN vehicles v ON v.id = b.vehicle_id""",
    "booking_vehicles": """
        SELECT b.source_payload_id, v.kommo_vehicle_id, bv."primary"
          FROM booking_vehicles bv JOIN bookings b ON b.id = bv.booking_id JOIN vehicles v ON v.id = bv.vehicle_id""",
    "calendar_events_expanded": "SELECT kind, title, start_at, end_at FROM calendar_events_expanded",
    "zoho_outbox": "SELECT count(*) FROM zoho_outbox",
}


def normalized_production(url: str) -> dict[str, list[tuple]]:
    """Every production table as sorted rows of Kommo keys and values, without generated uuids and
    write timestamps: two refreshes of the same Kommo data compare equal."""
    with psycopg.connect(url) as conn:
        return {table: sorted(conn.execute(query).fetchall(), key=repr) for table, query in _NORMALIZED.items()}


def assert_matches_expected(url: str, expected: dict[str, dict]) -> None:
    """Production holds exactly ``expected`` (``test_full_refresh.expected_snapshot``): every lead as an
    active sales lead, every booking lead as an active booking with its derived columns."""
    with psycopg.connect(url) as conn:
        leads = dict(conn.execute("SELECT lead_code, archived_at IS NULL FROM sales_leads").fetchall())
        bookings = {
            row[0]: row[1:]
            for row in conn.execute(
                """SELECT b.source_payload_id, b.is_active, b.kommo_status_id, b.status, b.source, b.start_at,
                          b.end_at, v.kommo_vehicle_id, c.kommo_contact_id
                     FROM bookings b LEFT JOIN vehicles v ON v.id = b.vehicle_id
                     LEFT JOIN clients c ON c.id = b.client_id"""
            ).fetchall()
        }
    assert leads == {code: True for code in expected}
    wanted = {code: e for code, e in expected.items() if e["is_booking"]}
    assert set(bookings) == set(wanted)
    for code, e in wanted.items():
        assert bookings[code] == (True, e["status_id"], e["booking_status"], e["source"], e["start_at"],
                                  e["end_at"], e["vehicle_enum"], e["contact_id"]), code


# --- the token scanner ----------------------------------------------------------------------------


@dataclasses.dataclass
class Scan:
    """Everything a failing run leaves behind, as text, with where each piece came from."""

    pieces: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, where: str, text: object) -> None:
        self.pieces.append((where, text if isinstance(text, str) else repr(text)))

    def add_dagster_run(self, instance: dg.DagsterInstance, run_id: str) -> None:
        """Every event log record of the run (user log messages, step failures with their error chains,
        materialization and check metadata, engine events), serialized whole, and the run itself."""
        entries = instance.all_logs(run_id)
        assert entries, f"no event log for run {run_id}"
        for entry in entries:
            kind = entry.dagster_event.event_type_value if entry.dagster_event else "log message"
            self.add(f"dagster event log of {run_id}: {kind}", dg.serialize_value(entry))
            self.add(f"dagster event log of {run_id}: {kind} (message)", entry.user_message or "")
        self.add(f"dagster run record {run_id}", dg.serialize_value(instance.get_run_by_id(run_id)))

    def add_database(self, url: str) -> None:
        """Every row of the run log, staging, request and production tables, as Postgres prints it."""
        with psycopg.connect(url) as conn:
            for table in (*RUN_TABLES, *STAGING_TABLES, *PRODUCTION_TABLES):
                for (text,) in conn.execute(sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(table))):
                    self.add(f"table {table}", text)

    def add_exceptions(self, errors: Iterable[BaseException]) -> None:
        for error in errors:
            seen = error
            while seen is not None:
                self.add(f"exception {type(seen).__name__}", f"{seen!s} {seen!r} {seen.args!r}")
                seen = seen.__cause__ or seen.__context__

    def add_process_output(self, caplog, capfd) -> None:
        """Every Python log record (pytest's caplog) and everything written to stdout and stderr."""
        for record in caplog.records:
            self.add(f"python log {record.name}", f"{record.getMessage()} {record.args!r} {record.exc_text or ''}")
        captured = capfd.readouterr()
        self.add("stdout", captured.out)
        self.add("stderr", captured.err)

    def leaks(self, secret: str) -> list[str]:
        return sorted({where for where, text in self.pieces if secret in text})

    def size(self) -> int:
        return sum(len(text) for _, text in self.pieces)
