"""The change preview: a snapshot with known adds, removals and field changes yields exactly those counts
and samples, and the swap that follows does exactly what the preview said."""

import uuid
from datetime import UTC, datetime

from kommo_assets.db import connect
from kommo_assets.db.runs import ImportRuns, get_run
from kommo_assets.reporting import preview_markdown, preview_summary
from kommo_assets_tests.helpers import fetch_one, run_job
from kommo_assets_tests.test_full_refresh import STATUS_MAP, expected_snapshot

VEHICLE_FIELD, DELIVERY_FIELD, COLLECT_FIELD = 1234163, 1218176, 1218178
IN_WINDOW = int(datetime(2025, 6, 15, tzinfo=UTC).timestamp())


def _booking_leads(sim):
    expected = expected_snapshot(sim)
    return [int(code.split(":")[1]) for code, e in sorted(expected.items())
            if e["is_booking"] and e["status_id"] == 79790637 and e["vehicle_enum"] and e["start_at"]
            and e["user"] != 5550002]


def test_preview_counts_and_samples_match_known_changes_and_the_swap(kommo_env, database_url):
    sim = kommo_env
    owner = uuid.uuid4()
    fetch_one(database_url, "INSERT INTO kommo_user_map VALUES (5550002, %s) RETURNING 1", (owner,))
    assert run_job("kommo_full_refresh_job").success

    leads = _booking_leads(sim)
    removed, status_changed, dates_changed, vehicle_changed, owner_changed = (
        leads[0:3], leads[3], leads[4], leads[5], leads[6])
    sim.dataset.delete_leads(removed)
    sim.dataset.update_lead(status_changed, status_id=79790640)
    sim.dataset.update_lead(dates_changed, custom_fields={DELIVERY_FIELD: IN_WINDOW, COLLECT_FIELD: IN_WINDOW + 86400})
    current_vehicle = next(
        v["values"][0]["enum_id"] for v in sim.dataset.lead(vehicle_changed)["custom_fields_values"]
        if v["field_id"] == VEHICLE_FIELD)
    new_vehicle = 1000001 if current_vehicle != 1000001 else 1000002
    sim.dataset.update_lead(vehicle_changed, custom_fields={VEHICLE_FIELD: new_vehicle})
    sim.dataset.update_lead(owner_changed, responsible_user_id=5550002)
    added = [sim.dataset.add_lead(IN_WINDOW + i, status_id=79790637, pipeline_id=8841234) for i in range(2)]
    # Rows the app wrote are neither archived nor deactivated, whatever their source or channel says.
    fetch_one(database_url, "INSERT INTO sales_leads (lead_code, name) VALUES ('app:1', 'Phone call') RETURNING 1")
    fetch_one(database_url, "INSERT INTO bookings (channel, source_payload_id, start_at)"
                            " VALUES ('Kommo', 'zoho:1', now()) RETURNING 1")

    # The dry run ends with the preview and touches nothing.
    dry = run_job("kommo_dry_run_job")
    assert dry.success
    dry_preview = get_run(database_url, dry.run_id)["change_preview"]
    bookings = dry_preview["bookings"]
    assert bookings["add"] == 2
    assert bookings["deactivate"] == 3
    assert bookings["update"] == 4
    assert bookings["field_changes"] == {"status": 1, "dates": 1, "vehicle": 1, "owner": 1}
    assert dry_preview["sales_leads"]["add"] == 2 and dry_preview["sales_leads"]["archive"] == 3
    assert sorted(s["code"] for s in dry_preview["samples"]["bookings_add"]) == [f"kommo:{i}" for i in added]
    assert sorted(s["code"] for s in dry_preview["samples"]["bookings_deactivate"]) == [
        f"kommo:{i}" for i in sorted(removed)]
    changes = {s["code"]: s for s in dry_preview["samples"]["bookings_update"]}
    assert changes[f"kommo:{status_changed}"]["changes"] == ["status"]
    assert changes[f"kommo:{status_changed}"]["after"]["status"] == "in_progress"
    assert changes[f"kommo:{vehicle_changed}"]["after"]["vehicle"] == new_vehicle
    assert changes[f"kommo:{owner_changed}"]["after"]["owner_id"] == str(owner)
    # the UI text quotes the same numbers
    assert "bookings +2 ~4 -3" in preview_summary(dry_preview)
    assert f"kommo:{status_changed}" in preview_markdown(dry_preview)

    # The full refresh computes the same preview and its swap does exactly that.
    full = run_job("kommo_full_refresh_job")
    assert full.success
    run = get_run(database_url, full.run_id)
    preview, swapped = run["change_preview"], run["swap_counts"]
    assert {k: v for k, v in preview.items() if k != "samples"} == {
        k: v for k, v in dry_preview.items() if k != "samples"}
    assert swapped["bookings_added"] == preview["bookings"]["add"]
    assert swapped["bookings_updated"] == preview["bookings"]["update"]
    assert swapped["bookings_deactivated"] == preview["bookings"]["deactivate"]
    assert swapped["sales_leads_added"] == preview["sales_leads"]["add"]
    assert swapped["sales_leads_updated"] == preview["sales_leads"]["update"]
    assert swapped["sales_leads_archived"] == preview["sales_leads"]["archive"]
    assert swapped["clients_added"] == preview["clients"]["add"]
    assert swapped["clients_updated"] == preview["clients"]["update"]
    assert swapped["vehicles_created"] == preview["vehicles"]["create"]

    assert fetch_one(database_url, "SELECT archived_at FROM sales_leads WHERE lead_code = 'app:1'")[0] is None
    assert fetch_one(database_url, "SELECT is_active FROM bookings WHERE source_payload_id = 'zoho:1'")[0] is True

    # After the swap there is nothing left to change.
    again = run_job("kommo_dry_run_job")
    after = get_run(database_url, again.run_id)["change_preview"]
    assert after["bookings"]["add"] == after["bookings"]["update"] == after["bookings"]["deactivate"] == 0
    assert after["clients"] == {"add": 0, "update": 0} and after["vehicles"] == {"create": 0}


