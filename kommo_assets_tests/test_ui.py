"""End to end through the Dagster UI: `kommo-assets dev` on its own local Postgres and simulator, a real
Chromium clicking Materialize, the run queue holding a second refresh, and a clean shutdown.

One dev server serves the whole module (it takes ~15 s to start). Deselect with ``-m "not ui"``.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests

from kommo_assets.assets.catalog import (
    BOOKINGS,
    CALENDAR_VIEW,
    KOMMO_API,
    PRODUCTION_KEYS,
    STAGING_KEYS,
    STG_LEADS,
)
from kommo_assets.assets.production import SWAP_ALONE
from kommo_assets.dev.dagster_dev import REPO_ROOT, DevServer, launch
from kommo_assets.dev.local_postgres import LocalPostgres
from kommo_assets.jobs import DRY_RUN_JOB, FULL_REFRESH_JOB, REFRESH_TAG
from kommo_assets.scope import current_year
from kommo_assets_tests.ui_support import (
    CHROMIUM_ARGS,
    IN_PROGRESS,
    DagsterGraphQL,
    chromium_path,
    isolated_env,
)

pytestmark = [pytest.mark.ui, pytest.mark.timeout(360)]

# The README's screenshots are refreshed with KOMMO_UPDATE_SCREENSHOTS=1; otherwise they go to a temp dir,
# so a test run leaves the work tree clean.
SCREENSHOTS = (REPO_ROOT / "docs" / "screenshots" if os.environ.get("KOMMO_UPDATE_SCREENSHOTS") == "1"
               else Path(tempfile.gettempdir()) / "kommo-ui-screenshots")
LEADS = 800
THIS_YEAR = str(current_year())  # the real date: `make run` and the UI's "Latest" partition
# Asset keys as the UI writes them (app_db/public/bookings); the staging assets first.
ALL_KOMMO_ASSETS = [key.to_user_string() for key in (*STAGING_KEYS, *PRODUCTION_KEYS, CALENDAR_VIEW)]


def _asset_page(dev_server, key, view: str = "") -> str:
    """The asset's page in the UI: its key's parts are the URL's path."""
    return f"{dev_server.url}/assets/{key.to_user_string()}" + (f"?view={view}" if view else "")


@dataclass
class CliRun:
    run_id: str
    output: str


@pytest.fixture(scope="module")
def dev_home():
    home = Path(tempfile.mkdtemp(prefix="kommo-ui-"))
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def cli_run(dev_home) -> CliRun:
    """`make run`'s command on the dev server's home, before the dev server starts."""
    done = subprocess.run([sys.executable, "-m", "kommo_assets.cli", "run", "--home", str(dev_home),
                           "--leads", str(LEADS)], env=isolated_env(), capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"\* Dagster run ([0-9a-f-]{36}): success", done.stdout)
    assert match, done.stdout
    return CliRun(match.group(1), done.stdout + done.stderr)


@pytest.fixture(scope="module")
def dev_server(dev_home, cli_run):
    home = dev_home
    server: DevServer | None = None
    try:
        server = launch(home, leads=LEADS, env=isolated_env())
        yield server
    finally:
        if server is not None:
            server.stop()
        # The dev server stops the Postgres it started; this covers a dev server that died first.
        LocalPostgres(home / "pg").stop("immediate")


@pytest.fixture(scope="module")
def graphql(dev_server) -> DagsterGraphQL:
    client = DagsterGraphQL(dev_server.url)
    client.set_nux_seen()
    return client


@pytest.fixture(scope="module")
def kommo_db(dev_server) -> str:
    port = int((dev_server.home / "pg.port").read_text().strip())
    return f"postgresql://postgres@127.0.0.1:{port}/kommo"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: `make install` (pip install -e '.[test]') installs it")
    try:
        executable = chromium_path()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


def _dismiss_community_modal(page) -> None:
    """setNuxSeen normally prevents it; the Skip button is the fallback if it still shows up."""
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.wait_for(state="visible", timeout=2_000)
    except Exception:  # playwright's TimeoutError: no modal, nothing to do
        return
    skip.click()


