"""The simulator over real HTTP: paging, filters, errors, rate limits, faults, latency, control, CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from kommo_assets.dev.simulator import (
    CONTACT_ID_BASE,
    LEAD_ID_BASE,
    PIPELINE_CORPORATE,
    PIPELINE_RENTAL,
    STATUS_LOST,
    STATUS_WON,
    VEHICLE_FIELD_ID,
    KommoSimulator,
    SimulatorConfig,
)

TOKEN = "test-token-123"
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def sim():
    with KommoSimulator(SimulatorConfig(leads=3000, seed=5, token=TOKEN, rate_limit_rps=0)) as s:
        yield s


@pytest.fixture(autouse=True)
def _clean(request):
    yield
    if "sim" in request.fixturenames:
        s = request.getfixturevalue("sim")
        s.clear_faults()
        s.set_latency(0)


def session() -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {TOKEN}"
    return s


@pytest.fixture()
def http() -> requests.Session:
    with session() as s:
        yield s


def leads_url(sim: KommoSimulator) -> str:
    return f"{sim.base_url}/api/v4/leads"


def page_ids(resp: requests.Response) -> list[int]:
    return [x["id"] for x in resp.json()["_embedded"]["leads"]]


def window_params(sim: KommoSimulator) -> dict:
    ds = sim.dataset
    return {"filter[created_at][from]": ds.window_start, "filter[created_at][to]": ds.window_end - 1}


def expected_window_ids(sim: KommoSimulator) -> list[int]:
    ds = sim.dataset
    return [x["id"] for x in ds.iter_leads() if ds.window_start <= x["created_at"] < ds.window_end]


# --- leads list ------------------------------------------------------------------------------------


def test_paging_to_exhaustion_yields_each_window_lead_once(sim, http):
    seen: list[int] = []
    page = 1
    last_body = None
    while True:
        r = http.get(leads_url(sim), params={**window_params(sim), "limit": 250, "page": page,
                                              "with": "contacts,catalog_elements"})
        if r.status_code == 204:
            assert r.content == b""
            break
        assert r.status_code == 200
        assert r.headers["Content-Type"] == "application/hal+json"
        body = r.json()
        assert body["_page"] == page
        assert "_total_items" not in body and "_page_count" not in body
        assert f"page={page + 1}" in body["_links"]["next"]["href"]
        assert f"page={page}" in body["_links"]["self"]["href"]
        assert "filter[created_at][from]" in body["_links"]["self"]["href"]
        seen += [x["id"] for x in body["_embedded"]["leads"]]
        last_body = body
        page += 1
    expected = expected_window_ids(sim)
    assert seen == expected and len(set(seen)) == len(seen)
    assert 0 < len(last_body["_embedded"]["leads"]) < 250  # short last page, still with a next link
    assert "next" in last_body["_links"]
    # following the last page's next link: 204 with an empty body
    r = http.get(last_body["_links"]["next"]["href"])
    assert r.status_code == 204 and r.content == b""


def test_page_size_default_and_clamp(sim, http):
    r = http.get(leads_url(sim))
    assert len(page_ids(r)) == 50 and page_ids(r)[0] == LEAD_ID_BASE
    r = http.get(leads_url(sim), params={"limit": 1000})
    assert len(page_ids(r)) == 250 and "limit=250" in r.json()["_links"]["next"]["href"]
    r = http.get(leads_url(sim), params={"limit": "abc", "page": "x"})
    assert len(page_ids(r)) == 50 and r.json()["_page"] == 1
    r = http.get(leads_url(sim), params={"limit": 7, "page": 3})
    assert page_ids(r) == list(range(LEAD_ID_BASE + 14, LEAD_ID_BASE + 21))


def test_lead_payload_equals_ground_truth(sim, http):
    r = http.get(leads_url(sim), params={"limit": 250, "page": 2, "with": "contacts,catalog_elements"})
    api = r.json()["_embedded"]["leads"]
    truth = sim.dataset.leads([x["id"] for x in api], with_=("contacts", "catalog_elements"))
    assert api == truth
    r = http.get(leads_url(sim), params={"limit": 5})
    for lead in r.json()["_embedded"]["leads"]:
        assert set(lead["_embedded"]) == {"tags", "companies"}
    r = http.get(f"{leads_url(sim)}/{LEAD_ID_BASE + 3}", params={"with": "contacts"})
    assert r.json() == sim.dataset.lead(LEAD_ID_BASE + 3)


def test_created_at_range_is_inclusive_and_exact(sim, http):
    ds = sim.dataset
    start, end = ds.window_start, ds.window_end
    r = http.get(leads_url(sim), params={"filter[created_at][from]": start, "filter[created_at][to]": start,
                                         "limit": 250})
    assert [x["created_at"] for x in r.json()["_embedded"]["leads"]] == [start]
    r = http.get(leads_url(sim), params={**window_params(sim), "order[created_at]": "desc", "limit": 2})
    assert [x["created_at"] for x in r.json()["_embedded"]["leads"]] == [
        end - 1, max(x["created_at"] for x in ds.iter_leads() if x["created_at"] < end - 1)]
    r = http.get(leads_url(sim), params={"filter[created_at][from]": 1, "filter[created_at][to]": 2})
    assert r.status_code == 204 and r.content == b""


def test_id_status_pipeline_filters_and_ignored_filters(sim, http):
    base = LEAD_ID_BASE
    r = http.get(f"{leads_url(sim)}?filter[id][]={base + 9}&filter[id][]={base + 4}&filter[id][]=1")
    assert page_ids(r) == [base + 4, base + 9]
    r = http.get(leads_url(sim), params={"filter[id]": base + 42})
    assert page_ids(r) == [base + 42]
    params = {
        **window_params(sim), "limit": 250,
        "filter[statuses][0][pipeline_id]": PIPELINE_RENTAL, "filter[statuses][0][status_id]": STATUS_WON,
        "filter[statuses][1][pipeline_id]": PIPELINE_CORPORATE, "filter[statuses][1][status_id]": STATUS_LOST,
    }
    got = []
    page = 1
    while (r := http.get(leads_url(sim), params={**params, "page": page})).status_code == 200:
        got += r.json()["_embedded"]["leads"]
        page += 1
    ds = sim.dataset
    want = [x["id"] for x in ds.iter_leads() if ds.window_start <= x["created_at"] < ds.window_end
            and (x["pipeline_id"], x["status_id"]) in {(PIPELINE_RENTAL, 142), (PIPELINE_CORPORATE, 143)}]
    assert [x["id"] for x in got] == want and want
    r = http.get(leads_url(sim), params={"filter[pipeline_id]": PIPELINE_CORPORATE, "limit": 250})
    assert {x["pipeline_id"] for x in r.json()["_embedded"]["leads"]} == {PIPELINE_CORPORATE}
    plain = page_ids(http.get(leads_url(sim), params={"limit": 100}))
    for junk in ({"filter[status_id]": "143"}, {"filter[statuses]": "[142]"}, {"filter[created_at][from]": "x"},
                 {"filter[statuses][0][status_id]": "143"}, {"order[name]": "asc"}, {"bogus": "1"}):
        assert page_ids(http.get(leads_url(sim), params={"limit": 100, **junk})) == plain, junk


def test_order_updated_at_desc(sim, http):
    r = http.get(leads_url(sim), params={"order[updated_at]": "desc", "limit": 250})
    updated = [x["updated_at"] for x in r.json()["_embedded"]["leads"]]
    assert updated == sorted(updated, reverse=True)
    assert updated[0] == max(x["updated_at"] for x in sim.dataset.iter_leads())


# --- other endpoints -------------------------------------------------------------------------------


def test_contacts_by_ids(sim, http):
    ds = sim.dataset
    referenced = sorted({c["id"] for x in ds.iter_leads() for c in x["_embedded"]["contacts"]})
    missing = [c for c in referenced if ds.contact(c) is None]
    assert missing  # leads pointing at deleted contacts exist
    batch = referenced[:200]
    query = "&".join(f"filter[id][]={c}" for c in batch)
    r = http.get(f"{sim.base_url}/api/v4/contacts?{query}&limit=250")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/hal+json"
    got = r.json()["_embedded"]["contacts"]
    assert [c["id"] for c in got] == [c for c in batch if ds.contact(c) is not None]
    assert got == [ds.contact(c["id"]) for c in got]
    r = http.get(f"{sim.base_url}/api/v4/contacts?{query}&limit=100&page=2")
    assert [c["id"] for c in r.json()["_embedded"]["contacts"]] == [c["id"] for c in got][100:]
    r = http.get(f"{sim.base_url}/api/v4/contacts", params={"filter[id][]": missing[:3]})
    assert r.status_code == 204 and r.content == b""
    r = http.get(f"{sim.base_url}/api/v4/contacts", params={"filter[id]": batch[0]})
    assert [c["id"] for c in r.json()["_embedded"]["contacts"]] == [batch[0]]


def test_custom_field_and_pipelines(sim, http):
    r = http.get(f"{sim.base_url}/api/v4/leads/custom_fields/{VEHICLE_FIELD_ID}")
    assert r.status_code == 200 and r.json() == sim.dataset.field(VEHICLE_FIELD_ID)
    assert len(r.json()["enums"]) == 30
    r = http.get(f"{sim.base_url}/api/v4/leads/custom_fields/4242")
    assert r.status_code == 204 and r.content == b""
    r = http.get(f"{sim.base_url}/api/v4/leads/pipelines")
    body = r.json()
    assert body["_total_items"] == 2
    for p in body["_embedded"]["pipelines"]:
        assert {142, 143} <= {s["id"] for s in p["_embedded"]["statuses"]}
        assert all(s["pipeline_id"] == p["id"] for s in p["_embedded"]["statuses"])


def test_auth_and_unknown_paths(sim, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.get(leads_url(sim), headers=headers)
        assert r.status_code == 401
        assert r.headers["Content-Type"] == "application/problem+json"
        body = r.json()
        assert body["title"] == "Unauthorized" and body["status"] == 401
        assert body["type"] == "https://httpstatus.es/401" and body["detail"]
        assert TOKEN not in r.text
    r = http.get(f"{sim.base_url}/api/v4/nope")
    assert r.status_code == 404 and r.headers["Content-Type"] == "application/problem+json"
    assert r.json()["status"] == 404


def test_keep_alive_reuses_one_connection(sim, http):
    sim.reset_stats()
    for _ in range(5):
        assert http.get(leads_url(sim), params={"limit": 1}).status_code == 200
    assert sim.stats()["connections"] == 1
    assert sim.stats()["requests"] == 5


# --- rate limiting ---------------------------------------------------------------------------------


def test_burst_above_rate_gets_html_429_without_retry_after():
    with KommoSimulator(SimulatorConfig(leads=100, token=TOKEN, rate_limit_rps=5)) as s, session() as http:
        codes = []
        t0 = time.monotonic()
        for _ in range(12):
            r = http.get(f"{s.base_url}/api/v4/leads", params={"limit": 1})
            codes.append(r.status_code)
            if r.status_code == 429:
                assert r.headers["Content-Type"].startswith("text/html")
                assert "Retry-After" not in r.headers
                assert r.text.lstrip().startswith("<html>")
                with pytest.raises(ValueError):
                    r.json()
        assert time.monotonic() - t0 < 0.9
        assert codes[:5] == [200] * 5 and codes[5:] == [429] * 7
        stats = s.stats()
        assert stats["throttled_429"] == 7 and stats["max_requests_in_any_second"] == 12
        # rejected requests do not enter the window: keep knocking (all 429) for most of a second, then
        # once the five admitted requests are a second old the window is open again
        time.sleep(1.1)
        t1 = time.monotonic()
        assert [http.get(f"{s.base_url}/api/v4/leads").status_code for _ in range(5)] == [200] * 5
        admitted = time.monotonic()
        while time.monotonic() < t1 + 0.85:
            assert http.get(f"{s.base_url}/api/v4/leads").status_code == 429
            time.sleep(0.05)
        time.sleep(max(0.0, admitted + 1.02 - time.monotonic()))
        assert http.get(f"{s.base_url}/api/v4/leads", params={"limit": 1}).status_code == 200
        # a paced client never sees a 429
        s.reset_stats()
        time.sleep(1.0)
        for _ in range(6):
            assert http.get(f"{s.base_url}/api/v4/leads", params={"limit": 1}).status_code == 200
            time.sleep(0.21)
        assert s.stats()["throttled_429"] == 0


def test_ban_after_violations_returns_403_html_for_everything():
    cfg = SimulatorConfig(leads=100, token=TOKEN, rate_limit_rps=2, ban_after_violations=3)
    with KommoSimulator(cfg) as s, session() as http:
        codes = [http.get(f"{s.base_url}/api/v4/leads").status_code for _ in range(6)]
        assert codes == [200, 200, 429, 429, 429, 403]
        time.sleep(1.1)
        r = http.get(f"{s.base_url}/api/v4/leads/pipelines")
        assert r.status_code == 403 and r.headers["Content-Type"].startswith("text/html")
        assert "403 Forbidden" in r.text and "blocked" in r.text.lower()
        assert requests.get(f"{s.base_url}/api/v4/leads").status_code == 403  # even without a token
        assert s.stats()["banned"] is True
        s.unban()
        assert http.get(f"{s.base_url}/api/v4/leads").status_code == 200


# --- faults ----------------------------------------------------------------------------------------


def test_fault_status_with_after_and_times(sim, http):
    sim.add_fault(kind="status", path="/api/v4/leads", status=500, after=1, times=2)
    codes = [http.get(leads_url(sim), params={"limit": 1}).status_code for _ in range(4)]
    assert codes == [200, 500, 500, 200]
    sim.add_fault(kind="status", path="/api/v4/leads", status=503)
    r = http.get(leads_url(sim))
    assert r.status_code == 503 and r.headers["Content-Type"].startswith("text/html")
    sim.add_fault(kind="status", path="/api/v4/leads", status=429, body="<html>slow down</html>",
                  headers={"Retry-After": "2"})
    r = http.get(leads_url(sim))
    assert r.status_code == 429 and r.headers["Retry-After"] == "2" and r.text == "<html>slow down</html>"
    sim.add_fault(kind="status", path="/api/v4/leads", status=502)
    assert http.get(leads_url(sim)).status_code == 502
    assert http.get(leads_url(sim)).status_code == 200


def test_fault_path_matching(sim, http):
    sim.add_fault(kind="status", path="/api/v4/leads", status=500, times=-1)
    assert http.get(f"{sim.base_url}/api/v4/leads/custom_fields/{VEHICLE_FIELD_ID}").status_code == 200
    assert http.get(f"{sim.base_url}/api/v4/leads/pipelines").status_code == 200
    assert http.get(f"{sim.base_url}/api/v4/leads/{LEAD_ID_BASE}").status_code == 500
    assert http.get(leads_url(sim)).status_code == 500
    sim.clear_faults()
    sim.add_fault(kind="status", path="/api/v4/leads", path_exact=True, query={"page": "3"}, status=500)
    assert http.get(leads_url(sim), params={"page": 2}).status_code == 200
    assert http.get(f"{sim.base_url}/api/v4/leads/{LEAD_ID_BASE}", params={"page": 3}).status_code == 200
    assert http.get(leads_url(sim), params={"page": 3}).status_code == 500
    sim.add_fault(kind="status", path="/api/v4/", status=418)
    assert http.get(f"{sim.base_url}/api/v4/leads/pipelines").status_code == 418


def test_fault_reset_truncate_empty_slow(sim, http):
    sim.add_fault(kind="reset", path="/api/v4/leads")
    with pytest.raises(requests.ConnectionError):
        http.get(leads_url(sim))
    assert http.get(leads_url(sim)).status_code == 200  # the client reconnects

    sim.add_fault(kind="truncate", path="/api/v4/leads")
    with pytest.raises(requests.RequestException):  # the body ends before Content-Length
        http.get(leads_url(sim), params={"limit": 250})
    sim.add_fault(kind="truncate", path="/api/v4/leads", mode="honest")
    r = http.get(leads_url(sim), params={"limit": 250})
    assert r.status_code == 200
    with pytest.raises(ValueError):
        json.loads(r.content)

    sim.add_fault(kind="empty", path="/api/v4/leads")
    r = http.get(leads_url(sim))
    assert r.status_code == 204 and r.content == b""

    sim.add_fault(kind="slow", path="/api/v4/leads", delay_s=0.4)
    t0 = time.monotonic()
    r = http.get(leads_url(sim), params={"limit": 3})
    assert time.monotonic() - t0 >= 0.4 and len(page_ids(r)) == 3
    stats = sim.stats()
    assert stats["by_status"].get("reset", 0) >= 1 and stats["faults_fired"] >= 5


def test_fault_mutate_shifts_pages_while_paging():
    with KommoSimulator(SimulatorConfig(leads=600, token=TOKEN, rate_limit_rps=0)) as s, session() as http:
        url = f"{s.base_url}/api/v4/leads"
        first = page_ids(http.get(url, params={"limit": 100, "page": 1}))
        assert first == list(range(LEAD_ID_BASE, LEAD_ID_BASE + 100))
        s.add_fault(kind="mutate", path="/api/v4/leads", op="delete_leads", ids=first[:10])
        second = page_ids(http.get(url, params={"limit": 100, "page": 2}))
        # ten leads vanished from page 1, so page 2 starts ten leads later: 10 leads were skipped
        assert second[0] == LEAD_ID_BASE + 110
        s.add_fault(kind="mutate", path="/api/v4/leads", op="add_lead", created_at=s.dataset.spread_start - 5)
        r = http.get(url, params={"limit": 100, "page": 1, "order[created_at]": "asc"})
        assert page_ids(r)[0] == LEAD_ID_BASE + 600  # the new lead sorts first by created_at


def test_faults_over_http_control(sim, http):
    ctl = f"{sim.base_url}/_simulator/faults"
    r = requests.post(ctl, json={"kind": "status", "path": "/api/v4/contacts", "status": 500, "times": -1})
    assert r.status_code == 200 and r.json()["id"] > 0
    assert http.get(f"{sim.base_url}/api/v4/contacts", params={"filter[id]": CONTACT_ID_BASE}).status_code == 500
    listed = requests.get(ctl).json()["faults"]
    assert listed[0]["fired"] == 1 and listed[0]["times"] == -1
    assert requests.delete(ctl).status_code == 200
    assert requests.get(ctl).json()["faults"] == []
    r = requests.post(ctl, json={"kind": "explode"})
    assert r.status_code == 400


# --- latency and concurrency -----------------------------------------------------------------------


def test_latency_is_concurrent(sim):
    requests.post(f"{sim.base_url}/_simulator/latency", json={"ms": 300}).raise_for_status()
    sim.reset_stats()

    def one(_):
        with session() as s:
            t = time.monotonic()
            assert s.get(leads_url(sim), params={"limit": 10}).status_code == 200
            return time.monotonic() - t

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        durations = list(pool.map(one, range(4)))
    total = time.monotonic() - t0
    assert all(d >= 0.3 for d in durations)
    assert total < 1.0
    assert sim.stats()["max_in_flight"] >= 3


# --- control endpoints -----------------------------------------------------------------------------


def test_control_endpoints():
    with KommoSimulator(SimulatorConfig(leads=200, token=TOKEN, rate_limit_rps=0)) as s, session() as http:
        ctl = f"{s.base_url}/_simulator"
        assert requests.get(f"{ctl}/health").json()["status"] == "ok"
        http.get(f"{s.base_url}/api/v4/leads")
        stats = requests.get(f"{ctl}/stats").json()
        assert stats["requests"] == 1 and stats["by_path"] == {"/api/v4/leads": 1}
        assert stats["by_status"] == {"200": 1}
        assert requests.post(f"{ctl}/reset_stats").status_code == 200
        assert requests.get(f"{ctl}/stats").json()["requests"] == 0

        r = requests.post(f"{ctl}/mutations", json={"op": "delete_leads", "ids": [LEAD_ID_BASE]})
        assert r.json()["deleted"] == 1
        assert http.get(f"{s.base_url}/api/v4/leads/{LEAD_ID_BASE}").status_code == 204
        assert page_ids(http.get(f"{s.base_url}/api/v4/leads", params={"limit": 1})) == [LEAD_ID_BASE + 1]
        r = requests.post(f"{ctl}/mutations", json={"op": "update_lead", "lead_id": LEAD_ID_BASE + 1,
                                                    "status_id": STATUS_LOST,
                                                    "custom_fields": {str(VEHICLE_FIELD_ID): None}})
        assert r.status_code == 200
        lead = http.get(f"{s.base_url}/api/v4/leads/{LEAD_ID_BASE + 1}").json()
        assert lead["status_id"] == STATUS_LOST
        assert all(i["field_id"] != VEHICLE_FIELD_ID for i in lead["custom_fields_values"] or ())
        r = requests.post(f"{ctl}/mutations", json={"op": "add_lead", "created_at": s.dataset.window_start})
        assert r.json()["id"] == LEAD_ID_BASE + 200
        contact = next(c["id"] for x in s.dataset.iter_leads() for c in x["_embedded"]["contacts"]
                       if s.dataset.contact(c["id"]) is not None)
        requests.post(f"{ctl}/mutations", json={"op": "delete_contacts", "ids": [contact]}).raise_for_status()
        assert http.get(f"{s.base_url}/api/v4/contacts", params={"filter[id][]": contact}).status_code == 204

        requests.post(f"{ctl}/mutations", json={"op": "revoke_token"}).raise_for_status()
        assert http.get(f"{s.base_url}/api/v4/leads").status_code == 401
        requests.post(f"{ctl}/mutations", json={"op": "set_token", "token": TOKEN}).raise_for_status()
        assert http.get(f"{s.base_url}/api/v4/leads").status_code == 200
        assert requests.post(f"{ctl}/mutations", json={"op": "nope"}).status_code == 400
        assert requests.get(f"{ctl}/nope").status_code == 404


# --- scale and CLI ---------------------------------------------------------------------------------


def test_million_leads_page_1000_is_fast():
    t0 = time.monotonic()
    with KommoSimulator(SimulatorConfig(leads=1_000_000, token=TOKEN, rate_limit_rps=0)) as s, session() as http:
        assert time.monotonic() - t0 < 1.0
        t1 = time.monotonic()
        r = http.get(f"{s.base_url}/api/v4/leads", params={**window_params(s), "limit": 250, "page": 1000,
                                                             "with": "contacts,catalog_elements"})
        assert time.monotonic() - t1 < 1.0
        ids = page_ids(r)
        first_in_window = LEAD_ID_BASE + 100_000  # 10% of the leads come before the window
        assert ids == list(range(first_in_window + 999 * 250, first_in_window + 1000 * 250))
        assert http.get(f"{s.base_url}/api/v4/leads", params={**window_params(s), "limit": 250,
                                                                "page": 3201}).status_code == 204


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_cli_prints_ready_line_serves_and_stops_on_sigterm():
    secret = "cli-secret-token-987"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kommo_assets.dev.simulator", "--leads", "1000000", "--port", "0",
         "--token", secret, "--rps", "0", "--seed", "3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        line = proc.stdout.readline()
        m = re.fullmatch(r"KOMMO_SIMULATOR_READY base_url=(http://127\.0\.0\.1:\d+)\n", line)
        assert m, line
        base = m.group(1)
        r = requests.get(f"{base}/api/v4/leads", params={"limit": 250, "page": 1000},
                         headers={"Authorization": f"Bearer {secret}"}, timeout=10)
        assert r.status_code == 200 and len(r.json()["_embedded"]["leads"]) == 250
        assert requests.get(f"{base}/_simulator/health", timeout=5).json()["leads"] == 1_000_000
        if Path(f"/proc/{proc.pid}/status").exists():
            assert _rss_kb(proc.pid) < 150_000
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert secret not in line + out + err
        assert out == ""  # exactly one line was printed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