def test_preview_is_shown_on_the_staging_materialization(kommo_env, database_url):
    result = run_job("kommo_dry_run_job")
    assert result.success
    staged = next(
        e.event_specific_data.materialization for e in result.get_asset_materialization_events()
        if e.asset_key.path[-1] == "stg_kommo_leads")
    assert "Bookings to add" in staged.metadata["change_preview"].value
    counts = staged.metadata["change_counts"].value
    assert counts["bookings"]["add"] == get_run(database_url, result.run_id)["change_preview"]["bookings"]["add"] > 0


def test_warning_checks_count_by_the_snapshot_rules_in_one_sql_function(kommo_env, database_url):
    """The change preview stores the warning counts (kommo_staging_warnings) and the checks report them; a
    run whose preview holds none gets the same counts from the same function."""
    expected = expected_snapshot(kommo_env)
    result = run_job("kommo_dry_run_job")
    assert result.success
    checks = {e.check_name: e.metadata["count"].value for e in result.get_asset_check_evaluations()
              if "count" in e.metadata}
    preview = get_run(database_url, result.run_id)["change_preview"]
    stored = preview["warnings"]
    unmapped = sum(1 for e in expected.values() if e["is_booking"] and e["status_id"] not in STATUS_MAP)
    undated = sum(1 for e in expected.values() if e["is_booking"] and e["start_at"] is None)
    assert checks["all_statuses_mapped"] == stored["unmapped_status"] == unmapped
    assert checks["all_bookings_dated"] == stored["booking_without_dates"] == undated
    assert checks["all_leads_have_contact"] == stored["lead_without_contact"]
    assert checks["no_vehicles_to_create"] == stored["vehicles_to_create"] == preview["vehicles"]["create"] > 0

    fetch_one(database_url, "UPDATE kommo_import_runs SET change_preview = change_preview - 'warnings'"
                            " WHERE id = %s RETURNING 1", (result.run_id,))
    with connect(database_url) as conn:
        assert ImportRuns(conn).warnings(result.run_id) == stored
