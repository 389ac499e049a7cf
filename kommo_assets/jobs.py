"""The two jobs operators run: the full refresh and the dry run."""

import dagster as dg

from kommo_assets.assets.common import DRY_RUN_JOB, FULL_REFRESH_JOB, KOMMO_GROUP, REFRESH_TAG, STAGING_KEYS

# Both jobs run in the run's own process, the code location's default executor (see definitions.py).
# Both jobs read Kommo under one account-wide rate limit, so they share one concurrency tag:
# dagster.yaml's run queue lets one run with this tag run at a time and queues the rest.
_TAGS = {REFRESH_TAG: "kommo"}

kommo_full_refresh_job = dg.define_asset_job(
    FULL_REFRESH_JOB,
    selection=dg.AssetSelection.groups(KOMMO_GROUP),
    description="Kommo -> staging -> drop guard -> transactional swap into production -> calendar view.",
    tags=_TAGS,
)

kommo_dry_run_job = dg.define_asset_job(
    DRY_RUN_JOB,
    selection=dg.AssetSelection.assets(*STAGING_KEYS),
    description="Kommo -> staging -> drop guard and warning checks; production is never touched.",
    tags=_TAGS,
)
