"""The benchmark's incremental section: what the incremental sync costs on the account the full refresh
just loaded, in the same invocation (``kommo-assets benchmark``; ``--incremental-only``, ``--no-incremental``).

* An idle tick: the real ``kommo_incremental_sync_sensor`` evaluated once when nothing changed (target: at
  most 3 requests), then once more after the changes (it must ask for a run).
* A sync of changed leads (100 by default: dates, vehicle, price and status edits, creations, deletions,
  made through the simulator's mutation API): the real ``kommo_incremental_sync_job``, in a worker process
  as the full refresh runs, timed from the run's start to the commit of the increment (targets: at most
  10 requests, 5 s). Every change is then looked up in production.
* A mapping edit re-derived: every source option mapped in ``kommo_source_map`` (most of the account's
  leads reached), then the same job with nothing changed in Kommo, timed from its start to its commit
  (target: 5 s).
* The local drift check of the year (``bookings_follow_mirror``'s query) on the whole account (target: 10 s).
* Freshness with the daemon: ``kommo-assets dev`` (``dagster dev``: webserver, daemon, code server) on the
  benchmark's database and simulator, the sync sensor at its interval (60 s unless told otherwise), and
  changes made at random moments; each is timed from the change to the moment its booking shows it in
  ``calendar_events_expanded`` (or its sales lead, for a price) (target: 90 s).

Requests are the simulator's own count (``/_simulator/stats``) around each measured step.
"""

import argparse
import json
import math
import os
import random
import shutil
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

import psycopg

# Simulator statuses (see the simulator's dataset): where a change moves a booking.
STATUS_QUOTE_SENT, STATUS_CONFIRMED, STATUS_CAR_DELIVERED, STATUS_WON = 79790634, 79790637, 79790640, 142
STATUS_LOST, STATUS_FOLLOW_UP = 143, 91703923
BOOKING_STATUSES = (STATUS_QUOTE_SENT, STATUS_CONFIRMED, STATUS_CAR_DELIVERED, STATUS_WON)
VEHICLE_FIELD, DELIVERY_FIELD, COLLECT_FIELD = "1234163", "1218176", "1218178"
DAY = 86_400
# A creation lands in the sync's window (the benchmark's KOMMO_REFRESH_YEARS, the dataset's year: 2025-01-01 ..
# 2026-01-01), with its delivery a few weeks later.
WINDOW_FROM = 1_735_689_600
CREATE_FROM, CREATE_TO = WINDOW_FROM + 30 * DAY, 1_767_225_600 - 30 * DAY  # deliveries 2025-01-31 .. 2025-12-02

# The kinds of change and their share of a batch. Deactivations (lost, follow-up, delete) stay at a fifth,
# well under the sync's guard (KOMMO_SYNC_MAX_DEACTIVATIONS, 50) at 100 changes.
KIND_WEIGHTS = {"dates": 20, "vehicle": 15, "price": 15, "status": 15, "create": 15, "lost": 8, "delete": 7,
                "follow_up": 5}

SIMULATOR_STATS = "/_simulator/stats"


