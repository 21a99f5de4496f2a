"""`voxarc export STUDY_UID... DIR`: studies' instances as DICOM files, datasets byte for byte.

Each file is a Part 10 file: preamble, a File Meta group naming the instance and its transfer
syntax, then the dataset exactly as it was received (rebuilt and SHA-256 checked by the archive).
Files go to ``DIR/<series UID>/<SOP instance UID>.dcm``; a UID that is not a plain DICOM UID
never becomes a path (its file is named after its hash). With ``--dicomdir`` they form a DICOM
media file-set instead (:mod:`storage.media`): a DICOMDIR and files named as media require, for a
CD or a USB stick that any viewer opens. With ``--deidentify`` the files are de-identified
copies (:mod:`storage.deidentify`), for research or teaching, not the received bytes.
"""

from __future__ import annotations

import getpass
import logging
import os
from collections import Counter
from pathlib import Path

from service.ae import open_archive
from service.config import add_node_options, settings_from_args
from service.progress import Progress
from storage import deidentify, media, reports
from storage.errors import StorageError
from storage.part10 import safe_name, write_file

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add ``export`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("export", help="write studies' instances as DICOM files")
    add_node_options(p)
    p.add_argument("study_uids", nargs="*", metavar="study_uid", help="Study Instance UID")
    p.add_argument("folder", help="where to write (created when missing)")
    p.add_argument("--patient", action="append", default=[], metavar="PATIENT_ID",
                   help="every study of the patient with this Patient ID (exactly), oldest "
                        "first, before the studies named (repeatable)")
    p.add_argument("--dicomdir", action="store_true",
                   help="write a DICOM media file-set: a DICOMDIR and its files (for a CD or "
                        "a USB stick)")
    p.add_argument("--profile", choices=sorted(media.PROFILES),
                   help="with --dicomdir: for this media profile (STD-GEN-CD: every file "
                        "Explicit VR Little Endian, converted losslessly where received "
                        "otherwise)")
    p.add_argument("--deidentify", action="store_true",
                   help="write de-identified copies instead (pseudonyms, new UIDs, shifted "
                        "dates, identifying and private attributes removed; images whose "
                        "pixels may carry names are left out): for research or teaching")
    p.add_argument("--key-file", metavar="FILE",
                   help="with --deidentify: the secret that fixes pseudonyms, UIDs and date "
                        "shifts (made when missing; the same file gives the same ones next "
                        "time; without it, each export is unlinkable to any other)")
    p.add_argument("--keep-dates", action="store_true",
                   help="with --deidentify: keep dates as they are instead of shifting them")
    p.add_argument("--keep-descriptions", action="store_true",
                   help="with --deidentify: keep study and series descriptions and protocol "
                        "names (check them: they may name the patient)")
    p.add_argument("--mapping", metavar="CSV",
                   help="with --deidentify: write the original identifiers beside their "
                        "replacements, for whoever may re-identify (keep it apart from the copies)")
    p.set_defaults(func=export)


def _study_series(archive, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> Series Instance UID of a study's instances (none: unknown)."""
    return {r["SOPInstanceUID"]: r["SeriesInstanceUID"]
            for r in archive.find("IMAGE", {"StudyInstanceUID": study_uid})}


def export_instances(archive, series: dict[str, str], folder: Path,
                     progress: Progress | None = None) -> tuple:
    """Write instances under ``folder``, each as ``<series UID>/<SOP instance UID>.dcm``.

    Parameters
    ----------
    archive : Archive
    series : dict
        SOP Instance UID -> Series Instance UID of the instances to write.
    folder : Path
    progress : Progress, optional
        Advanced once per instance.

    Returns
    -------
    tuple of (list of Path, int)
        The files written and the number of instances that could not be rebuilt.
    """
    written, failed = [], 0
    with archive.retrieval_order(list(series), "export") as (ordered, _):
        located = archive.locate(ordered)
        for uid in ordered:
            try:
                inst = archive.retrieve_parts(uid, located.get(uid))
            except StorageError as exc:
                failed += 1
                log.error("instance %s not exported: %s", uid, exc)
            else:
                target = folder / safe_name(series[uid]) / f"{safe_name(uid)}.dcm"
                write_file(target, inst.sop_class_uid, uid, inst.transfer_syntax, inst.parts)
                written.append(target)
            if progress:
                progress.advance(note=uid[-30:])
    return written, failed


def export(args) -> int:
    """Export studies (named, or all of a patient's); exit status 2 when none is named, 1 when
    one is unknown or an instance cannot be rebuilt (or,
    with ``--dicomdir``, has no directory record)."""
    if not args.study_uids and not args.patient:
        log.error("name studies by their UIDs, or a patient with --patient")
        return 2
    if args.profile and not args.dicomdir:
        log.error("--profile is for a file-set: add --dicomdir")
        return 2
    deid_options = [o for o in ("key_file", "keep_dates", "keep_descriptions", "mapping")
                    if getattr(args, o)]
    if deid_options and not args.deidentify:
        log.error("--%s is for --deidentify", deid_options[0].replace("_", "-"))
        return 2
    if args.deidentify and args.dicomdir:
        log.error("--deidentify writes plain files: leave out --dicomdir")
        return 2
    archive = open_archive(settings_from_args(args))
    try:
        named = []
        for patient_id in args.patient:
            found = reports.study_uids(archive.index, reports.StudyFilter(patient_id=patient_id),
                                       1 << 31)
            if not found:
                log.error("no study of patient %r in the archive", patient_id)
                return 1
            named += found
        named += args.study_uids
        studies = {uid: _study_series(archive, uid) for uid in dict.fromkeys(named)}
        totals = {uid: len(members) for uid, members in studies.items()}
        unknown = [uid for uid, n in totals.items() if not n]
        for uid in unknown:
            log.error("no study %s in the archive", uid)
        if unknown:
            return 1
        actor = f"cli export ({_user()})"
        kind = "export (DICOMDIR)" if args.dicomdir else \
            "export (de-identified)" if args.deidentify else "export"
        for uid, n in totals.items():      # noted before: a failure half-way still read some
            archive.accesses.note(actor, kind, uid, instances=n,
                                  detail=f"to {Path(args.folder).resolve()}")
        if args.deidentify:
            return _export_deidentified(archive, studies, Path(args.folder), args)
        if args.dicomdir:
            return _export_file_set(archive, list(totals), sum(totals.values()),
                                    Path(args.folder), args.profile)
        progress = Progress("export", sum(totals.values()))
        written, failed = [], 0
        for members in studies.values():
            files, lost = export_instances(archive, members, Path(args.folder), progress)
            written, failed = written + files, failed + lost
        log.info("exported %d instances to %s in %.1f s (%d failed)", len(written), args.folder,
                 progress.finish(), failed)
        return 1 if failed else 0
    finally:
        archive.close()


def _export_deidentified(archive, studies: dict, folder: Path, args) -> int:
    """Write de-identified copies of the studies' instances under ``folder``, each as
    ``<new series UID>/<new SOP instance UID>.dcm`` (:mod:`storage.deidentify`)."""
    try:
        key = deidentify.key_from(Path(args.key_file)) if args.key_file else None
    except (OSError, ValueError) as exc:
        log.error("--key-file %s: %s", args.key_file, exc)
        return 2
    deid = deidentify.Deidentifier(key, args.keep_dates, args.keep_descriptions)
    progress = Progress("export", sum(len(m) for m in studies.values()))
    written, failed, left_out, mapping = 0, 0, Counter(), deidentify.Mapping()
    for members in studies.values():
        with archive.retrieval_order(list(members), "export") as (ordered, _):
            for uid in ordered:
                try:
                    copy = deidentify.copy_of(archive.retrieve(uid), deid)
                except Exception as exc:     # an instance pydicom cannot read or write
                    failed += 1
                    log.error("instance %s not exported: %s", uid, exc)
                else:
                    if isinstance(copy, str):
                        left_out[copy] += 1
                        log.info("instance %s left out: %s", uid, copy)
                    else:
                        target = folder / copy.path
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(copy.data)
                        mapping.add(copy)
                        written += 1
                progress.advance(note=uid[-30:])
    if args.mapping:
        mapping.write(Path(args.mapping))
        log.info("identifiers and their replacements written to %s", args.mapping)
    for why, n in left_out.items():
        log.warning("%d instances left out: %s", n, why)
    log.info("exported %d de-identified instances to %s in %.1f s (%d left out, %d failed)",
             written, folder, progress.finish(), sum(left_out.values()), failed)
    return 1 if failed else 0


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:          # no user name for this uid (a container's)
        return f"uid {os.getuid()}"


def _export_file_set(archive, study_uids: list[str], total: int, folder: Path,
                     profile: str | None) -> int:
    planning = Progress("directory", total)
    plan = media.plan_file_set(archive, study_uids, planning, profile)
    planning.finish()
    if plan.invented:
        log.warning("%d directory records carry an invented key the instance lacks (the "
                    "files are as received)", plan.invented)
    if plan.convert:
        log.info("%d instances converted to Explicit VR Little Endian for %s", len(plan.convert),
                 profile)
    if plan.outside_profile:
        log.warning("%d instances written as received, in syntaxes %s does not take and they "
                    "cannot be converted from losslessly (%s): the file-set is not %s",
                    len(plan.outside_profile), profile,
                    ", ".join(sorted(set(plan.outside_profile.values()))), profile)
    progress = Progress("export", len(plan.files))
    failed = media.write_file_set(archive, plan, folder, progress)
    if failed:
        log.error("%d instances could not be rebuilt: no DICOMDIR written to %s", len(failed),
                  folder)
    else:
        log.info("wrote a file-set of %d instances (DICOMDIR) to %s in %.1f s", len(plan.files),
                 folder, progress.finish())
    if plan.left_out:
        log.error("%d instances left out of the file-set (above)", len(plan.left_out))
    return 1 if failed or plan.left_out else 0
