"""The two jobs operators run: the full refresh and the dry run."""

import dagster as dg

from kommo_assets.assets.common import DRY_RUN_JOB, FULL_REFRESH_JOB, KOMMO_GROUP, STAGING_KEYS

kommo_full_refresh_job = dg.define_asset_job(
    FULL_REFRESH_JOB,
    selection=dg.AssetSelection.groups(KOMMO_GROUP),
    description="Kommo -> staging -> drop guard -> transactional swap into production -> calendar view.",
)

kommo_dry_run_job = dg.define_asset_job(
    DRY_RUN_JOB,
    selection=dg.AssetSelection.assets(*STAGING_KEYS),
    description="Kommo -> staging -> drop guard and warning checks; production is never touched.",
)
