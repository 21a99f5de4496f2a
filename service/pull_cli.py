"""`voxarc pull SOURCE`: copy studies from another DICOM archive into this one (service.pull)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from service.progress import Progress
from service.pull import Puller, PullError, resolve_source

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``pull`` to the ``voxarc`` parser."""
    p = subparsers.add_parser(
        "pull", help="copy studies from another DICOM archive (C-FIND, then C-GET); resumes "
                     "where an earlier pull stopped")
    add_node_options(p)
    p.add_argument("source", help="a configured destination's name or AE title, or "
                                  "AET@HOST:PORT")
    p.add_argument("--study", action="append", metavar="UID",
                   help="Study Instance UID (repeatable; default: every study that matches)")
    p.add_argument("--patient-id", help="Patient ID (C-FIND matching: * and ? wildcards)")
    p.add_argument("--study-date", metavar="DATE", help="study date or range, e.g. "
                   "20240101-20241231")
    p.add_argument("--modality", help="a modality in the study (CT, MR, ...)")
    p.add_argument("--ae-title", help="AE title to call the source as (default: the node's)")
    p.add_argument("--move", action="store_true",
                   help="have the source send by C-MOVE to the node's AE title instead of "
                        "C-GET (for sources without C-GET: the node must be running and the "
                        "source must know its address)")
    p.add_argument("--dry-run", action="store_true", help="list what would be pulled, pull "
                   "nothing")
    p.add_argument("--json", metavar="REPORT", help="write a report of every study (instances "
                   "at the source, received, still missing, status) to this file")
    p.set_defaults(func=pull)


def _filters(args) -> dict[str, str]:
    filters = {}
    if args.study:
        filters["StudyInstanceUID"] = "\\".join(args.study)
    for keyword, value in (("PatientID", args.patient_id), ("StudyDate", args.study_date),
                           ("ModalitiesInStudy", args.modality)):
        if value:
            filters[keyword] = value
    return filters


def pull(args) -> int:
    """Pull the matching studies; 0 when every instance of them is held afterwards."""
    settings = settings_from_args(args)
    try:
        source = resolve_source(settings, args.source)
    except ValueError as exc:
        log.error("pull: %s", exc)
        return 2
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)   # its lines per message
    archive = open_archive(settings)
    puller = Puller(archive, source, args.ae_title or settings.ae_title,
                    settings.max_dataset_bytes)
    try:
        studies = puller.studies(_filters(args))
        log.info("pull from %s: %d studies match", args.source, len(studies))
        if args.dry_run:
            for plan in map(puller.plan, studies):
                print(f"{plan.study_uid}\t{plan.patient}\t{plan.description}\t"
                      f"{len(plan.missing)} of {len(plan.instances)} to pull")
            return 0
        report: list[dict] = []
        code = _pull_all(puller, archive, studies, settings.ae_title if args.move else None,
                         report)
        if args.json:
            Path(args.json).write_text(json.dumps({"source": args.source, "studies": report},
                                                  indent=1))
        return code
    except PullError as exc:
        log.error("pull: %s", exc)
        return 1
    finally:
        archive.close()


def _pull_all(puller: Puller, archive, studies, move_to: str | None, report: list) -> int:
    """Plan and pull study by study (a migration of many studies starts at once, and what a
    study lacks is judged just before it is pulled); a study that fails does not stop the
    others. Each study's outcome is appended to ``report``."""
    progress = Progress("pull", len(studies))
    incomplete = received = 0
    for plan in studies:
        entry = {"study_uid": plan.study_uid, "patient": plan.patient}
        try:
            got, still, status = _pull_one(puller, archive, plan, move_to)
            entry |= {"at_source": len(plan.instances), "received": got, "missing": still,
                      "status": f"0x{status:04X}"}
        except PullError as exc:
            log.warning("study %s (%s) not pulled: %s", plan.study_uid, plan.patient, exc)
            got, still = 0, None
            entry |= {"error": str(exc)}
        report.append(entry)
        received += got
        incomplete += still != 0
        progress.advance(note=plan.study_uid)
    log.info("pulled %d studies (%d instances received) in %.1f s, %d incomplete",
             len(studies), received, progress.finish(), incomplete)
    return 1 if incomplete else 0


def _pull_one(puller: Puller, archive, plan, move_to: str | None) -> tuple[int, int, int]:
    """(instances received, instances still missing here afterwards, final status)."""
    puller.plan(plan)
    if not plan.missing:
        return 0, 0, 0x0000
    result = puller.pull(plan, move_to)
    still = len(plan.instances) - len(archive.held(list(plan.instances)))
    level = logging.INFO if still == 0 and result.status == 0 else logging.WARNING
    log.log(level, "study %s (%s): %d instances received, %d failed, status 0x%04X; %d of %d "
            "still missing", plan.study_uid, plan.patient, result.completed, result.failed,
            result.status, still, len(plan.instances))
    return result.completed, still, result.status
