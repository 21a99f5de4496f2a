"""Read-only reports over the index for the admin page: totals, savings by modality and by day,
studies and series with their ratios, and the compaction queue.

Bytes "stored" for an instance are its share of what the archive holds for it: the staged file
while it waits for compaction; afterwards its header bytes plus its frames' share of the blob it
was coded into. Summed over everything, the shares give :func:`storage.ingest.stored_bytes`
(blobs no instance refers to any more excepted).
"""

from __future__ import annotations

import calendar
import math
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass

from sqlalchemy import case, distinct, exists, func, or_, select

from storage import header_pack
from storage.index import Blob, Index, Instance, Job, Patient, Series, Study, lower_text

# Sort keys of :func:`studies` -> column name of the statement it builds
STUDY_SORT_KEYS = ("received", "date", "patient", "description", "instances", "original_bytes",
                   "stored_bytes", "ratio")


def _shares():
    """Return ``(select_from, stored share column)`` of a statement over instances."""
    frames = (select(Instance.blob_fk.label("blob_fk"), func.sum(Instance.frames).label("n"))
              .where(Instance.blob_fk.is_not(None)).group_by(Instance.blob_fk).subquery())
    headers = (func.coalesce(func.length(Instance.header_before), 0)
               + func.coalesce(func.length(Instance.header_after), 0))
    share = case((Instance.staged_key.is_not(None), Instance.size * 1.0),
                 else_=Blob.stored_bytes * Instance.frames * 1.0 / frames.c.n + headers)
    source = (Instance.__table__.outerjoin(Blob, Instance.blob_fk == Blob.id)
              .outerjoin(frames, frames.c.blob_fk == Instance.blob_fk))
    return source, share


def _ratio(stored: float, original: float) -> float:
    return round(stored / original, 4) if original else 0.0


def _sizes(original, stored) -> dict:
    original, stored = int(original or 0), int(round(stored or 0))
    return {"original_bytes": original, "stored_bytes": stored, "ratio": _ratio(stored, original)}


def bits_per_voxel(index: Index) -> dict:
    """Bits per voxel of the coded image stacks (pixels only, header packs left out), stored and
    as received.

    Returns
    -------
    dict
        ``bits_per_voxel`` (stored), ``original_bits_per_voxel`` and ``coded_voxels``; the bits
        are 0.0 while no stack is coded.
    """
    with index.read() as s:
        rows = s.execute(select(Blob.shape, Blob.raw_bytes, Blob.stored_bytes, Blob.codec_info)
                         .where(Blob.codec.in_(header_pack.VOLUME_CODECS))).all()
    voxels = sum(math.prod(int(v) for v in r[0].split(",")) for r in rows if r[0])
    raw = sum(r[1] for r in rows)
    stored = sum(r[2] - header_pack.pack_bytes(r[3]) for r in rows)
    return {"bits_per_voxel": round(8 * stored / voxels, 4) if voxels else 0.0,
            "original_bits_per_voxel": round(8 * raw / voxels, 4) if voxels else 0.0,
            "coded_voxels": voxels}


def by_modality(index: Index) -> list[dict]:
    """Instances, original and stored bytes per modality, largest first."""
    source, share = _shares()
    stmt = (select(Series.modality, func.count(Instance.id), func.sum(Instance.size),
                   func.sum(share))
            .select_from(source.join(Series, Instance.series_fk == Series.id))
            .group_by(Series.modality))
    with index.read() as s:
        rows = s.execute(stmt).all()
    out = [{"modality": m or "?", "instances": n, **_sizes(o, st)} for m, n, o, st in rows]
    return sorted(out, key=lambda r: -r["original_bytes"])


def by_day(index: Index) -> list[dict]:
    """Instances, original and stored bytes by day of receipt (UTC, ``YYYY-MM-DD``), in order."""
    source, share = _shares()
    stmt = select(Instance.received_at, Instance.size, share).select_from(source)
    days: dict = defaultdict(lambda: [0, 0, 0.0])
    with index.read() as s:
        for received, size, stored in s.execute(stmt):
            day = days[time.strftime("%Y-%m-%d", time.gmtime(received or 0))]
            day[0] += 1
            day[1] += size
            day[2] += stored or 0
    return [{"day": d, "instances": n, **_sizes(o, st)} for d, (n, o, st) in sorted(days.items())]


