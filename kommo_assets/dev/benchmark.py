"""The benchmark: the real full-refresh job against the simulator at Kommo's rate limit, beside a naive
baseline, and peak memory at growing sizes. ``kommo-assets benchmark --help``; not part of the tests.

Every figure comes from one invocation: a local PostgreSQL server and the simulator (in its own process,
so its CPU and memory are not the worker's) are started here; each measured run is a separate worker
process that reports its own wall time and peak RSS.
"""

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from kommo_assets.dev import benchmark_incremental as incremental
from kommo_assets.dev.simulator import SimulatorConfig
from kommo_assets.kommo import DEFAULT_MAX_RPS, MAX_PAGE_SIZE
from kommo_assets.scope import window_for

TOKEN = "benchmark-token"


def _year() -> int:
    """The window every measured run covers: the simulator's dataset year, which holds most of its leads. The
    benchmark's scope (KOMMO_REFRESH_YEARS) is that one year, set by the driver for every process it starts,
    so the sync covers the window the full refresh imported and nothing else."""
    return SimulatorConfig.year


def bench_definitions(args: argparse.Namespace):
    """The code location's Definitions with the measured Kommo resource: the simulator, paced as asked."""
    import dagster as dg

    from kommo_assets.definitions import defs
    from kommo_assets.resources.kommo import KommoResource

    kommo = KommoResource(base_url=args.base_url, access_token=TOKEN, max_rps=args.max_rps,
                          max_in_flight=args.max_in_flight)
    return dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, sensors=defs.sensors,
                          executor=defs.executor, resources={**defs.resources, "kommo": kommo})


# --- the worker: one measured run, in its own process ----------------------------------------------

def _worker_job(args: argparse.Namespace) -> dict:
    """The real ``kommo_full_refresh_job``, in process, with the Kommo resource paced as asked."""
    import dagster as dg

    from kommo_assets.db.runs import get_run
    from kommo_assets.jobs import FULL_REFRESH_JOB

    job = bench_definitions(args).resolve_job_def(FULL_REFRESH_JOB)
    with dg.DagsterInstance.ephemeral() as instance:
        started_at = time.time()
        started = time.perf_counter()
        result = job.execute_in_process(instance=instance, raise_on_error=False, partition_key=str(_year()),
                                        run_config={"ops": {"kommo_staging": {"config": {
                                            "max_drop_ratio": 1.0}}}})
        wall = time.perf_counter() - started
        steps = _step_timeline(instance, result.run_id, started_at)
    record = get_run(args.database_url, result.run_id) or {}
    stats = record.get("stats") or {}
    swap = record.get("swap_counts") or {}
    return {
        "success": result.success,
        "status": record.get("status"),
        "error": record.get("error"),
        "wall_seconds": wall,
        "staging_seconds": stats.get("seconds"),
        "swap_seconds": float(swap.get("swap_seconds", "nan")),
        "leads": record.get("leads_count"),
        "contacts": record.get("contacts_count"),
        "leads_received": stats.get("leads_received"),
        "contacts_requested": stats.get("contacts_requested"),
        "requests": (stats.get("client") or {}).get("requests"),
        "retries": (stats.get("client") or {}).get("retries"),
        "sending_seconds": (stats.get("client") or {}).get("sending_seconds"),
        "by_status": (stats.get("client") or {}).get("by_status"),
        "steps": steps,
        "marks": _run_marks(record, started_at),
    }


def _step_timeline(instance, run_id: str, started_at: float) -> dict[str, list[float]]:
    """Each step's [start, end] in seconds from the start of the job, from Dagster's own event log."""
    steps: dict[str, list[float]] = {}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None or not entry.step_key:
            continue
        if event.event_type_value == "STEP_START":
            steps.setdefault(entry.step_key, [entry.timestamp - started_at, math.nan])[0] = entry.timestamp - started_at
        elif event.event_type_value in ("STEP_SUCCESS", "STEP_FAILURE"):
            steps.setdefault(entry.step_key, [math.nan, math.nan])[1] = entry.timestamp - started_at
    return steps


def _run_marks(record: dict, started_at: float) -> dict[str, float]:
    """When the import record says each stage happened, in seconds from the start of the job."""
    marks = {}
    for key in ("started_at", "staged_at", "guard_passed_at", "swap_started_at", "finished_at"):
        value = record.get(key)
        if value is not None:
            marks[key] = value.timestamp() - started_at
    return marks


