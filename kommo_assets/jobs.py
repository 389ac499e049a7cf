"""The jobs: the full refresh and the dry run that operators run, and the incremental sync its sensor starts;
with them the names, tags and pool their runs carry."""

import dagster as dg

from kommo_assets.assets.catalog import INCREMENT, KOMMO_GROUP, MIRROR_CHECK_KEY, STAGING_KEYS

FULL_REFRESH_JOB = "kommo_full_refresh_job"
DRY_RUN_JOB = "kommo_dry_run_job"
INCREMENTAL_SYNC_JOB = "kommo_incremental_sync_job"

# Every run that reads Kommo carries this tag: dagster.yaml's run queue lets one run with it run at a time.
REFRESH_TAG = "kommo/refresh"
# The concurrency pool of the assets that read Kommo, for the runs no job tags (the UI's ad-hoc Materialize):
# dagster.yaml limits it to one run at a time too.
KOMMO_POOL = "kommo"
# The tags of a run the request sensor starts for the web app's button: who asked, and which request.
REQUESTED_BY_TAG = "kommo/requested_by"
REQUEST_ID_TAG = "kommo/request_id"

# All three jobs run in the run's own process, the code location's default executor (see definitions.py).
# They read Kommo under one account-wide rate limit, so they share one concurrency tag.
_TAGS = {REFRESH_TAG: "kommo"}

# The local drift check (bookings_follow_mirror) runs in the nightly dry run, not after every refresh: the
# refresh has just derived its year from the mirror, and the check's seconds would be the operator's wait.
kommo_full_refresh_job = dg.define_asset_job(
    FULL_REFRESH_JOB,
    selection=dg.AssetSelection.groups(KOMMO_GROUP) - dg.AssetSelection.checks(MIRROR_CHECK_KEY),
    description="Kommo -> staging -> drop guard -> transactional swap into production -> calendar view.",
    tags=_TAGS,
)

kommo_dry_run_job = dg.define_asset_job(
    DRY_RUN_JOB,
    selection=dg.AssetSelection.assets(*STAGING_KEYS) | dg.AssetSelection.checks(MIRROR_CHECK_KEY),
    description="Kommo -> staging -> drop guard and warning checks, and the local drift check of the year "
    "(production against the current-state mirror); production is never touched.",
    tags=_TAGS,
)

# The same tag: an increment and a refresh never run at once (the database's one-running-import rule and
# the swap's advisory lock hold beside it for runs launched elsewhere).
kommo_incremental_sync_job = dg.define_asset_job(
    INCREMENTAL_SYNC_JOB,
    selection=dg.AssetSelection.assets(INCREMENT),
    description="Kommo changes since the sync cursor -> staging -> one transaction applying them to production "
    "and moving the cursor. Started by kommo_incremental_sync_sensor; needs no run config.",
    tags=_TAGS,
)
