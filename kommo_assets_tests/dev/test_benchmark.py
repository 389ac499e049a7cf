"""The benchmark's pieces work (``kommo-assets benchmark``): its arithmetic, the fast payload path it
measures, and one tiny invocation end to end. No timing is asserted: that is the benchmark's job."""

import json
import math

import pytest

from kommo_assets.db.staging import payload_json
from kommo_assets.dev import benchmark
from kommo_assets.dev import benchmark_incremental as incremental
from kommo_assets.kommo.fields import sanitize_payload


@pytest.mark.parametrize(
    ("leads_received", "contacts_requested", "expected"),
    [
        (501, 251, 3 + 2 + 2),  # a short last page ends the leads; contacts in batches of 250; two fields
        (500, 250, 2 + 1 + 1 + 2),  # a full last page: the 204 that proves the end is needed too
        (0, 0, 1 + 0 + 2),  # nothing in the window: one 204
        (118_519, 71_765, 475 + 288 + 2),
    ],
)
def test_requests_needed(leads_received: int, contacts_requested: int, expected: int) -> None:
    assert benchmark.requests_needed(leads_received, contacts_requested) == expected


def test_generated_leads_for_a_snapshot_size() -> None:
    assert benchmark.generated_for(100_000) == 148_149
    assert benchmark.generated_for(1_000_000) == math.ceil(1_000_000 / benchmark.STAGED_SHARE)


@pytest.mark.parametrize(
    "payload",
    [
        {"id": 1, "name": "Ana", "custom_fields_values": [{"values": [{"value": 1.5, "enum_id": 3}]}], "x": None},
        {"id": 2, "name": "zero \x00 byte", "nested": {"k\x00ey": ["a\x00", 1]}},
        {"id": 3, "name": "lone \ud800 surrogate", "ok": "emoji \U0001f600 and ü"},
        {"id": 4, "price": float("nan"), "other": float("inf"), "list": (1, 2)},
        {"id": 5, "text": "a literal backslash-u0000: \\u0000"},
    ],
    ids=["plain", "nul", "surrogate", "nan", "escaped-text"],
)
def test_the_fast_payload_text_is_the_sanitized_payload(payload: dict) -> None:
    """Staging writes payload_json(lead) as jsonb text: the same document as the deep-copying sanitizer."""
    text = payload_json(payload)
    text.encode("utf-8")  # no lone surrogate survives
    assert json.loads(text) == sanitize_payload(payload)
    assert "\\u0000" not in text.replace("\\\\u0000", "")


def test_a_tiny_benchmark_prints_every_figure(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert benchmark.main(["--leads", "2000", "--latency-ms", "0", "--no-baseline", "--rps", "100",
                           "--client-rps", "90", "--no-incremental", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for figure in ("total wall time", "floor (requests/limit)", "wall / floor", "requests made", "429s received",
                   "staging rows/s", "swap seconds", "re-run swap (unchanged)", "peak RSS of the worker",
                   "where the time goes"):
        assert figure in printed, figure
    report = json.loads(out.read_text())
    job, rerun = report["job"], report["job_rerun"]
    assert job["success"] and rerun["success"]
    assert 1200 <= job["leads"] <= 2800 and job["contacts"] > 0
    assert job["requests"] >= benchmark.requests_needed(job["leads_received"], job["contacts_requested"])
    assert job["peak_rss_mb"] > 0 and job["swap_seconds"] >= 0
    assert report["config"]["generated"] == benchmark.generated_for(2000)


def test_a_change_mix_keeps_its_shares_and_deactivates_under_the_guard() -> None:
    kinds = incremental.kind_mix(100)
    assert len(kinds) == 100 and set(kinds) == set(incremental.KIND_WEIGHTS)
    assert sum(kind in ("lost", "follow_up", "delete") for kind in kinds) <= 50  # KOMMO_SYNC_MAX_DEACTIVATIONS
    assert len(incremental.kind_mix(20)) == 20 and len(incremental.kind_mix(2)) == 2


def test_percentiles_interpolate_between_ranks() -> None:
    values = [float(v) for v in range(1, 21)]
    assert incremental.percentile(values, 50) == 10.5
    assert incremental.percentile(values, 95) == pytest.approx(19.05)
    assert incremental.percentile([3.0], 95) == 3.0
    assert math.isnan(incremental.percentile([], 50))


@pytest.mark.timeout(300)
def test_a_tiny_incremental_benchmark_prints_every_figure(tmp_path, capsys) -> None:
    """One full refresh, the idle tick, a sync of 20 changes, and the daemon with 2 changes at a 3 s
    sensor interval; every figure printed and every change found in production."""
    out = tmp_path / "bench.json"
    assert benchmark.main(["--leads", "2000", "--latency-ms", "0", "--rps", "100", "--client-rps", "90",
                           "--incremental-only", "--sync-changes", "20", "--freshness-changes", "2",
                           "--freshness-spread", "2", "--freshness-timeout", "60", "--sync-interval", "3",
                           "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for figure in ("Account loaded by one full refresh", "idle tick requests", "tick after the changes",
                   "sync of changed leads", "sync requests", "sync run start -> commit", "changes in production",
                   "change -> visible p50", "change -> visible p95", "change -> visible max", "changes visible",
                   "increments the daemon ran", "wall time", "mapping edit re-derived", "edit -> committed",
                   "local drift check"):
        assert figure in printed, figure
    assert "total wall time" not in printed.split("Incremental sync")[0]  # no full-refresh block, no re-run
    inc = json.loads(out.read_text())["incremental"]
    assert inc["idle_tick"]["requests"] <= 3 and inc["idle_tick"]["run_requests"] == 0
    assert inc["change_tick"]["run_requests"] == 1
    sync = inc["sync"]
    assert sync["success"] and sync["visible"] == inc["changes"] == 20
    assert 0 < sync["commit_seconds"] < sync["wall_seconds"]
    assert sync["requests"] == sync["client_requests"] > 0
    rederive = inc["rederive"]
    assert rederive["success"] and rederive["rederived_leads"] >= rederive["leads_reached"] > 1000
    assert rederive["bookings_shown"] == rederive["bookings"] > 0 and rederive["commit_seconds"] > 0
    assert inc["drift_check"]["drift"] == 0 and inc["drift_check"]["leads"] > 1000
    fresh = inc["freshness"]
    assert fresh["visible"] == fresh["changes"] == 2, fresh["not_visible"]
    assert 0 < fresh["p50"] <= fresh["p95"] <= fresh["max"] <= 60
    assert fresh["increments"].get("succeeded", 0) >= 1