def _launch_latest_partition(page) -> str:
    """After a Materialize click: confirms what the UI asks first (a multi-asset materialized whole, upstream
    assets never materialized), picks the latest partition (the current year) in the partition dialog and
    launches; returns the launched run's id from the toast."""
    dialog = page.get_by_role("dialog")
    while True:
        dialog.first.wait_for()
        if dialog.get_by_text("Partition selection").count():
            break
        dialog.get_by_role("button", name="Confirm").click()
        page.wait_for_timeout(500)
    dialog.get_by_role("button", name="Latest", exact=True).click()
    launch = dialog.get_by_role("button", name=re.compile(r"^Launch"))
    launch.wait_for()
    launch.click()
    page.get_by_text("Launched run").wait_for()
    view = page.get_by_role("link", name="View", exact=True)  # the toast's link to the new run
    return view.get_attribute("href").rstrip("/").split("/runs/")[1]


def _fetch_all(url: str, query: str, params=None):
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchall()


def _fetch_one(url: str, query: str, params=None):
    with psycopg.connect(url) as conn:
        return conn.execute(query, params).fetchone()


def test_the_run_of_make_run_is_in_the_ui_afterwards(cli_run, graphql, kommo_db):
    """`make run` then `make dev`: the run, its materializations and checks are in the UI's instance."""
    assert graphql.run(cli_run.run_id).status == "SUCCESS"
    data = graphql.query(
        """query ($runId: ID!) { runOrError(runId: $runId) { ... on Run {
               jobName
               assetMaterializations { assetKey { path } }
               assetCheckEvaluations: eventConnection(afterCursor: null) { events { __typename } } } } }""",
        {"runId": cli_run.run_id},
    )["runOrError"]
    assert data["jobName"] == FULL_REFRESH_JOB
    assert graphql.run_tags(cli_run.run_id).get("dagster/partition") == THIS_YEAR  # the current year by default
    assert "years in scope" in cli_run.output and f"{THIS_YEAR}: read up to" in cli_run.output
    materialized = {"/".join(m["assetKey"]["path"]) for m in data["assetMaterializations"]}
    assert {key.to_user_string() for key in (STG_LEADS, BOOKINGS, CALENDAR_VIEW)} <= materialized, materialized
    kinds = {e["__typename"] for e in data["assetCheckEvaluations"]["events"]}
    assert "AssetCheckEvaluationEvent" in kinds, kinds
    row = _fetch_one(kommo_db, "SELECT status FROM kommo_import_runs WHERE dagster_run_id = %s",
                     (cli_run.run_id,))
    assert row == ("succeeded",)
    # Progress at INFO, not Dagster's DEBUG step events.
    assert "Swap of run" in cli_run.output and " - DEBUG - " not in cli_run.output


