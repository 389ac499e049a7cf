"""Raw snapshot export: a run's staged leads and contacts as gzip-compressed JSON lines, before the swap.

Files are ``kommo-snapshot-<run id>-leads.jsonl.gz`` and ``...-contacts.jsonl.gz``, one raw Kommo
object per line as staged, written under a temporary name and renamed when complete.
"""

import gzip
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kommo_assets.db import connect

PREFIX = "kommo-snapshot-"
SUFFIX = ".jsonl.gz"
_TABLES = {"leads": ("stg_kommo_leads", "lead_id"), "contacts": ("stg_kommo_contacts", "contact_id")}


@dataclass
class ExportResult:
    files: dict[str, Path]
    rows: dict[str, int]
    bytes_written: int
    removed_old: int


def snapshot_path(directory: Path, run_id: str, kind: str) -> Path:
    return Path(directory) / f"{PREFIX}{run_id}-{kind}{SUFFIX}"


def export_snapshot(database_url: str, run_id: str, directory: str | Path,
                    retention_days: float | None = None) -> ExportResult:
    """Streams the run's raw payloads to disk (flat memory), then deletes exports past retention."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files, rows = {}, {}
    with connect(database_url) as conn:
        for kind, (table, key) in _TABLES.items():
            path = snapshot_path(directory, run_id, kind)
            partial = path.with_name(path.name + ".partial")
            count = 0
            with conn.cursor(name=f"export_{kind}") as cur, gzip.open(partial, "wt", encoding="utf-8") as out:
                cur.itersize = 2000
                cur.execute(f"SELECT payload::text FROM {table} WHERE run_id = %s ORDER BY {key}", (run_id,))
                for (line,) in cur:
                    out.write(line)
                    out.write("\n")
                    count += 1
            os.replace(partial, path)
            files[kind], rows[kind] = path, count
    removed = prune_exports(directory, retention_days) if retention_days is not None else 0
    return ExportResult(files, rows, sum(p.stat().st_size for p in files.values()), removed)


def prune_exports(directory: str | Path, retention_days: float) -> int:
    """Deletes this project's snapshot files older than ``retention_days``; returns how many."""
    cutoff = time.time() - retention_days * 86400
    removed = 0
    for path in Path(directory).glob(f"{PREFIX}*{SUFFIX}"):
        if path.stat().st_mtime < cutoff:
            path.unlink()
            removed += 1
    return removed
