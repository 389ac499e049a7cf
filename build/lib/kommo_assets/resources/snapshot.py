"""The raw snapshot export as a Dagster resource: where exports go and how long they are kept."""

import dagster as dg
from pydantic import Field, field_validator

from kommo_assets.db.export import ExportResult, export_snapshot
from kommo_assets.resources.fields import positive, unresolved
from kommo_assets.resources.postgres import PostgresResource


class SnapshotExportResource(dg.ConfigurableResource):
    """Exports each run's raw snapshot before its swap (``KOMMO_SNAPSHOT_DIR``); unset = no export."""

    directory: str | None = Field(
        default=None, description="KOMMO_SNAPSHOT_DIR: where raw snapshots are exported before each swap; "
        "unset = no export."
    )
    retention_days: float = Field(
        default=90, description="KOMMO_SNAPSHOT_RETENTION_DAYS: exported snapshots older than this are deleted."
    )

    @field_validator("directory", mode="before")
    @classmethod
    def _directory(cls, value):
        if unresolved(value) or not isinstance(value, str):
            return value
        return value.strip() or None

    @field_validator("retention_days", mode="before")
    @classmethod
    def _retention(cls, value):
        return positive("KOMMO_SNAPSHOT_RETENTION_DAYS", value)

    def export(self, postgres: PostgresResource, run_id: str) -> ExportResult | None:
        """The run's staged payloads on disk, then exports past retention deleted; None when not configured."""
        if not self.directory:
            return None
        return export_snapshot(postgres.database_url, run_id, self.directory, self.retention_days)
