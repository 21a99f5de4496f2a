"""`voxarc backup DEST`: a consistent copy of the archive, taken while the node runs.

The copy is a data folder that ``voxarc serve --data-dir DEST`` serves as it is; running the
command again into the same folder copies only what is new. Backing the copy up again restores
it (``--database-url`` puts the restored index on PostgreSQL). A destination that is neither
empty nor a backup of this archive is refused unless ``--force``. See :mod:`storage.backup`.
"""

from __future__ import annotations

import json
import logging

from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from service.progress import Progress
from storage.errors import StorageError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``backup`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("backup", help="copy the archive, consistent, while it runs")
    add_node_options(p)
    p.add_argument("dest", help="destination data folder (an earlier backup there is updated)")
    p.add_argument("--database-url", default="",
                   help="index of the copy (default: SQLite in DEST; another database is "
                        "emptied and filled)")
    p.add_argument("--force", action="store_true",
                   help="replace what DEST (and the --database-url database) holds even when "
                        "it is not a backup of this archive")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run_backup)


def run_backup(args) -> int:
    """Back the archive up; exit 1 when the backup could not be completed."""
    archive = open_archive(settings_from_args(args))
    bar = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None or bar.total != total:
            bar = Progress("backup", total)
        bar.advance(done - bar.done)

    try:
        report = archive.backup(args.dest, args.database_url, progress, force=args.force)
    except StorageError as exc:
        log.error("backup to %s failed: %s", args.dest, exc)
        return 1
    finally:
        archive.close()
    seconds = bar.finish() if bar else 0.0
    out = vars(report) | {"dest": str(args.dest), "seconds": round(seconds, 2)}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"backup in {args.dest}: {report.instances} instances, {report.blobs} blobs; "
              f"{report.files_copied} files copied ({report.bytes_copied / 1e6:.1f} MB), "
              f"{report.files_kept} kept from before, {report.files_removed} removed; "
              f"{report.rounds} snapshot(s); recycle bin: {report.bin_entries_copied} entries "
              f"copied ({report.bin_bytes_copied / 1e6:.1f} MB), {report.bin_entries_kept} "
              f"kept, {report.bin_entries_removed} removed")
    return 0