def _worker_naive(args: argparse.Namespace) -> dict:
    """The baseline: pages one after another, every row its own INSERT, then the same guard and swap."""
    import uuid

    from kommo_assets.db import connect, runs
    from kommo_assets.db.staging import CONTACT_COLUMNS, LEAD_COLUMNS, contact_row, lead_row
    from kommo_assets.kommo import SOURCE_FIELD_ID, VEHICLE_FIELD_ID, KommoClient
    from kommo_assets.kommo.errors import InvalidPayload
    from kommo_assets.kommo.fields import sanitize_payload, staged_contact, staged_lead

    def insert(table: str, columns: tuple[str, ...]) -> str:
        return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})"
                " ON CONFLICT DO NOTHING")

    insert_lead, insert_contact = insert("stg_kommo_leads", LEAD_COLUMNS), insert("stg_kommo_contacts", CONTACT_COLUMNS)
    run_id = str(uuid.uuid4())
    window = window_for(_year())
    started = time.perf_counter()
    runs.start_run(args.database_url, run_id=run_id, dagster_run_id=None, job_name="baseline", triggered_by=None,
                   dry_run=False, window=window, max_drop_ratio=1.0)
    client = KommoClient(args.base_url, TOKEN, max_rps=args.max_rps, max_in_flight=1)
    contact_ids: set[int] = set()
    leads_received = 0
    with connect(args.database_url, autocommit=True) as conn:
        for field_id in (VEHICLE_FIELD_ID, SOURCE_FIELD_ID):
            for enum_id, value in client.field_enums(field_id).items():
                conn.execute("INSERT INTO stg_kommo_field_options VALUES (%s, %s, %s, %s)",
                             (run_id, field_id, enum_id, value))
        for page in client.iter_lead_pages(window.created_from, window.created_to):
            leads_received += page.received
            for lead in page.leads:
                try:
                    s = staged_lead(lead)
                except InvalidPayload:
                    continue
                conn.execute(insert_lead, lead_row(run_id, json.dumps(sanitize_payload(lead)), s))
                if s.contact_id:
                    contact_ids.add(s.contact_id)
        for batch in client.iter_contact_batches(sorted(contact_ids)):
            for contact in batch:
                conn.execute(insert_contact,
                             contact_row(run_id, json.dumps(sanitize_payload(contact)), staged_contact(contact)))
        conn.execute("INSERT INTO stg_kommo_booking_vehicles SELECT run_id, lead_id, vehicle_enum_id"
                     " FROM stg_kommo_leads WHERE run_id = %s AND vehicle_enum_id IS NOT NULL", (run_id,))
    staging_seconds = time.perf_counter() - started
    runs.mark_staged(args.database_url, run_id, {})
    runs.drop_guard(args.database_url, run_id)
    swap = runs.swap(args.database_url, run_id)
    wall = time.perf_counter() - started
    record = runs.get_run(args.database_url, run_id)
    return {
        "success": record["status"] == "succeeded",
        "status": record["status"],
        "wall_seconds": wall,
        "staging_seconds": staging_seconds,
        "swap_seconds": float(swap["swap_seconds"]),
        "leads": record["leads_count"],
        "contacts": record["contacts_count"],
        "leads_received": leads_received,
        "contacts_requested": len(contact_ids),
        "requests": client.stats.requests,
        "retries": client.stats.retries,
    }