def test_materialize_full_refresh_from_the_ui(dev_server, graphql, kommo_db, page):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.goto(f"{dev_server.url}/locations/kommo_assets/jobs/{FULL_REFRESH_JOB}")
    materialize = page.get_by_role("button", name="Materialize all")
    materialize.wait_for()
    _dismiss_community_modal(page)

    clicked_at = time.monotonic()
    materialize.click()
    run_id = _launch_latest_partition(page)
    page.get_by_role("link", name="View", exact=True).click()
    page.wait_for_url(f"**/runs/{run_id}")

    # Queued first (QueuedRunCoordinator): only the daemon of `dagster dev` can move it on.
    state = graphql.wait_for_run(run_id)
    assert state.status == "SUCCESS", (
        f"run {run_id} ended {state.status}: {graphql.run_errors(run_id)}\n{dev_server.log_tail()}"
    )
    assert graphql.run_tags(run_id).get(REFRESH_TAG) == "kommo"
    assert graphql.run_tags(run_id).get("dagster/partition") == THIS_YEAR
    print(f"click -> success in {time.monotonic() - clicked_at:.1f}s")

    page.goto(f"{dev_server.url}/runs/{run_id}")  # a fresh load: no launch toast over the screenshot
    page.get_by_text("Success", exact=True).first.wait_for()
    page.get_by_text("RUN_SUCCESS").first.wait_for()
    page.wait_for_timeout(1_500)  # the step timeline lays itself out after the events load
    page.screenshot(path=str(SCREENSHOTS / "ui-run-succeeded.png"))

    bookings = _fetch_one(kommo_db, "SELECT count(*) FROM bookings WHERE channel = 'Kommo' AND is_active")[0]
    assert bookings > 0
    run_row = _fetch_one(
        kommo_db, "SELECT status, leads_count FROM kommo_import_runs WHERE dagster_run_id = %s", (run_id,)
    )
    assert run_row is not None and run_row[0] == "succeeded", run_row
    assert run_row[1] > 0

    page.goto(f"{dev_server.url}/locations/kommo_assets/asset-groups/kommo")
    for key in (KOMMO_API, STG_LEADS, BOOKINGS, CALENDAR_VIEW):  # the graph labels a node with its key's last part
        page.get_by_text(key.path[-1], exact=True).first.wait_for()
    page.wait_for_timeout(1_000)  # the graph animates into place
    page.screenshot(path=str(SCREENSHOTS / "asset-graph.png"))
    # the bookings page: its partitions (years), the row count of the current year's latest materialization
    page.goto(_asset_page(dev_server, BOOKINGS, "partitions"))
    page.get_by_text(THIS_YEAR).first.wait_for()
    page.wait_for_timeout(1_500)
    page.screenshot(path=str(SCREENSHOTS / "bookings-partitions.png"))


def _simulator_url(dev_server) -> str:
    match = re.search(r"Kommo simulator at (http://\S+)", dev_server.log_path.read_text(errors="replace"))
    assert match, "the dev server did not report its simulator"
    return match.group(1)


