"""Support for the browser test: Chromium with the flags this machine needs, and a small client for the
Dagster webserver's GraphQL API (launching runs, reading their status)."""

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import requests

CHROMIUM = Path(os.environ.get("KOMMO_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
LOCATION = "kommo_assets"
REPOSITORY = "__repository__"  # the implicit repository of a dg.Definitions
TERMINAL = frozenset({"SUCCESS", "FAILURE", "CANCELED"})
IN_PROGRESS = frozenset({"STARTING", "STARTED", "CANCELING"})

# Variables that would point the dev server at something other than its own local Postgres and simulator.
FOREIGN_ENV = ("KOMMO_DATABASE_URL", "KOMMO_BASE_URL", "KOMMO_ACCESS_TOKEN", "KOMMO_ENABLE_LIVE",
               "KOMMO_ENABLE_SLACK_ALERTS", "SLACK_BOT_TOKEN", "KOMMO_SLACK_CHANNEL", "KOMMO_DEV_HOME")


def isolated_env() -> dict[str, str]:
    """This process's environment without any Kommo target or Dagster instance settings."""
    return {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV and not k.startswith("DAGSTER_")}


def chromium_path() -> Path:
    """The system Chromium; a clear failure (never a skip) when it is missing."""
    if CHROMIUM.exists():
        return CHROMIUM
    found = shutil.which("chromium")
    if found:
        return Path(found)
    raise RuntimeError(
        f"Chromium not found at {CHROMIUM} or on PATH: run `make system-deps`, which installs it "
        "(apt-get install chromium). Never `playwright install` here."
    )


@dataclass
class RunState:
    run_id: str
    status: str
    start_time: float | None
    end_time: float | None


class DagsterGraphQL:
    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()

    def query(self, query: str, variables: dict | None = None) -> dict:
        response = self.session.post(f"{self.base_url}/graphql", json={"query": query, "variables": variables or {}},
                                     timeout=30)
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def set_nux_seen(self) -> None:
        """Stops the "Join the Dagster community" modal from covering the page."""
        self.query("mutation { setNuxSeen }")

    def launch_run(self, job_name: str, run_config: dict | None = None,
                   asset_keys: list[str] | None = None, partition: str | None = None) -> str:
        """Launches ``job_name``; with ``asset_keys``, an ad-hoc run of those assets (and their checks), as
        the asset graph's Materialize launches it (``job_name`` then being the implicit ``__ASSET_JOB``);
        ``partition`` (a year) as the UI's partition dialog sets it."""
        selector = {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY, "jobName": job_name}
        if asset_keys is not None:
            selector["assetSelection"] = [{"path": key.split("/")} for key in asset_keys]
        data = self.query(
            """
            mutation Launch($params: ExecutionParams!) {
              launchRun(executionParams: $params) {
                __typename
                ... on LaunchRunSuccess { run { runId } }
                ... on PythonError { message }
                ... on RunConfigValidationInvalid { errors { message } }
                ... on Error { message }
              }
            }""",
            {"params": {"selector": selector, "runConfigData": run_config or {},
                        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]
                                              if partition else []}}},
        )
        result = data["launchRun"]
        if result["__typename"] != "LaunchRunSuccess":
            raise AssertionError(f"launchRun failed: {result}")
        return result["run"]["runId"]

    def launch_backfill(self, job_name: str, partitions: list[str]) -> str:
        """A backfill of ``job_name`` over ``partitions``, as the UI's partition dialog launches it."""
        data = self.query(
            """
            mutation Backfill($params: LaunchBackfillParams!) {
              launchPartitionBackfill(backfillParams: $params) {
                __typename
                ... on LaunchBackfillSuccess { backfillId }
                ... on PythonError { message }
                ... on Error { message }
              }
            }""",
            {"params": {"selector": {"partitionSetName": f"{job_name}_partition_set",
                                     "repositorySelector": {"repositoryLocationName": LOCATION,
                                                            "repositoryName": REPOSITORY}},
                        "partitionNames": partitions}},
        )
        result = data["launchPartitionBackfill"]
        if result["__typename"] != "LaunchBackfillSuccess":
            raise AssertionError(f"launchPartitionBackfill failed: {result}")
        return result["backfillId"]

    def backfill_runs(self, backfill_id: str) -> list[str]:
        """The ids of the runs a backfill has launched so far."""
        data = self.query(
            """query Runs($tag: String!) { runsOrError(filter: {tags: [{key: "dagster/backfill", value: $tag}]}) {
                 ... on Runs { results { runId } } } }""",
            {"tag": backfill_id},
        )
        return [r["runId"] for r in data["runsOrError"]["results"]]

    def run(self, run_id: str) -> RunState:
        data = self.query(
            """
            query Run($runId: ID!) {
              runOrError(runId: $runId) {
                __typename
                ... on Run { runId status startTime endTime }
              }
            }""",
            {"runId": run_id},
        )
        run = data["runOrError"]
        if run["__typename"] != "Run":
            raise AssertionError(f"run {run_id}: {run}")
        return RunState(run["runId"], run["status"], run["startTime"], run["endTime"])

    def run_tags(self, run_id: str) -> dict[str, str]:
        data = self.query(
            'query Tags($runId: ID!) { runOrError(runId: $runId) { ... on Run { tags { key value } } } }',
            {"runId": run_id},
        )
        return {tag["key"]: tag["value"] for tag in data["runOrError"]["tags"]}

    def run_errors(self, run_id: str) -> list[str]:
        """Messages of the run's failure events (a step failure's with its error), for an assertion message
        that says why and for the refusals a run states."""
        data = self.query(
            """
            query Logs($runId: ID!) {
              logsForRun(runId: $runId) {
                ... on EventConnection { events { __typename ... on MessageEvent { message level }
                                                 ... on ExecutionStepFailureEvent { error { message } } } }
              }
            }""",
            {"runId": run_id},
        )
        events = data["logsForRun"].get("events", [])
        return [f"{e['message']} {(e.get('error') or {}).get('message', '')}".strip()
                for e in events if e.get("level") in ("ERROR", "CRITICAL")][-10:]

    def wait_for_run(self, run_id: str, timeout: float = 150.0) -> RunState:
        deadline = time.monotonic() + timeout
        while True:
            state = self.run(run_id)
            if state.status in TERMINAL:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {state.status} after {timeout:.0f}s")
            time.sleep(1.0)