def _worker(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kommo-assets benchmark worker")
    parser.add_argument("--mode", choices=("job", "naive", "incremental"), required=True)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--max-rps", type=float, required=True)
    parser.add_argument("--max-in-flight", type=int, default=6)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ.update({"KOMMO_DATABASE_URL": args.database_url, "KOMMO_BASE_URL": args.base_url,
                       "KOMMO_ACCESS_TOKEN": TOKEN, "KOMMO_ENABLE_LIVE": "1",
                       "KOMMO_REFRESH_YEARS": str(_year())})
    os.environ.pop("KOMMO_SNAPSHOT_DIR", None)
    workers = {"job": _worker_job, "naive": _worker_naive, "incremental": incremental.worker_incremental}
    out = workers[args.mode](args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCHMARK_RESULT " + json.dumps(out, default=str), flush=True)
    return 0


# --- the driver --------------------------------------------------------------------------------------

# The simulator stands in for Kommo, whose rate limiter does not share this machine's two cores. It stamps
# each request when its Python thread gets to run: measured on this machine under load, up to 81 ms
# after the request had been written (its own page rendering holding the GIL, other processes taking the
# CPU), enough to turn a correctly paced request into a 429 at any pace near 7/s. So the benchmark runs it
# with real-time round-robin scheduling (when allowed: root; else a higher nice priority, else as is) and a
# 0.5 ms GIL switch interval: its stamps then lag the write by about 1 ms at most, as a front proxy's would.
# It uses a quarter of one core, so it takes nothing the worker or PostgreSQL need.
SIMULATOR_BOOT = """
import os, sys
sys.setswitchinterval(0.0005)
mode = "normal priority"
if os.environ.get("KOMMO_BENCHMARK_SIMULATOR_PRIORITY") == "1":
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(10))
        mode = "real-time scheduling"
    except (OSError, AttributeError):
        try:
            os.nice(-10)
            mode = "nice -10"
        except OSError:
            pass
print("KOMMO_BENCHMARK_SIMULATOR " + mode, flush=True)
from kommo_assets.dev.simulator.cli import main
sys.exit(main())
"""


@contextmanager
def _simulator(leads: int, rps: float, latency_ms: float, *, priority: bool = True):
    """The simulator in its own process (with priority: see SIMULATOR_BOOT; the memory sweep, which pushes
    it as fast as it goes, runs it without); yields (base_url, control function, how it was scheduled)."""
    env = dict(os.environ, KOMMO_BENCHMARK_SIMULATOR_PRIORITY="1" if priority else "0")
    proc = subprocess.Popen(
        [sys.executable, "-c", SIMULATOR_BOOT, "--leads", str(leads), "--port", "0", "--token", TOKEN,
         "--rps", str(rps), "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()
        mode = line.split(" ", 1)[1].strip() if line.startswith("KOMMO_BENCHMARK_SIMULATOR ") else "?"
        if line.startswith("KOMMO_BENCHMARK_SIMULATOR "):
            line = proc.stdout.readline()
        if "KOMMO_SIMULATOR_READY" not in line:
            raise RuntimeError(f"the simulator did not start: {line!r}")
        base_url = line.strip().split("base_url=", 1)[1]

        def control(path: str, method: str = "GET", body: object | None = None) -> dict:
            return incremental.simulator_call(base_url, path, method, body)

        yield base_url, control, mode
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run_worker(mode: str, database_url: str, base_url: str, max_rps: float, max_in_flight: int,
                extra: list[str] = ()) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "kommo_assets.dev.benchmark", "worker", "--mode", mode, "--database-url", database_url,
         "--base-url", base_url, "--max-rps", str(max_rps), "--max-in-flight", str(max_in_flight), *extra],
        capture_output=True, text=True,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHMARK_RESULT "):
            result = json.loads(line.split(" ", 1)[1])
            if not result.get("success"):
                raise RuntimeError(f"{mode} run did not succeed: {result}")
            return result
    raise RuntimeError(f"{mode} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


# The simulator's data: 80% of the generated leads are created in the window, and about 15.6% of those
# are "Closed - lost" (status 143), which the import leaves out: 148,149 generated give ~100,000 staged.
STAGED_SHARE = 0.675


def generated_for(staged: int) -> int:
    """How many leads to generate for about ``staged`` leads in the snapshot."""
    return math.ceil(staged / STAGED_SHARE)


def _machine() -> str:
    """E.g. ``2 cores, 24 GB, PostgreSQL 15.8, Python 3.11.7``."""
    import platform

    memory = ""
    try:
        with open("/proc/meminfo") as meminfo:
            kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        memory = f", {round(kb / 1024 / 1024)} GB"
    except (OSError, StopIteration, ValueError):
        pass
    try:
        from kommo_assets.dev.local_postgres import find_bindir

        out = subprocess.run([str(find_bindir() / "postgres"), "--version"], capture_output=True, text=True).stdout
        version = out.split("(PostgreSQL)", 1)[-1].split()[0]
    except Exception:  # noqa: BLE001 - the figure is informative only
        version = "?"
    return f"{os.cpu_count()} cores{memory}, PostgreSQL {version}, Python {platform.python_version()}"


def requests_needed(leads_received: int, contacts_requested: int) -> int:
    """The fewest requests that can export this data: lead pages (plus the 204 that proves the end when
    the last page is full), contact batches of 250, and the two select-field definitions."""
    lead_pages = math.ceil(leads_received / MAX_PAGE_SIZE) + (1 if leads_received % MAX_PAGE_SIZE == 0 else 0)
    return lead_pages + math.ceil(contacts_requested / MAX_PAGE_SIZE) + 2


def _fresh_database(server, name: str) -> str:
    from kommo_assets.db.migrate import migrate

    url = server.ensure_database(name)
    migrate(url)
    return url


def _measure(args: argparse.Namespace) -> dict:
    from kommo_assets.dev.local_postgres import LocalPostgres

    root = Path(tempfile.mkdtemp(prefix="kommo-benchmark-"))
    server = LocalPostgres(root / "pg")
    server.start()
    report: dict = {"config": {**vars(args), "year": _year()}, "machine": _machine()}
    try:
        with _simulator(args.generated, args.rps, args.latency_ms) as (base_url, control, scheduling):
            url = _fresh_database(server, "bench_job")
            report["simulator"] = scheduling
            control("/_simulator/reset_stats", "POST")
            first = _run_worker("job", url, base_url, args.client_rps, args.max_in_flight)
            first["throttled_429"] = control("/_simulator/stats")["throttled_429"]
            report["job"] = first
            if not args.incremental_only:
                control("/_simulator/reset_stats", "POST")
                rerun = _run_worker("job", url, base_url, args.client_rps, args.max_in_flight)
                rerun["throttled_429"] = control("/_simulator/stats")["throttled_429"]
                report["job_rerun"] = rerun
            if args.incremental:
                # After the full refresh (and its re-run), on the account it loaded: nothing changed since.
                report["incremental"] = incremental.measure(server, url, base_url, root, args, _run_worker)
            if args.baseline and not args.incremental_only:
                control("/_simulator/reset_stats", "POST")
                naive = _run_worker("naive", _fresh_database(server, "bench_naive"), base_url, args.client_rps, 1)
                naive["throttled_429"] = control("/_simulator/stats")["throttled_429"]
                report["baseline"] = naive
        if args.memory_sweep and not args.incremental_only:
            report["memory"] = {}
            for size in args.memory_sizes:
                with _simulator(generated_for(size), args.sweep_rps, 0, priority=False) as (base_url, _, _):
                    url = _fresh_database(server, f"bench_mem_{size}")
                    result = _run_worker("job", url, base_url, args.sweep_rps * 0.97, args.max_in_flight)
                    report["memory"][size] = result
    finally:
        server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
    return report


def _print(report: dict) -> None:
    if report["config"].get("incremental_only"):
        job = report["job"]
        print(f"\nAccount loaded by one full refresh: {job['leads']:,} leads in the snapshot "
              f"({report['config']['generated']:,} generated), {job['contacts']:,} contacts, in "
              f"{job['wall_seconds']:.1f} s ({job['requests']} requests, 429s {job['throttled_429']}); "
              f"{report.get('machine', '')}")
    else:
        _print_full_refresh(report)
    incremental.print_section(report)


def _print_full_refresh(report: dict) -> None:
    cfg = report["config"]
    job = report["job"]
    needed = requests_needed(job["leads_received"], job["contacts_requested"])
    floor = needed / cfg["rps"]
    rows = job["leads"] + job["contacts"]
    print(f"\nFull refresh of {job['leads']:,} leads in the snapshot ({cfg['generated']:,} generated, "
          f"{job['leads_received']:,} in the {cfg['year']} window, status 143 left out), {job['contacts']:,} contacts; "
          f"simulator: {cfg['rps']:g} requests/s, {cfg['latency_ms']:.0f} ms latency "
          f"({report.get('simulator', '?')}); client pace {cfg['client_rps']:g} requests/s, up to "
          f"{cfg['max_in_flight']} in flight; {report.get('machine', '')}")
    print(f"  total wall time          {job['wall_seconds']:8.1f} s")
    print(f"  floor (requests/limit)   {floor:8.1f} s   ({needed} requests needed / {cfg['rps']:g} per s)")
    print(f"  wall / floor             {job['wall_seconds'] / floor:8.3f}")
    sending = job.get("sending_seconds") or 0
    pace = f", sent over {sending:.1f} s: {(job['requests'] - 1) / sending:.2f} per s" if sending else ""
    empty = (job.get("by_status") or {}).get("204", 0)
    print(f"  requests made            {job['requests']:8d}   (retries {job['retries']}, 204s {empty}{pace})")
    print(f"  429s received            {job['throttled_429']:8d}")
    print(f"  staging rows/s           {rows / job['staging_seconds']:8.0f}   ({rows:,} rows in {job['staging_seconds']:.1f} s)")
    print(f"  swap seconds             {job['swap_seconds']:8.2f}   ({job['leads']:,} leads, first run into empty tables)")
    rerun = report["job_rerun"]
    print(f"  re-run swap (unchanged)  {rerun['swap_seconds']:8.2f}   (re-run wall {rerun['wall_seconds']:.1f} s = "
          f"{rerun['wall_seconds'] / floor:.3f} x floor, 429s {rerun['throttled_429']})")
    print(f"  peak RSS of the worker   {job['peak_rss_mb']:8.0f} MB")
    timeline = _timeline(job)
    if timeline:
        print(f"  where the time goes      {timeline}")
    if "baseline" in report:
        base = report["baseline"]
        print("\nBaseline (same data, pages one after another, one INSERT per row, same swap)")
        print(f"  total wall time          {base['wall_seconds']:8.1f} s   (staging {base['staging_seconds']:.1f} s, "
              f"swap {base['swap_seconds']:.2f} s, {base['requests']} requests, 429s {base['throttled_429']})")
        print(f"  peak RSS                 {base['peak_rss_mb']:8.0f} MB")
        print(f"  baseline / job           {base['wall_seconds'] / job['wall_seconds']:8.2f}x")
    if "memory" in report:
        print(f"\nPeak RSS by size (simulator at {cfg['sweep_rps']:g} requests/s, no latency)")
        sizes = sorted(report["memory"], key=int)
        for size in sizes:
            m = report["memory"][size]
            print(f"  {int(size):>9,} leads  {m['peak_rss_mb']:6.0f} MB   ({m['leads']:,} staged, "
                  f"{generated_for(int(size)):,} generated; wall {m['wall_seconds']:.0f} s, swap {m['swap_seconds']:.1f} s)")
        if len(sizes) >= 2:
            a, b = report["memory"][sizes[-2]]["peak_rss_mb"], report["memory"][sizes[-1]]["peak_rss_mb"]
            print(f"  {int(sizes[-1]):,} vs {int(sizes[-2]):,}: {100 * (b - a) / a:+.1f}%"
                  f" (max {max(report['memory'][k]['peak_rss_mb'] for k in sizes):.0f} MB)")


def _timeline(job: dict) -> str:
    """E.g. ``staging 0.2-110.3 s (preview 1.1 s) | checks 0.4 s | swap 3.1 s | calendar 0.1 s``."""
    steps, marks = job.get("steps") or {}, job.get("marks") or {}
    if not steps:
        return ""
    parts = []
    staging = steps.get("kommo_staging")
    if staging:
        extra = ""
        if "staged_at" in marks:
            extra = f" (Kommo + staging until {marks['staged_at']:.1f}, then preview {staging[1] - marks['staged_at']:.1f} s)"
        parts.append(f"staging step {staging[0]:.1f}-{staging[1]:.1f} s{extra}")
    from kommo_assets.assets.catalog import CALENDAR_VIEW

    calendar = CALENDAR_VIEW.to_python_identifier()  # a single asset's step is named after its key
    checks = [v for k, v in steps.items() if k not in ("kommo_staging", "kommo_swap", calendar)]
    if checks:
        parts.append(f"checks {sum(end - start for start, end in checks):.1f} s")
    for key, label in (("kommo_swap", "swap step"), (calendar, "calendar")):
        if key in steps:
            parts.append(f"{label} {steps[key][1] - steps[key][0]:.1f} s")
    ends = [end for _, end in steps.values()]
    parts.append(f"after the last step {job['wall_seconds'] - max(ends):.1f} s")
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return _worker(argv[1:])
    parser = argparse.ArgumentParser(prog="kommo-assets benchmark", description=__doc__)
    parser.add_argument("--leads", type=int, default=100_000,
                        help=f"leads in the snapshot (staged): about {100 * STAGED_SHARE:.1f}%% of the generated ones")
    parser.add_argument("--generated", type=int, default=None,
                        help=f"generated leads instead (default: --leads / {STAGED_SHARE})")
    parser.add_argument("--rps", type=float, default=7.0, help="the simulator's rate limit")
    parser.add_argument("--latency-ms", type=float, default=400.0, help="the simulator's latency per request")
    parser.add_argument("--client-rps", type=float, default=DEFAULT_MAX_RPS,
                        help="the client's pace (default: the production default, KOMMO_MAX_RPS unset)")
    parser.add_argument("--max-in-flight", type=int, default=6)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--memory-sweep", action="store_true", help="also measure peak RSS at --memory-sizes")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="snapshot sizes (staged leads) of the memory sweep")
    parser.add_argument("--sweep-rps", type=float, default=400.0, help="simulator rate limit for the memory sweep")
    parser.add_argument("--json", help="also write the raw figures to this file")
    incremental.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.incremental_only and not args.incremental:
        parser.error("--incremental-only and --no-incremental exclude each other")
    if args.generated is None:
        args.generated = generated_for(args.leads)
    report = _measure(args)
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