def test_change_preview_is_shown_on_the_staging_asset(dev_server, graphql, kommo_db, page):
    """An operator reads what a refresh is about to change on stg_kommo_leads, without SQL: here a dry
    run of the current year after five of its bookings were deleted in Kommo and one moved to another stage."""
    codes = [r[0] for r in _fetch_all(
        kommo_db, "SELECT source_payload_id FROM bookings WHERE is_active AND kommo_status_id = 79790637"
                  " AND kommo_created_at >= make_date(%s, 1, 1) ORDER BY 1 LIMIT 6", (int(THIS_YEAR),))]
    assert len(codes) == 6, "the first refresh did not leave enough bookings to change"
    lead_ids = [int(code.split(":")[1]) for code in codes]
    sim = _simulator_url(dev_server)
    requests.post(f"{sim}/_simulator/mutations", json={"op": "delete_leads", "ids": lead_ids[:5]},
                  timeout=10).raise_for_status()
    requests.post(f"{sim}/_simulator/mutations", json={"op": "update_lead", "lead_id": lead_ids[5],
                  "status_id": 79790640}, timeout=10).raise_for_status()

    run_id = graphql.launch_run(DRY_RUN_JOB, {}, partition=THIS_YEAR)
    state = graphql.wait_for_run(run_id)
    assert state.status == "SUCCESS", graphql.run_errors(run_id)
    page.goto(_asset_page(dev_server, STG_LEADS, "events"))
    preview = page.get_by_text("change_preview").first
    preview.wait_for()
    page.get_by_text("change_counts").first.wait_for()
    preview.scroll_into_view_if_needed()
    show = page.get_by_text("[Show Markdown]")
    if show.count():  # the UI folds long Markdown metadata behind a link that opens a dialog
        show.first.click()
    page.get_by_text("Bookings to deactivate").first.wait_for()
    page.get_by_text(codes[0]).first.wait_for()  # a sample row names the booking
    if not show.count():
        page.set_viewport_size({"width": 1280, "height": 1000})
        preview.evaluate("element => element.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(1_000)
    page.screenshot(path=str(SCREENSHOTS / "change-preview.png"))


def _assert_one_at_a_time(graphql: DagsterGraphQL, run_ids: list[str]) -> None:
    """Of runs submitted together, at most one is in progress at any moment; the second stays QUEUED until
    the first has finished, then runs; all succeed."""
    history: list[dict[str, str]] = []
    deadline = time.monotonic() + 240
    while True:
        states = {run_id: graphql.run(run_id).status for run_id in run_ids}
        history.append(states)
        in_progress = [run_id for run_id, status in states.items() if status in IN_PROGRESS]
        assert len(in_progress) <= 1, f"two refreshes in progress at once: {history}"
        if all(status in ("SUCCESS", "FAILURE", "CANCELED") for status in states.values()):
            break
        assert time.monotonic() < deadline, f"refreshes did not finish: {history[-5:]}"
        time.sleep(0.5)

    final = {run_id: graphql.run(run_id) for run_id in run_ids}
    assert all(s.status == "SUCCESS" for s in final.values()), (
        {r: (s.status, graphql.run_errors(r)) for r, s in final.items()}
    )
    first, second = sorted(final.values(), key=lambda s: s.start_time)
    assert second.start_time >= first.end_time, (first, second)
    # The second was seen waiting while the first ran.
    assert any(h[first.run_id] in IN_PROGRESS and h[second.run_id] == "QUEUED" for h in history), history


def test_second_refresh_waits_in_the_queue(dev_server, graphql, kommo_db):
    """dagster.yaml limits the kommo pool (and the kommo/refresh tag) to one run: of two refreshes
    submitted together, the second waits in the queue."""
    run_ids = [graphql.launch_run(FULL_REFRESH_JOB, {}, partition=THIS_YEAR) for _ in range(2)]
    _assert_one_at_a_time(graphql, run_ids)
    succeeded = _fetch_one(
        kommo_db, "SELECT count(*) FROM kommo_import_runs WHERE status = 'succeeded' AND dagster_run_id = ANY(%s)",
        (run_ids,),
    )[0]
    assert succeeded == 2


def test_an_ad_hoc_materialization_waits_behind_a_refresh(dev_server, graphql, kommo_db):
    """Materialize from the asset graph launches a run of the implicit asset job, which carries no job tag:
    the staging asset's pool is what queues it behind a running refresh (else the database would refuse
    it at once with "another Kommo import is running")."""
    refresh = graphql.launch_run(FULL_REFRESH_JOB, {}, partition=THIS_YEAR)
    ad_hoc = graphql.launch_run("__ASSET_JOB", {}, asset_keys=ALL_KOMMO_ASSETS, partition=THIS_YEAR)
    assert REFRESH_TAG not in graphql.run_tags(ad_hoc)
    _assert_one_at_a_time(graphql, [refresh, ad_hoc])
    rows = _fetch_all(kommo_db, "SELECT status FROM kommo_import_runs WHERE dagster_run_id = ANY(%s)",
                      ([refresh, ad_hoc],))
    assert rows == [("succeeded",), ("succeeded",)]


def test_bookings_alone_is_refused_before_any_work_naming_what_to_run(dev_server, graphql, kommo_db, page):
    """Materialize on bookings alone, clicked as an operator clicks it: the UI materializes the swap's five
    tables together (a multi-asset it cannot split), the run has no staging of its own, and it is refused
    before any work, with a message naming what to run instead; no import record is opened."""
    # The records of refreshes and dry runs: the sync sensor of the dev server may start an increment meanwhile.
    records = "SELECT count(*), max(finished_at) FROM kommo_import_runs WHERE kind <> 'increment'"
    before = _fetch_one(kommo_db, records)
    page.goto(_asset_page(dev_server, BOOKINGS))
    _dismiss_community_modal(page)
    page.locator("button", has_text="Materialize").first.click()
    run_id = _launch_latest_partition(page)
    state = graphql.wait_for_run(run_id)
    assert state.status == "FAILURE"
    errors = " ".join(graphql.run_errors(run_id))
    assert SWAP_ALONE.format(run_id=run_id).split(",")[0] in errors, errors
    assert "Materialize the whole kommo group" in errors and "kommo_full_refresh_job" in errors
    assert _fetch_one(kommo_db, records) == before
    assert _fetch_one(kommo_db, "SELECT count(*) FROM kommo_import_runs WHERE dagster_run_id = %s",
                      (run_id,)) == (0,)


def test_the_staging_assets_alone_are_a_dry_run(dev_server, graphql, kommo_db):
    """The staging assets selected alone (the UI's Materialize on them): a dry run by what it materializes,
    recorded as such and succeeded; production untouched."""
    production = _fetch_one(kommo_db, "SELECT count(*), max(updated_at) FROM bookings")
    run_id = graphql.launch_run("__ASSET_JOB", {}, asset_keys=ALL_KOMMO_ASSETS[:3], partition=THIS_YEAR)
    state = graphql.wait_for_run(run_id)
    assert state.status == "SUCCESS", graphql.run_errors(run_id)
    assert _fetch_one(kommo_db, "SELECT kind, dry_run, status FROM kommo_import_runs WHERE dagster_run_id = %s",
                      (run_id,)) == ("dry_run", True, "succeeded")
    assert _fetch_one(kommo_db, "SELECT count(*), max(updated_at) FROM bookings") == production


def test_a_backfill_of_two_years_runs_one_year_per_run_one_at_a_time(dev_server, graphql, kommo_db, page):
    """A backfill of the year before and the current one (the partition dialog's range): two runs, one
    partition each, the second waiting in the kommo pool until the first has finished; both succeed."""
    years = [str(int(THIS_YEAR) - 1), THIS_YEAR]
    backfill = graphql.launch_backfill(FULL_REFRESH_JOB, years)
    deadline = time.monotonic() + 120
    while len(run_ids := graphql.backfill_runs(backfill)) < 2:
        assert time.monotonic() < deadline, f"backfill {backfill} launched {run_ids}"
        time.sleep(1.0)
    assert sorted(graphql.run_tags(r)["dagster/partition"] for r in run_ids) == years
    _assert_one_at_a_time(graphql, run_ids)
    windows = _fetch_all(kommo_db, "SELECT extract(year FROM created_from)::int::text FROM kommo_import_runs "
                                   "WHERE dagster_run_id = ANY(%s) AND status = 'succeeded' ORDER BY 1", (run_ids,))
    assert [w[0] for w in windows] == years
    page.goto(f"{dev_server.url}/runs/b/{backfill}")
    page.get_by_text(backfill).first.wait_for()
    page.get_by_text("Partitions targeted").first.wait_for()  # the title shows before the table has loaded
    page.wait_for_timeout(1_500)
    page.screenshot(path=str(SCREENSHOTS / "backfill.png"))


def test_dev_server_stops_cleanly(dev_server: DevServer):
    """SIGTERM stops `dagster dev` (webserver, daemon, code server), leaving no process behind; the
    Postgres that `make run` started before it keeps running, as `make run` promises (`make stop` stops
    it)."""
    dagster_pgid = dev_server.dagster_pgid()
    assert dagster_pgid is not None
    started = time.monotonic()
    returncode = dev_server.stop()
    elapsed = time.monotonic() - started
    log = dev_server.log_tail(20_000)
    assert returncode == 0, log
    assert "Dagster stopped" in log, log
    assert "killing" not in log, log  # neither `dagster dev` nor a straggler needed SIGKILL
    assert not dev_server.forced, "processes of `dagster dev` outlived kommo-assets dev"
    print(f"stopped in {elapsed:.1f}s")

    with pytest.raises(ProcessLookupError):
        os.killpg(dagster_pgid, 0)
    assert LocalPostgres(dev_server.home / "pg").is_running(), "the dev server stopped a Postgres it did not start"