def room(days: list[dict], stored_bytes: int, disk: tuple[int, int], max_storage_bytes: int = 0,
         window: int = 30, now: float | None = None) -> dict:
    """How long the archive has room at its recent pace.

    Parameters
    ----------
    days : list of dict
        :func:`by_day`'s rows (bytes stored now of what came each day: after compaction, the
        net growth).
    stored_bytes : int
        What the archive holds now.
    disk : (int, int)
        Total and free bytes of the data folder's file system.
    max_storage_bytes : int
        The node's cap on stored bytes (0: none).
    window : int
        Days back the pace is taken over (fewer while the archive is younger).

    Returns
    -------
    dict
        ``disk_total_bytes``, ``disk_free_bytes``, ``room_bytes`` (free disk, or what the cap
        leaves when that is less) and ``bound`` (``disk`` or ``max_storage_bytes``),
        ``stored_per_day_bytes`` over ``window_days``, and ``days_left`` (None without growth).
    """
    now = time.time() if now is None else now
    total, free = disk
    room_bytes, bound = free, "disk"
    if max_storage_bytes and max_storage_bytes - stored_bytes < free:
        room_bytes, bound = max(0, max_storage_bytes - stored_bytes), "max_storage_bytes"
    cutoff = time.strftime("%Y-%m-%d", time.gmtime(now - (window - 1) * 86400))
    recent = [d for d in days if d["day"] >= cutoff]
    observed = window
    if days:    # a younger archive: the days since its first
        first = calendar.timegm(time.strptime(days[0]["day"], "%Y-%m-%d"))
        observed = max(1, min(window, int((now - first) // 86400) + 1))
    per_day = sum(d["stored_bytes"] for d in recent) / observed
    return {"disk_total_bytes": total, "disk_free_bytes": free, "room_bytes": room_bytes,
            "bound": bound, "stored_per_day_bytes": round(per_day), "window_days": observed,
            "days_left": round(room_bytes / per_day, 1) if per_day > 0 else None}


def room_now(index: Index, data_dir, stored_bytes: int, max_storage_bytes: int = 0,
             days: list[dict] | None = None) -> dict:
    """:func:`room` of an archive now: its data folder's file system, its :func:`by_day` (when
    ``days`` does not give them already)."""
    usage = shutil.disk_usage(data_dir)
    return room(by_day(index) if days is None else days, stored_bytes,
                (usage.total, usage.free), max_storage_bytes)


def _series_rows(session, where) -> list[dict]:
    source, share = _shares()
    stmt = (select(Series, Study.study_uid, func.count(Instance.id), func.sum(Instance.size),
                   func.sum(share), func.count(Instance.staged_key),
                   func.min(Instance.source_ae), func.max(Instance.source_ae))
            .select_from(source.join(Series, Instance.series_fk == Series.id)
                         .join(Study, Series.study_fk == Study.id))
            .where(where).group_by(Series.id, Study.study_uid))
    out = []
    for series, study_uid, n, original, stored, staged, first, last in session.execute(stmt):
        out.append({"series_uid": series.series_uid, "study_uid": study_uid,
                    "modality": series.modality, "series_number": series.series_number,
                    "description": series.series_description, "instances": n,
                    "staged_instances": staged, "last_received": series.last_received,
                    # who sent it: the calling AE titles, first and last in order (two at most)
                    "sources": sorted({first, last} - {"", None}),
                    **_sizes(original, stored)})
    return sorted(out, key=lambda r: (r["study_uid"], _number(r["series_number"])))


def _number(text: str) -> tuple:
    return (0, int(text), "") if text.strip().isdigit() else (1, 0, text)


_DATE = re.compile(r"^\d{8}$")


@dataclass(frozen=True)
class StudyFilter:
    """What the admin page's search asks of studies. ``text``: words, each found (case aside)
    in the patient's name or ID, the accession number, the study description or the Study
    Instance UID; ``modality``: a series of that modality;
    ``date_from``, ``date_to``: study dates (YYYYMMDD, inclusive); ``patient_id``: one
    patient's studies (the Patient ID exactly, none: any)."""

    text: str = ""
    modality: str = ""
    date_from: str = ""
    date_to: str = ""
    patient_id: str | None = None

    def __post_init__(self):
        for date in (self.date_from, self.date_to):
            if date and not _DATE.match(date):
                raise ValueError(f"a date is YYYYMMDD, not {date!r}")

    def clauses(self) -> list:
        """The statement's WHERE clauses (over Study and Patient)."""
        out = [self._word(w) for w in self.text.split()]
        if self.modality:
            out.append(exists().where(Series.study_fk == Study.id,
                                      Series.modality == self.modality.strip().upper()))
        if self.date_from or self.date_to:      # an empty or an anonymiser's date is neither
            out.append(Study.study_date.between(self.date_from or "00000000",
                                                self.date_to or "99999999"))
        if self.patient_id is not None:
            out.append(Patient.patient_id == self.patient_id)
        return out

    @staticmethod
    def _word(word: str):
        like = "%" + re.sub(r"([\\%_])", r"\\\1", word) + "%"
        fields = (Patient.patient_name, Patient.patient_id, Study.accession_number,
                  Study.study_description, Study.study_uid)
        return or_(*(lower_text(f).like(like.lower(), escape="\\") for f in fields))


def _study_statement(sort: str, descending: bool, where: StudyFilter | None = None):
    source, share = _shares()
    per_study = (select(Series.study_fk.label("study_fk"),
                        func.count(Instance.id).label("instances"),
                        func.sum(Instance.size).label("original_bytes"),
                        func.sum(share).label("stored_bytes"),
                        func.max(Instance.received_at).label("received"))
                 .select_from(source.join(Series, Instance.series_fk == Series.id))
                 .group_by(Series.study_fk).subquery())
    c = per_study.c
    keys = {"received": c.received, "date": Study.study_date, "patient": Patient.patient_name,
            "description": Study.study_description, "instances": c.instances,
            "original_bytes": c.original_bytes, "stored_bytes": c.stored_bytes,
            "ratio": c.stored_bytes * 1.0 / c.original_bytes}
    if sort not in keys:
        raise ValueError(f"unknown sort key {sort!r}; known: {', '.join(STUDY_SORT_KEYS)}")
    order = keys[sort].desc() if descending else keys[sort].asc()
    return (select(Study, Patient, c.instances, c.original_bytes, c.stored_bytes, c.received)
            .join(Patient, Study.patient_fk == Patient.id)
            .join(per_study, c.study_fk == Study.id)
            .where(*(where.clauses() if where else ()))
            .order_by(order, Study.id))


def studies(index: Index, sort: str = "received", descending: bool = True, offset: int = 0,
            limit: int = 50, where: StudyFilter | None = None) -> dict:
    """One page of studies (those ``where`` lets through) with their series, sizes and ratios.

    Parameters
    ----------
    index : Index
    sort : str
        One of :data:`STUDY_SORT_KEYS`.
    descending : bool
        Sort order.
    offset, limit : int
        The page: ``limit`` studies from the ``offset``-th.

    Returns
    -------
    dict
        ``total`` (studies), ``offset``, ``limit`` and ``items``: one dict per study with its
        series under ``series`` and ``patient_studies``, how many studies its patient has.

    Raises
    ------
    ValueError
        On an unknown sort key.
    """
    stmt = _study_statement(sort, descending, where)
    with index.read() as s:
        total = s.scalar(select(func.count()).select_from(stmt.subquery()))
        rows = s.execute(stmt.offset(max(0, offset)).limit(max(1, limit))).all()
        series = _series_rows(s, Series.study_fk.in_([r[0].id for r in rows]))
        per_patient = dict(s.execute(      # studies that hold instances, as listed
            select(Study.patient_fk, func.count(distinct(Study.id)))
            .join(Series, Series.study_fk == Study.id)
            .join(Instance, Instance.series_fk == Series.id)
            .where(Study.patient_fk.in_({r[0].patient_fk for r in rows}))
            .group_by(Study.patient_fk)).all())
    by_study = defaultdict(list)
    for item in series:
        by_study[item["study_uid"]].append(item)
    items = []
    for study, patient, n, original, stored, received in rows:
        members = by_study[study.study_uid]
        items.append({"study_uid": study.study_uid, "patient_name": patient.patient_name,
                      "patient_id": patient.patient_id,
                      "patient_studies": per_patient.get(study.patient_fk, 1),
                      "study_date": study.study_date,
                      "description": study.study_description,
                      "accession_number": study.accession_number,
                      "modalities": sorted({m["modality"] for m in members if m["modality"]}),
                      "instances": n, "received": received, **_sizes(original, stored),
                      "series": members})
    return {"total": total, "offset": offset, "limit": limit, "items": items}


def study_uids(index: Index, where: StudyFilter, limit: int) -> list[str]:
    """The Study Instance UIDs of at most ``limit`` studies that hold instances and that
    ``where`` lets through, oldest study date first."""
    stmt = (select(Study.study_uid).join(Patient, Study.patient_fk == Patient.id)
            .where(exists().where(Series.study_fk == Study.id,
                                  Instance.series_fk == Series.id), *where.clauses())
            .order_by(Study.study_date, Study.study_time, Study.id).limit(limit))
    with index.read() as s:
        return list(s.scalars(stmt))


def series_detail(index: Index, series_uid: str) -> dict | None:
    """A series with its sizes, blobs, instances and compaction job; None when unknown."""
    with index.read() as s:
        found = _series_rows(s, Series.series_uid == series_uid)
        if not found:
            return None
        item = found[0]
        series_id = s.scalar(select(Series.id).where(Series.series_uid == series_uid))
        instances = s.execute(select(Instance.sop_uid, Instance.instance_number, Instance.size,
                                     Instance.transfer_syntax, Instance.staged_key,
                                     Instance.blob_fk)
                              .where(Instance.series_fk == series_id)
                              .order_by(Instance.instance_number, Instance.id)).all()
        blob_ids = sorted({i.blob_fk for i in instances if i.blob_fk is not None})
        blobs = s.scalars(select(Blob).where(Blob.id.in_(blob_ids))).all()
        job = s.scalar(select(Job).where(Job.series_fk == series_id).order_by(Job.id.desc()))
    item["instances_list"] = [
        {"sop_uid": i.sop_uid, "instance_number": i.instance_number, "size": i.size,
         "transfer_syntax": i.transfer_syntax,
         "state": "staged" if i.staged_key is not None else "compressed"} for i in instances]
    item["blobs"] = [_blob(b) for b in blobs]
    item["job"] = _job(job, series_uid) if job else None
    return item


def middle_instance(index: Index, series_uid: str) -> tuple[str, str] | None:
    """(SOP Instance UID, ingest SHA-256) of the image in the middle of a series (along the
    slice positions, else by instance number), preferring instances with uncompressed pixels;
    None when the series is unknown."""
    with index.read() as s:
        rows = s.execute(select(Instance.sop_uid, Instance.sha256, Instance.pixel_length)
                         .join(Series, Instance.series_fk == Series.id)
                         .where(Series.series_uid == series_uid)
                         .order_by(Instance.position, Instance.instance_number, Instance.id)).all()
    images = [r[:2] for r in rows if r[2]] or [r[:2] for r in rows]
    return tuple(images[len(images) // 2]) if images else None


def _blob(blob: Blob) -> dict:
    voxels = math.prod(int(v) for v in blob.shape.split(",")) if blob.shape else 0
    return {"codec": blob.codec, "codec_info": blob.codec_info, "shape": blob.shape,
            "dtype": blob.dtype, "slab": blob.slab, "time_points": blob.interleave or 1,
            "raw_bytes": blob.raw_bytes, "stored_bytes": blob.stored_bytes,
            "bits_per_voxel": round(8 * blob.stored_bytes / voxels, 4) if voxels else None}


def _job(job: Job, series_uid: str) -> dict:
    return {"series_uid": series_uid, "state": job.state, "reason": job.reason,
            "attempts": job.attempts, "updated_at": job.updated_at,
            "next_attempt": job.next_attempt}


def jobs(index: Index) -> dict:
    """The compaction queue.

    Returns
    -------
    dict
        ``pending``: staged series without a running or failed job (staged instances and bytes,
        last receipt); ``running`` and ``failed``: their jobs (state, reason, attempts, times).
    """
    with index.read() as s:
        staged = s.execute(select(Series.series_uid, Series.modality, Series.last_received,
                                  func.count(Instance.id), func.sum(Instance.size))
                           .join(Instance, Instance.series_fk == Series.id)
                           .where(Instance.staged_key.is_not(None))
                           .group_by(Series.id)).all()
        active = s.execute(select(Job, Series.series_uid).join(Series, Job.series_fk == Series.id)
                           .where(Job.state.in_(("running", "failed")))
                           .order_by(Job.updated_at.desc())).all()
    busy = {uid for _, uid in active}
    pending = [{"series_uid": uid, "modality": modality, "last_received": last,
                "staged_instances": n, "staged_bytes": int(size or 0)}
               for uid, modality, last, n, size in staged if uid not in busy]
    return {"pending": sorted(pending, key=lambda p: p["last_received"]),
            "running": [_job(j, uid) for j, uid in active if j.state == "running"],
            "failed": [_job(j, uid) for j, uid in active if j.state == "failed"]}


def staged_bytes(index: Index, series_id: int) -> int:
    """Bytes of the staged instances of the series ``series_id`` (what compaction will read)."""
    with index.read() as s:
        return int(s.scalar(select(func.coalesce(func.sum(Instance.size), 0)).where(
            Instance.series_fk == series_id, Instance.staged_key.is_not(None))))


def ping(index: Index) -> bool:
    """Return True when the index answers a trivial query."""
    with index.read() as s:
        return s.scalar(select(func.count(Study.id)).where(Study.id < 0)) == 0