def simulator_call(base_url: str, path: str, method: str = "GET", body: object | None = None) -> dict:
    """A call to the simulator's control API (no auth, not counted in its stats)."""
    data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
    request = urllib.request.Request(base_url + path, method=method, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def kind_mix(n: int) -> list[str]:
    """``n`` kinds of change in the shares of KIND_WEIGHTS (largest remainders), in a fixed order."""
    total = sum(KIND_WEIGHTS.values())
    exact = {kind: n * w / total for kind, w in KIND_WEIGHTS.items()}
    counts = {kind: math.floor(x) for kind, x in exact.items()}
    for kind in sorted(exact, key=lambda k: counts[k] - exact[k])[: n - sum(counts.values())]:
        counts[kind] += 1
    return [kind for kind in KIND_WEIGHTS for _ in range(counts[kind])]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between the closest ranks (as numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# --- changes and what production shows of them -----------------------------------------------------

@dataclass
class Change:
    """One change made in the simulator, and what production shows once it is synced (``expect``: the
    values of :func:`observe` that must hold)."""

    kind: str
    lead_id: int | None  # None until a creation is made
    mutation: dict
    expect: dict
    made_at: float | None = None  # time.time() when the simulator had applied it
    visible_at: float | None = None

    @property
    def code(self) -> str:
        return f"kommo:{self.lead_id}"


_BOOKINGS = """
SELECT substr(b.source_payload_id, 7)::bigint, b.kommo_status_id, extract(epoch FROM b.start_at)::bigint,
       v.kommo_vehicle_id, s.value_amount
  FROM bookings b
  JOIN sales_leads s ON s.id = b.sales_lead_id
  LEFT JOIN vehicles v ON v.id = b.vehicle_id
 WHERE b.source_payload_id LIKE 'kommo:%%' AND b.channel = 'Kommo' AND b.is_active AND b.start_at IS NOT NULL
   AND b.kommo_status_id = ANY(%s)
 ORDER BY 1
"""

_OBSERVE = """
SELECT s.value_amount, b.kommo_status_id, extract(epoch FROM e.start_at)::bigint,
       extract(epoch FROM e.end_at)::bigint, v.kommo_vehicle_id, e.booking_id IS NOT NULL
  FROM (SELECT %(code)s::text AS code) k
  LEFT JOIN sales_leads s ON s.lead_code = k.code
  LEFT JOIN bookings b ON b.source_payload_id = k.code
  LEFT JOIN calendar_events_expanded e ON e.booking_id = b.id
  LEFT JOIN vehicles v ON v.id = e.vehicle_id
"""


def observe(conn: psycopg.Connection, code: str) -> dict:
    """What production shows of one lead: its calendar entry (dates, vehicle), its booking's status and its
    sales lead's price."""
    price, status, start, end, vehicle, in_calendar = conn.execute(_OBSERVE, {"code": code}).fetchone()
    return {"price": price, "status": status, "start_at": start, "end_at": end, "vehicle": vehicle,
            "in_calendar": in_calendar}


def shows(conn: psycopg.Connection, change: Change) -> bool:
    seen = observe(conn, change.code)
    return all(seen[key] == value for key, value in change.expect.items())


def plan_changes(conn: psycopg.Connection, kinds: list[str], rng: random.Random,
                 avoid: set[int] = frozenset()) -> list[Change]:
    """One change per kind, each on its own lead (a dated booking in the calendar now), in random order.
    Every change makes production differ from what it shows now, so its arrival can be seen."""
    bookings = [row for row in conn.execute(_BOOKINGS, (list(BOOKING_STATUSES),)).fetchall()
                if row[0] not in avoid]
    vehicles = [row[0] for row in conn.execute(
        "SELECT kommo_vehicle_id FROM vehicles WHERE kommo_vehicle_id IS NOT NULL ORDER BY 1").fetchall()]
    needed = sum(kind != "create" for kind in kinds)
    if len(bookings) < needed or len(vehicles) < 2:
        raise RuntimeError(f"the account has {len(bookings)} dated bookings and {len(vehicles)} vehicles: too few "
                           f"for {needed} changes")
    picked = iter(rng.sample(bookings, needed))
    changes = []
    for n, kind in enumerate(rng.sample(kinds, len(kinds))):
        if kind == "create":
            delivery = rng.randrange(CREATE_FROM, CREATE_TO) // 3600 * 3600
            vehicle = rng.choice(vehicles)
            created_at = max(delivery - rng.randrange(1, 60) * DAY, WINDOW_FROM + DAY)
            mutation = {"op": "add_lead", "created_at": created_at,
                        "status_id": STATUS_CONFIRMED, "name": f"Benchmark booking {n}", "price": 100 + n,
                        "main_contact": {"name": f"Benchmark client {n}", "phone": f"+4915100{n:05d}"},
                        "custom_fields": {VEHICLE_FIELD: vehicle, DELIVERY_FIELD: delivery,
                                          COLLECT_FIELD: delivery + 3 * DAY}}
            changes.append(Change(kind, None, mutation, {"in_calendar": True, "start_at": delivery,
                                                         "vehicle": vehicle}))
            continue
        lead_id, status, start, vehicle, price = next(picked)
        update = {"op": "update_lead", "lead_id": lead_id}
        if kind == "dates":
            delivery = start + rng.randrange(1, 10) * DAY
            collect = delivery + rng.randrange(2, 7) * DAY
            mutation = {**update, "custom_fields": {DELIVERY_FIELD: delivery, COLLECT_FIELD: collect}}
            expect = {"in_calendar": True, "start_at": delivery, "end_at": collect}
        elif kind == "vehicle":
            other = rng.choice([v for v in vehicles if v != vehicle])
            mutation, expect = {**update, "custom_fields": {VEHICLE_FIELD: other}}, {"vehicle": other}
        elif kind == "price":
            new_price = int(price or 0) + rng.randrange(10, 500)
            mutation, expect = {**update, "price": new_price}, {"price": Decimal(new_price)}
        elif kind == "status":
            target = rng.choice([s for s in BOOKING_STATUSES if s != status])
            mutation, expect = {**update, "status_id": target}, {"in_calendar": True, "status": target}
        elif kind in ("lost", "follow_up"):
            target = STATUS_LOST if kind == "lost" else STATUS_FOLLOW_UP
            mutation, expect = {**update, "status_id": target}, {"in_calendar": False}
        elif kind == "delete":
            mutation, expect = {"op": "delete_leads", "ids": [lead_id]}, {"in_calendar": False}
        else:
            raise ValueError(f"unknown kind of change {kind!r}")
        changes.append(Change(kind, lead_id, mutation, expect))
    return changes


def make_change(base_url: str, change: Change) -> None:
    answer = simulator_call(base_url, "/_simulator/mutations", "POST", change.mutation)
    change.made_at = time.time()
    if change.lead_id is None:
        change.lead_id = int(answer["id"])


def kinds_summary(changes: list[Change]) -> str:
    counts: dict[str, int] = {}
    for change in changes:
        counts[change.kind] = counts.get(change.kind, 0) + 1
    return ", ".join(f"{kind} {counts[kind]}" for kind in KIND_WEIGHTS if kind in counts)


# --- the worker: idle tick, changes, tick, sync (one process, as the full refresh's worker) ---------

def worker_incremental(args: argparse.Namespace) -> dict:
    """Runs in the benchmark's worker process (``benchmark worker --mode incremental``)."""
    import dagster as dg

    from kommo_assets.automation.sync_sensor import SENSOR_NAME
    from kommo_assets.db.runs import get_run
    from kommo_assets.dev.benchmark import bench_definitions
    from kommo_assets.jobs import INCREMENTAL_SYNC_JOB

    bench_defs = bench_definitions(args)
    sensor = bench_defs.resolve_sensor_def(SENSOR_NAME)
    rng = random.Random(args.seed)
    out: dict = {}

    def stats() -> dict:
        return simulator_call(args.base_url, SIMULATOR_STATS)

    def tick(instance) -> dict:
        simulator_call(args.base_url, "/_simulator/reset_stats", "POST")
        context = dg.build_sensor_context(instance=instance, sensor_name=SENSOR_NAME,
                                          resources={k: bench_defs.resources[k] for k in sensor.required_resource_keys})
        started = time.perf_counter()
        with context:
            result = sensor.evaluate_tick(context)
        wall = time.perf_counter() - started
        seen = stats()
        return {"requests": seen["requests"], "by_path": seen["by_path"], "throttled_429": seen["throttled_429"],
                "wall_seconds": wall, "run_requests": len(result.run_requests or []),
                "skip_reason": result.skip_message}

    with dg.DagsterInstance.ephemeral() as instance:
        out["idle_tick"] = tick(instance)
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            changes = plan_changes(conn, kind_mix(args.changes), rng)
        answer = simulator_call(args.base_url, "/_simulator/mutations", "POST", [c.mutation for c in changes])
        made_at = time.time()
        for change, result in zip(changes, answer["results"], strict=True):
            change.made_at = made_at
            if change.lead_id is None:
                change.lead_id = int(result["id"])
        out["changes"] = len(changes)
        out["kinds"] = kinds_summary(changes)
        out["change_tick"] = tick(instance)

        simulator_call(args.base_url, "/_simulator/reset_stats", "POST")
        committed = _CommitWatch(args.database_url)
        committed.start()
        job = bench_defs.resolve_job_def(INCREMENTAL_SYNC_JOB)
        started_at = time.time()
        result = job.execute_in_process(instance=instance, raise_on_error=False)
        ended_at = time.time()
        committed.stop()
        seen = stats()
        out["rederive"] = _measure_rederive(args, instance, job, stats)
    out["drift_check"] = _measure_drift_check(args.database_url)
    record = get_run(args.database_url, result.run_id) or {}
    client = (record.get("stats") or {}).get("client") or {}
    swap = record.get("swap_counts") or {}
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        visible = sum(shows(conn, change) for change in changes)
    commit_seconds = committed.at - started_at if committed.at else math.nan
    staged = record.get("staged_at")
    out["sync"] = {
        "success": result.success and record.get("status") == "succeeded",
        "status": record.get("status"),
        "error": record.get("error"),
        "requests": seen["requests"],
        "by_path": seen["by_path"],
        "throttled_429": seen["throttled_429"],
        "client_requests": client.get("requests"),
        "commit_seconds": commit_seconds,
        "wall_seconds": ended_at - started_at,
        "staging_seconds": (staged - record["started_at"]).total_seconds() if staged else math.nan,
        "start_seconds": record["started_at"].timestamp() - started_at if record.get("started_at") else math.nan,
        "apply_seconds": (committed.at - staged.timestamp()) if staged and committed.at else math.nan,
        "swap_seconds": float(swap.get("swap_seconds", "nan")),
        "leads": record.get("leads_count"),
        "contacts": record.get("contacts_count"),
        "counts": {k: v for k, v in swap.items() if k != "status"},
        "visible": visible,
    }
    out["success"] = (out["sync"]["success"] and out["change_tick"]["run_requests"] == 1
                      and out["rederive"]["success"])
    if not out["success"]:
        out["error"] = (out["sync"]["error"] or out["rederive"]["error"]
                        or f"tick after the changes: {out['change_tick']}")
    return out


def _measure_rederive(args: argparse.Namespace, instance, job, stats) -> dict:
    """A mapping edit that reaches most of the account (every source option mapped in ``kommo_source_map``),
    then the real sync job with nothing changed in Kommo: timed from the run's start to its commit, as the
    sync of changed leads is."""
    from kommo_assets.db.runs import get_run

    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute("INSERT INTO kommo_source_map (enum_id, source) SELECT enum_id, 'Mapped: ' || value"
                     " FROM kommo_field_options WHERE field_id = 823206"
                     " ON CONFLICT (enum_id) DO UPDATE SET source = EXCLUDED.source")
        (reached,) = conn.execute("SELECT count(*) FROM kommo_leads m JOIN kommo_source_map s"
                                  " ON s.enum_id = m.source_enum_id").fetchone()
    simulator_call(args.base_url, "/_simulator/reset_stats", "POST")
    committed = _CommitWatch(args.database_url)
    committed.start()
    started_at = time.time()
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    committed.stop()
    seen = stats()
    record = get_run(args.database_url, result.run_id) or {}
    swap = record.get("swap_counts") or {}
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        (shown,) = conn.execute("SELECT count(*) FROM bookings b JOIN kommo_leads m ON b.source_payload_id ="
                                " 'kommo:' || m.lead_id JOIN kommo_source_map s ON s.enum_id = m.source_enum_id"
                                " WHERE b.is_active AND b.source = s.source").fetchone()
        (bookings,) = conn.execute("SELECT count(*) FROM bookings b JOIN kommo_leads m ON b.source_payload_id ="
                                   " 'kommo:' || m.lead_id JOIN kommo_source_map s"
                                   " ON s.enum_id = m.source_enum_id WHERE b.is_active").fetchone()
    return {"success": result.success and record.get("status") == "succeeded", "error": record.get("error"),
            "leads_reached": reached, "rederived_leads": swap.get("rederived_leads"),
            "bookings_updated": swap.get("bookings_updated"), "bookings_shown": shown, "bookings": bookings,
            "requests": seen["requests"], "by_path": seen["by_path"],
            "commit_seconds": committed.at - started_at if committed.at else math.nan,
            "swap_seconds": float(swap.get("swap_seconds", "nan"))}


def _measure_drift_check(database_url: str) -> dict:
    """The local drift check of the benchmark's year (``kommo_mirror_drift``): production against the rules
    applied to the mirror, as ``bookings_follow_mirror`` runs it."""
    from kommo_assets.db.windows import mirror_drift
    from kommo_assets.dev.benchmark import _year
    from kommo_assets.reporting import drift_count
    from kommo_assets.scope import window_for

    window = window_for(_year())
    with psycopg.connect(database_url, autocommit=True) as conn:
        (leads,) = conn.execute("SELECT count(*) FROM kommo_leads WHERE created_at >= %s AND created_at < %s",
                                (window.created_from, window.created_to)).fetchone()
        started = time.perf_counter()
        preview = mirror_drift(conn, window)
        seconds = time.perf_counter() - started
    return {"leads": leads, "seconds": seconds, "drift": drift_count(preview)}


class _CommitWatch(threading.Thread):
    """Stamps the moment another connection first sees the sync's state row change: the commit of the
    increment (``kommo_sync_state`` is written in its transaction), not its statement's start."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True, name="commit-watch")
        self.conn = psycopg.connect(database_url, autocommit=True)
        self.before = self._state()
        self.at: float | None = None
        self._halt = threading.Event()

    def _state(self):
        return self.conn.execute("SELECT run_id, updated_at FROM kommo_sync_state").fetchone()

    def run(self) -> None:
        while not self._halt.is_set() and self.at is None:
            if self._state() != self.before:
                self.at = time.time()
            self._halt.wait(0.01)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.conn.close()


# --- freshness with the daemon ----------------------------------------------------------------------

def _daemon_env(database_url: str, base_url: str, dagster_url: str, args: argparse.Namespace) -> dict[str, str]:
    from kommo_assets.dev.benchmark import TOKEN, _year
    from kommo_assets.kommo import DEFAULT_MAX_RPS

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KOMMO_", "DAGSTER_", "SLACK_"))}
    env.update(KOMMO_DATABASE_URL=database_url, KOMMO_BASE_URL=base_url, KOMMO_ACCESS_TOKEN=TOKEN,
               KOMMO_ENABLE_LIVE="1", DAGSTER_POSTGRES_URL=dagster_url, KOMMO_REFRESH_YEARS=str(_year()))
    if args.sync_interval:
        env["KOMMO_SYNC_INTERVAL_SECONDS"] = str(args.sync_interval)
    if args.client_rps != DEFAULT_MAX_RPS:
        env["KOMMO_MAX_RPS"] = str(args.client_rps)
    return env


def _sync_state(conn: psycopg.Connection):
    return conn.execute("SELECT updated_at FROM kommo_sync_state").fetchone()


def measure_freshness(server, database_url: str, base_url: str, root: Path, args: argparse.Namespace) -> dict:
    """``kommo-assets dev`` on the benchmark's database and simulator; changes at random moments over
    ``--freshness-spread`` seconds, each timed until production shows it."""
    from kommo_assets.dev.dagster_dev import launch
    from kommo_assets.settings import sync_interval_seconds

    interval = args.sync_interval or sync_interval_seconds({})
    home = root / "daemon"
    env = _daemon_env(database_url, base_url, server.ensure_database("bench_dagster"), args)
    rng = random.Random(args.seed + 1)
    conn = psycopg.connect(database_url, autocommit=True)
    with conn:
        before = _sync_state(conn)
        db_started = conn.execute("SELECT now()").fetchone()[0]
        started = time.monotonic()
        dev = launch(home, env=env, timeout=300)
        try:
            ready = time.monotonic() - started
            # The sensor's first idle tick records itself: from then on the daemon is at work.
            deadline = time.monotonic() + interval + 180
            while _sync_state(conn) == before:
                if time.monotonic() > deadline or dev.process.poll() is not None:
                    raise RuntimeError(f"the sync sensor did not tick within {interval + 180} s; log tail:\n"
                                       f"{dev.log_tail()}")
                time.sleep(0.5)
            first_tick = time.monotonic() - started
            simulator_call(base_url, "/_simulator/reset_stats", "POST")
            changes = plan_changes(conn, kind_mix(args.freshness_changes), rng)
            moments = sorted(rng.uniform(0, args.freshness_spread) for _ in changes)
            t0 = time.monotonic()
            pending: list[Change] = []
            queue = list(zip(moments, changes, strict=True))
            last_deadline = t0 + args.freshness_spread + args.freshness_timeout
            while queue or pending:
                now = time.monotonic()
                while queue and queue[0][0] <= now - t0:
                    _, change = queue.pop(0)
                    make_change(base_url, change)
                    pending.append(change)
                for change in list(pending):
                    if shows(conn, change):
                        change.visible_at = time.time()
                        pending.remove(change)
                if now > last_deadline or dev.process.poll() is not None:
                    break
                time.sleep(0.25)
            wall = time.monotonic() - started
            seen = simulator_call(base_url, SIMULATOR_STATS)
        finally:
            dev.stop()
            shutil.rmtree(home, ignore_errors=True)
        runs = dict(conn.execute("SELECT status, count(*) FROM kommo_import_runs WHERE kind = 'increment'"
                                 " AND started_at >= %s GROUP BY status", (db_started,)).fetchall())
    latencies = [c.visible_at - c.made_at for c in changes if c.visible_at is not None]
    return {
        "interval_seconds": interval,
        "changes": len(changes),
        "kinds": kinds_summary(changes),
        "spread_seconds": args.freshness_spread,
        "timeout_seconds": args.freshness_timeout,
        "visible": len(latencies),
        "latencies": latencies,
        "not_visible": [asdict(c) | {"expect": {k: str(v) for k, v in c.expect.items()}}
                        for c in changes if c.visible_at is None],
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "max": max(latencies, default=math.nan),
        "ready_seconds": ready,
        "first_tick_seconds": first_tick,
        "wall_seconds": wall,
        "increments": runs,
        "requests": seen["requests"],
        "throttled_429": seen["throttled_429"],
    }


# --- the section in the benchmark's report ---------------------------------------------------------

@dataclass
class Targets:
    idle_requests: int = 3
    sync_requests: int = 10
    sync_seconds: float = 5.0
    freshness_seconds: float = 90.0
    rederive_seconds: float = 5.0
    drift_check_seconds: float = 10.0


TARGETS = Targets()


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_section(report: dict) -> None:
    cfg = report["config"]
    inc = report.get("incremental")
    if not inc:
        return
    idle, change_tick, sync = inc["idle_tick"], inc["change_tick"], inc["sync"]
    print(f"\nIncremental sync on the same account and database, after the full refresh (simulator "
          f"{cfg['rps']:g} requests/s, {cfg['latency_ms']:.0f} ms latency)")
    print(f"  idle tick requests       {idle['requests']:8d}   (target <= {TARGETS.idle_requests}: "
          f"{_met(idle['requests'] <= TARGETS.idle_requests)}; {_paths(idle['by_path'])}; "
          f"tick {idle['wall_seconds']:.2f} s, runs requested {idle['run_requests']})")
    print(f"  tick after the changes   {change_tick['requests']:8d}   (requests; {_paths(change_tick['by_path'])}; "
          f"tick {change_tick['wall_seconds']:.2f} s, runs requested {change_tick['run_requests']})")
    print(f"  sync of changed leads    {inc['changes']:8d}   ({inc['kinds']})")
    print(f"  sync requests            {sync['requests']:8d}   (target <= {TARGETS.sync_requests}: "
          f"{_met(sync['requests'] <= TARGETS.sync_requests)}; {_paths(sync['by_path'])}; "
          f"429s {sync['throttled_429']})")
    print(f"  sync run start -> commit {sync['commit_seconds']:8.2f} s (target <= {TARGETS.sync_seconds:g} s: "
          f"{_met(sync['commit_seconds'] <= TARGETS.sync_seconds)}; run set up {sync['start_seconds']:.2f} s, "
          f"Kommo + staging {sync['staging_seconds']:.2f} s, preview + apply + commit "
          f"{sync['apply_seconds']:.2f} s; job wall {sync['wall_seconds']:.2f} s)")
    counts = sync.get("counts") or {}
    applied = ", ".join(f"{k.replace('_', ' ')} {counts[k]}" for k in _APPLY_COUNTS if counts.get(k))
    print(f"  changes in production    {sync['visible']:8d}   of {inc['changes']} ({sync['leads']} leads, "
          f"{sync['contacts']} contacts staged; {applied})")
    rederive, check = inc.get("rederive"), inc.get("drift_check")
    if rederive:
        print(f"  mapping edit re-derived  {rederive['rederived_leads'] or 0:8d}   leads (every source option mapped: "
              f"{rederive['leads_reached']} leads reached; bookings showing it {rederive['bookings_shown']} of "
              f"{rederive['bookings']}, {rederive['bookings_updated']} updated)")
        print(f"  edit -> committed        {rederive['commit_seconds']:8.2f} s (target <= "
              f"{TARGETS.rederive_seconds:g} s: {_met(rederive['commit_seconds'] <= TARGETS.rederive_seconds)}; "
              f"swap {rederive['swap_seconds']:.2f} s; requests {rederive['requests']}: {_paths(rederive['by_path'])})")
    if check:
        print(f"  local drift check        {check['seconds']:8.2f} s (target <= {TARGETS.drift_check_seconds:g} s: "
              f"{_met(check['seconds'] <= TARGETS.drift_check_seconds)}; {check['leads']} leads in the mirror's "
              f"year, drift {check['drift']})")
    fresh = inc.get("freshness")
    if not fresh:
        return
    print(f"\nFreshness with the daemon (kommo-assets dev: dagster dev on the same database and simulator, "
          f"sync sensor every {fresh['interval_seconds']} s; {fresh['changes']} changes at random moments over "
          f"{fresh['spread_seconds']:g} s: {fresh['kinds']})")
    ok = fresh["visible"] == fresh["changes"] and fresh["p95"] <= TARGETS.freshness_seconds \
        and fresh["max"] <= TARGETS.freshness_seconds
    print(f"  change -> visible p50    {fresh['p50']:8.1f} s")
    print(f"  change -> visible p95    {fresh['p95']:8.1f} s   (target: every change within "
          f"{TARGETS.freshness_seconds:g} s: {_met(ok)})")
    print(f"  change -> visible max    {fresh['max']:8.1f} s")
    print(f"  changes visible          {fresh['visible']:8d}   of {fresh['changes']} (waited up to "
          f"{fresh['timeout_seconds']:g} s after the last)")
    runs = fresh["increments"]
    print(f"  increments the daemon ran {sum(runs.values()):7d}   ("
          f"{', '.join(f'{n} {s}' for s, n in sorted(runs.items())) or 'none'}; Kommo requests "
          f"{fresh['requests']} incl. the idle ticks, 429s {fresh['throttled_429']})")
    print(f"  wall time                {fresh['wall_seconds']:8.0f} s   (UI up after {fresh['ready_seconds']:.0f} s, "
          f"first sensor tick seen after {fresh['first_tick_seconds']:.0f} s)")


_APPLY_COUNTS = ("bookings_added", "bookings_updated", "bookings_deactivated", "sales_leads_added",
                 "sales_leads_updated", "sales_leads_archived", "clients_added", "clients_updated", "vehicles_created")


def _paths(by_path: dict) -> str:
    short = {"/api/v4/leads": "leads", "/api/v4/contacts": "contacts", "/api/v4/events": "events"}
    parts: dict[str, int] = {}
    for path, n in by_path.items():
        name = short.get(path) or ("fields" if "/custom_fields/" in path else path)
        parts[name] = parts.get(name, 0) + n
    return ", ".join(f"{name} {n}" for name, n in sorted(parts.items())) or "none"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("incremental sync")
    group.add_argument("--no-incremental", dest="incremental", action="store_false",
                       help="skip the incremental section")
    group.add_argument("--incremental-only", action="store_true",
                       help="one full refresh to load the account, then only the incremental section")
    group.add_argument("--sync-changes", type=int, default=100, help="changed leads the measured sync applies")
    group.add_argument("--no-daemon", dest="daemon", action="store_false",
                       help="skip the freshness measurement with the daemon")
    group.add_argument("--freshness-changes", type=int, default=20, help="changes timed with the daemon running")
    group.add_argument("--freshness-spread", type=float, default=300.0,
                       help="seconds over which those changes are made, at random moments")
    group.add_argument("--freshness-timeout", type=float, default=180.0,
                       help="seconds to wait after the last change before counting the rest as not visible")
    group.add_argument("--sync-interval", type=int, default=None,
                       help="the sensor's interval (KOMMO_SYNC_INTERVAL_SECONDS); default: the production default")
    group.add_argument("--seed", type=int, default=1, help="seed of the changes and their moments")


def measure(server, database_url: str, base_url: str, root: Path, args: argparse.Namespace, run_worker) -> dict:
    """The section, on the database the full refresh loaded; ``run_worker`` is the benchmark's."""
    out = run_worker("incremental", database_url, base_url, args.client_rps, args.max_in_flight,
                     ["--changes", str(args.sync_changes), "--seed", str(args.seed)])
    if args.daemon:
        out["freshness"] = measure_freshness(server, database_url, base_url, root, args)
    return out

