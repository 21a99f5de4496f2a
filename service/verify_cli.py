"""`voxarc verify [--repair] [--json]`: scrub the archive and say what is wrong.

Opening the archive runs the startup recovery (:mod:`storage.recovery`) when no node has it open:
orphan files and half-written temporary files are removed then. ``--repair`` also makes failed
compaction jobs due at once. Nothing that the index refers to is ever deleted: an instance that
cannot be rebuilt is reported (resend it from its source) and the exit status is 1.
"""

from __future__ import annotations

import json

from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from storage.scrub import requeue_failed_jobs, scrub


def register(subparsers) -> None:
    """Add ``verify`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("verify", help="check every blob and instance (exit 1 on damage)")
    add_node_options(p)
    p.add_argument("--repair", action="store_true",
                   help="also re-queue failed compaction jobs; orphans are removed when no "
                        "node has the archive open")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=verify)


def _summary(archive, report, requeued: int | None) -> dict:
    recovery = archive.recovery
    return {
        "ok": report.ok and recovery.clean,
        "blobs_checked": report.blobs_checked,
        "instances_checked": report.instances_checked,
        "bad_blobs": report.bad_blobs,
        "bad_instances": report.bad_instances,
        "bin_files_checked": report.bin_files_checked,
        "bad_bin_files": report.bad_bin_files,
        "recovery_ran": recovery.ran,
        "orphans_removed": len(recovery.orphans_removed),
        "temp_files_removed": recovery.temp_removed,
        "jobs_requeued": requeued,
    }


def _print(out: dict) -> None:
    print(f"blobs      {out['blobs_checked']} checked, {len(out['bad_blobs'])} bad")
    print(f"instances  {out['instances_checked']} checked, {len(out['bad_instances'])} bad")
    for key, reason in out["bad_blobs"].items():
        print(f"BAD blob {key}: {reason}")
    print(f"recycle bin  {out['bin_files_checked']} files checked, "
          f"{len(out['bad_bin_files'])} bad")
    for uid, reason in out["bad_instances"].items():
        print(f"BAD instance {uid}: {reason}")
    for name, reason in out["bad_bin_files"].items():
        print(f"BAD recycle bin file {name}: {reason}")
    if not out["recovery_ran"]:
        print("orphan scan skipped: a node has the archive open (stop it to remove orphans)")
    else:
        print(f"removed    {out['orphans_removed']} orphan files, "
              f"{out['temp_files_removed']} temporary files")
    if out["jobs_requeued"] is not None:
        print(f"requeued   {out['jobs_requeued']} failed compaction jobs")
    print("OK" if out["ok"] else "DAMAGED: see the lines above")


def verify(args) -> int:
    """Scrub the archive; return 0 when everything checks out, else 1."""
    archive = open_archive(settings_from_args(args))
    try:
        report = scrub(archive)
        requeued = requeue_failed_jobs(archive) if args.repair else None
        out = _summary(archive, report, requeued)
    finally:
        archive.close()
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        _print(out)
    return 0 if out["ok"] else 1
