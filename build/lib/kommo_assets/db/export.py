"""Raw snapshot export: a run's staged leads and contacts as gzip-compressed JSON lines, before the swap.

Files are ``kommo-snapshot-<run id>-leads.jsonl.gz`` and ``...-contacts.jsonl.gz``, one raw Kommo
object per line as staged, written under a temporary name (``.partial``) and renamed when complete. They
hold clients' personal data: the directory is made ``0700`` and every file ``0600``, whatever the
process umask.
"""

import contextlib
import gzip
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from kommo_assets.db import connect

log = logging.getLogger(__name__)

PREFIX = "kommo-snapshot-"
SUFFIX = ".jsonl.gz"
PARTIAL = ".partial"
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
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
    """Streams the run's raw payloads to disk (flat memory), then deletes exports past retention.

    A failed export removes the partial file it was writing (the files it completed stay) and raises."""
    directory = _private_directory(Path(directory))
    files, rows = {}, {}
    with connect(database_url) as conn:
        for kind, (table, key) in _TABLES.items():
            path = snapshot_path(directory, run_id, kind)
            partial = path.with_name(path.name + PARTIAL)
            count = 0
            try:
                with _private_file(partial) as raw, gzip.open(raw, "wt", encoding="utf-8") as out, \
                        conn.cursor(name=f"export_{kind}") as cur:
                    cur.itersize = 2000
                    cur.execute(f"SELECT payload::text FROM {table} WHERE run_id = %s ORDER BY {key}",
                                (run_id,))
                    for (line,) in cur:
                        out.write(line)
                        out.write("\n")
                        count += 1
                os.replace(partial, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    partial.unlink(missing_ok=True)
                raise
            files[kind], rows[kind] = path, count
    removed = prune_exports(directory, retention_days) if retention_days is not None else 0
    return ExportResult(files, rows, sum(p.stat().st_size for p in files.values()), removed)


def _private_directory(directory: Path) -> Path:
    """The export directory, created if missing, with only its owner allowed in (``0700``). mkdir's mode is
    cut by the umask and an existing directory keeps its own, so the mode is set explicitly; a directory
    that is not this user's to change is used as it is (the files are ``0600`` anyway), with a warning."""
    directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    try:
        os.chmod(directory, DIRECTORY_MODE)
    except PermissionError:
        log.warning("Cannot restrict the snapshot directory %s to its owner (mode 0700): it is not this "
                    "user's. The snapshot files themselves are readable by their owner only.", directory)
    return directory


@contextlib.contextmanager
def _private_file(path: Path) -> Iterator[BinaryIO]:
    """``path`` opened for binary writing, truncated, readable and writable by its owner only (``0600``,
    set on the open file, so the data is never more open). A symlink in its place is refused."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # the umask may have cut the mode; an older file kept its own
        raw = os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
    with raw:
        yield raw


def prune_exports(directory: str | Path, retention_days: float) -> int:
    """Deletes this project's snapshot files older than ``retention_days``, and partial files of exports
    that failed before that; returns how many."""
    cutoff = time.time() - retention_days * 86400
    removed = 0
    directory = Path(directory)
    for pattern in (f"{PREFIX}*{SUFFIX}", f"{PREFIX}*{SUFFIX}{PARTIAL}"):
        for path in directory.glob(pattern):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # removed meanwhile (another run pruning)
                continue
    return removed
