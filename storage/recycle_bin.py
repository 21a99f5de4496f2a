"""Deleted instances kept restorable for a while: the recycle bin.

Before a deletion (``voxarc delete``, a retention rule, an IOCM rejection note) changes the
index, every instance it removes is written to ``recycle/<entry>/`` in the data folder as the
Part 10 file of the dataset it was received as (rebuilt and SHA-256 checked, as for a
retrieval), fsync'd, and then the entry's manifest (``entry.json``: what was deleted, why, and
each file's SHA-256, sender and study). An entry without a manifest is an interrupted one and
is never listed or restored.

Restoring an entry sends its files through the archive's ingest, as ``voxarc import`` does,
so each instance comes back byte for byte (and is compacted again). The node removes entries
older than ``deleted_keep_days``; the files are plain DICOM, readable by any tool.

A correction of instances on legal hold keeps their originals (as they were before it) in an
entry of kind ``original``, which names the holds: no entry is removed, by age, by a full disk
or by emptying the bin, while one of its holds is in force, and such an entry is not restored
(the archive still holds its instances, corrected).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from storage.blobstore import fsync_path
from storage.errors import StorageError
from storage.index import Index, Instance, Patient, Series, Study
from storage.part10 import safe_name, split_file, write_file

log = logging.getLogger(__name__)
MANIFEST = "entry.json"
#: free space a deletion must leave beside its copies: this many bytes, and this share of the
#: disk (new images come first: the bin never fills the disk they are written to)
SPARE_BYTES = 256 << 20
SPARE_SHARE = 0.10
#: below this share of the disk free, the running node removes the oldest entries early
LOW_SHARE = 0.05
#: an entry still without its manifest after this long was interrupted (a crash)
INTERRUPTED_S = 3600.0
#: the running node looks for expired entries at most this often
PURGE_EVERY_S = 3600.0


class RecycleBinError(StorageError):
    """The recycle bin could not keep or restore an entry."""


class NotRestorable(RecycleBinError):
    """An entry of originals, whose instances the archive still holds (corrected)."""


@dataclass
class Entry:
    """One deletion's kept instances (the manifest of ``recycle/<name>/``)."""

    name: str
    deleted_at: float
    level: str
    uid: str
    reason: str
    instances: list[dict]
    kind: str = "deleted"           # or "original": kept by a correction of held instances
    holds: list = field(default_factory=list)       # [level, uid] of each hold it is kept for

    @property
    def bytes(self) -> int:
        return sum(i["bytes"] for i in self.instances)

    def summary(self) -> dict:
        """What ``voxarc deleted`` shows of the entry (its expiry: :meth:`RecycleBin.summaries`,
        which knows the holds)."""
        return {"entry": self.name, "deleted_at": self.deleted_at, "level": self.level,
                "uid": self.uid, "reason": self.reason, "instances": len(self.instances),
                "bytes": self.bytes,
                "patients": sorted({i["patient_id"] for i in self.instances}),
                "studies": len({i["study_uid"] for i in self.instances}),
                "kind": self.kind, "holds": [list(h) for h in self.holds]}


class RecycleBin:
    """The recycle bin of an archive in ``root`` (``<data_dir>/recycle``).

    Parameters
    ----------
    keep_days : float
        Days an entry is kept; 0 turns the bin off (deletions are for good at once).
    """

    def __init__(self, root: Path, keep_days: float, hold_states=None):
        self.root, self.keep_days = Path(root), float(keep_days)
        #: a callable giving {(level, uid): None while in force, else when released} of every
        #: hold placed (:func:`storage.holds.states`; none: no holds)
        self.hold_states = hold_states or (lambda: {})
        self._last_purge = 0.0
        self._lock = threading.Lock()
        self._held: tuple[float, int] | None = None     # (when counted, bytes)

    @property
    def enabled(self) -> bool:
        return self.keep_days > 0

    def keep(self, index: Index, retrieve, instances: dict, level: str, uid: str,
             reason: str, retrieval_order=None) -> str:
        """Write the instances a deletion removes (``{instance id: (SOP Instance UID, ...,
        size)}``, as :class:`storage.deletion.DeletionPlan` holds them) durably as a new entry;
        return its name. ``retrieval_order``: the archive's
        :meth:`storage.archive.Archive.retrieval_order`, so that coded stacks are rebuilt in
        their slabs' order, decoded ahead on the decoder processes.

        Raises
        ------
        RecycleBinError
            Not enough free space for the copies, or one could not be rebuilt or written;
            nothing is left behind.
        """
        writer = self.begin(index, {i: v[-1] for i, v in instances.items()}, level, uid,
                            reason)
        try:
            by_uid = {sop_uid: inst_id for inst_id, (sop_uid, *_) in instances.items()}
            with (retrieval_order(list(by_uid), "recycle bin") if retrieval_order else
                  nullcontext((list(by_uid), None))) as (ordered, _):
                for sop_uid in ordered:
                    writer.add(by_uid[sop_uid], retrieve(sop_uid))
            return writer.seal()
        except (OSError, StorageError) as exc:
            writer.abandon()
            raise RecycleBinError(f"could not keep the deleted instances restorable: {exc}") \
                from exc

    def begin(self, index: Index, sizes: dict[int, int], level: str, uid: str, reason: str,
              kind: str = "deleted", holds=()) -> EntryWriter:
        """A new entry for the instances ``sizes`` names (``{instance id: bytes}``), to be
        written one by one with :meth:`EntryWriter.add`; RecycleBinError when the disk has no
        room for them beside its spare share."""
        need = sum(sizes.values())
        self.root.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(self.root)
        if need + max(SPARE_BYTES, SPARE_SHARE * usage.total) > usage.free:
            raise RecycleBinError(
                f"no room to keep the {len(sizes)} instances in the recycle bin "
                f"({need / 1e6:.1f} MB needed, {usage.free / 1e6:.1f} MB free)"
                + ("; delete for good with --no-keep, or set deleted_keep_days = 0"
                   if kind == "deleted" else ""))
        now = time.time()      # names sort as the entries came, to the microsecond
        name = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + \
            f".{int(now % 1 * 1e6):06d}Z-{uuid.uuid4().hex[:6]}"
        meta = {"level": level, "uid": uid, "reason": reason, "kind": kind,
                "holds": [list(h) for h in holds]}
        return EntryWriter(self, name, _facts(index, list(sizes)), meta)

    def discard(self, name: str) -> None:
        """Remove an entry (whose deletion did not take place, or that was restored)."""
        shutil.rmtree(self.root / name, ignore_errors=True)
        self._changed()

    def entries(self, newest: int | None = None) -> list[Entry]:
        """Every complete entry (or the ``newest`` few), oldest first."""
        names = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
        found = []
        for name in reversed(names):          # names start with the time of the deletion
            if newest is not None and len(found) >= newest:
                break
            entry = self.entry(name)
            if entry is not None:
                found.append(entry)
        return found[::-1]

    def summaries(self, newest: int | None = None) -> list[dict]:
        """:meth:`Entry.summary` of each entry (oldest first), with ``held``: the holds in
        force it is kept for (such an entry does not expire while they last)."""
        states = self.hold_states()
        out = []
        for entry in self.entries(newest):
            row = entry.summary()
            row["held"] = [list(h) for h in self.held(entry, states)]
            since = self._kept_since(entry, states)
            row["expires_at"] = None if since is None or self.keep_days <= 0 else \
                since + self.keep_days * 86400
            out.append(row)
        return out

    def entry(self, name: str) -> Entry | None:
        """The entry ``name``, or None when there is none (or it is incomplete)."""
        if not name or "/" in name or name.startswith("."):
            return None
        try:
            meta = json.loads((self.root / name / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return Entry(name, meta["deleted_at"], meta["level"], meta["uid"], meta["reason"],
                     meta["instances"], meta.get("kind", "deleted"),
                     [tuple(h) for h in meta.get("holds", ())])

    def held(self, entry: Entry, states: dict | None = None) -> list[tuple[str, str]]:
        """Those of the entry's holds that are in force (``states``: :attr:`hold_states`,
        when the caller has them already)."""
        if not entry.holds:
            return []
        states = self.hold_states() if states is None else states
        return [h for h in entry.holds if tuple(h) in states and states[tuple(h)] is None]

    def _kept_since(self, entry: Entry, states: dict) -> float | None:
        """When the entry's keep_days start: its deletion, or the release of the last of its
        holds (an accidental release leaves the originals their days); None while held."""
        if self.held(entry, states):
            return None
        return max([entry.deleted_at] + [states.get(tuple(h)) or 0.0 for h in entry.holds])

    def bytes_held(self, max_age_s: float = 60.0) -> int:
        """Bytes of every file in the bin (complete entries or not), counted at most
        ``max_age_s`` ago (a bin of many entries is many files; /metrics asks often); this
        process's own changes count at once."""
        held = self._held
        if held is not None and time.monotonic() - held[0] < max_age_s:
            return held[1]
        total = sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file()) \
            if self.root.is_dir() else 0
        self._held = (time.monotonic(), total)
        return total

    def _changed(self) -> None:
        self._held = None

    def restore(self, name: str, store) -> dict:
        """Ingest the entry's instances again with ``store(dataset, transfer_syntax, sop_uid,
        source_ae)`` (:meth:`storage.archive.Archive.store`); remove the entry when every one
        is back (or was stored again meanwhile). Returns counts: ``restored``, ``present``
        (already in the archive), ``failed``, and ``studies``: {Study Instance UID: [Patient ID,
        instances restored]}.

        Raises
        ------
        RecycleBinError
            No such entry; NotRestorable for an entry of originals.
        """
        entry = self.entry(name)
        if entry is None:
            raise RecycleBinError(f"no entry {name!r} in the recycle bin")
        if entry.kind == "original":
            raise NotRestorable(
                f"entry {name} holds the originals of instances a correction changed while "
                f"on hold; the archive still holds them, corrected, so nothing is restored: "
                f"its files are plain DICOM, in {self.root / name}")
        counts = {"entry": name, "restored": 0, "present": 0, "failed": 0, "studies": {}}
        for item in entry.instances:
            outcome = self._restore_one(entry, item, store)
            counts[outcome] += 1
            if outcome == "restored":
                study = counts["studies"].setdefault(item.get("study_uid", ""),
                                                     [item.get("patient_id", ""), 0])
                study[1] += 1
        if not counts["failed"]:
            self.discard(name)
        log.warning("recycle bin: entry %s (%s %s): %d instances restored, %d already present, "
                    "%d failed%s", name, entry.level, entry.uid, counts["restored"],
                    counts["present"], counts["failed"],
                    "; the entry stays" if counts["failed"] else "; the entry is removed")
        return counts

    def _restore_one(self, entry: Entry, item: dict, store) -> str:
        path = self.root / entry.name / item["file"]
        try:
            syntax, dataset = split_file(path.read_bytes())
            if hashlib.sha256(dataset).hexdigest() != item["sha256"]:
                raise RecycleBinError("its bytes changed in the bin (SHA-256)")
            result = store(dataset, syntax, item["sop_uid"], item.get("source_ae", ""))
        except (OSError, ValueError, StorageError) as exc:
            log.error("recycle bin: %s of entry %s not restored: %s", item["sop_uid"],
                      entry.name, exc)
            return "failed"
        return "present" if result.outcome == "duplicate_ignored" else "restored"

    def mirror(self, dest: Path) -> dict:
        """Make the folder ``dest`` (a backup's bin) hold this bin's complete entries: an
        entry it lacks is copied, each file checked against the SHA-256 its manifest records
        and written durably, the manifest last; one it has is kept (an entry never changes
        once complete); one this bin no longer has is removed. Returns the counts
        ``copied``, ``kept``, ``removed`` and ``bytes`` (copied).

        Raises
        ------
        RecycleBinError
            A file that does not match its SHA-256.
        """
        dest = Path(dest)
        counts = {"copied": 0, "kept": 0, "removed": 0, "bytes": 0}
        names = set()
        for entry in self.entries():
            if (dest / entry.name / MANIFEST).is_file():
                counts["kept"] += 1
            else:
                try:
                    counts["bytes"] += _copy_entry(self.root / entry.name, dest / entry.name,
                                                   entry)
                except FileNotFoundError:           # restored or purged meanwhile
                    shutil.rmtree(dest / entry.name, ignore_errors=True)
                    continue
                counts["copied"] += 1
            names.add(entry.name)
        for folder in sorted(dest.iterdir()) if dest.is_dir() else ():
            if folder.name not in names:
                shutil.rmtree(folder, ignore_errors=True)
                counts["removed"] += 1
        return counts

    def check(self, pace=None) -> tuple[int, int, dict[str, str]]:
        """Hash every file of every complete entry against the SHA-256 its manifest records
        (entries restored or purged meanwhile are skipped); ``pace(nbytes)`` after each file,
        as :func:`storage.scrub.check_stored_files` takes it. Returns (files checked, bytes
        read, {"ENTRY/FILE": why it is bad})."""
        files, nbytes, bad = 0, 0, {}
        for entry in self.entries():
            for item in entry.instances:
                path = self.root / entry.name / item["file"]
                try:
                    data = path.read_bytes()
                    reason = "" if _dataset_digest(data) == item["sha256"] else \
                        "its bytes differ from the SHA-256 its manifest records"
                except FileNotFoundError:
                    if not (self.root / entry.name).is_dir():
                        break                       # the entry went meanwhile
                    data, reason = b"", "file missing"
                except ValueError as exc:
                    reason = f"not a DICOM file ({exc})"
                files, nbytes = files + 1, nbytes + len(data)
                if reason:
                    bad[f"{entry.name}/{item['file']}"] = reason
                    log.error("recycle bin: %s of entry %s is damaged: %s", item["file"],
                              entry.name, reason)
                if pace:
                    pace(len(data))
        return files, nbytes, bad

    def purge(self, everything: bool = False, now: float | None = None) -> list[str]:
        """Remove expired entries (all with ``everything``) and interrupted ones, but none
        kept for a hold in force (one whose holds were released expires ``keep_days`` after
        the last release); return the names removed."""
        now = time.time() if now is None else now
        gone, states = [], None
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            entry = self.entry(folder.name)
            if entry is None:
                expired = now - folder.stat().st_mtime > INTERRUPTED_S
            elif not entry.holds:
                expired = everything or now - entry.deleted_at > self.keep_days * 86400
            else:
                states = self.hold_states() if states is None else states
                since = self._kept_since(entry, states)
                expired = since is not None and (everything or
                                                 now - since > self.keep_days * 86400)
            if expired:
                shutil.rmtree(folder, ignore_errors=True)
                gone.append(folder.name)
        if gone:
            self._changed()
            log.warning("recycle bin: %d entries removed for good (%s)", len(gone),
                        "emptied" if everything else f"older than {self.keep_days:g} days")
        return gone

    def purge_if_due(self) -> list[str]:
        """:meth:`purge` at most every PURGE_EVERY_S, and :meth:`make_room` (the running node
        calls it each pass)."""
        gone = self.make_room()
        with self._lock:
            if time.monotonic() - self._last_purge < PURGE_EVERY_S and self._last_purge:
                return gone
            self._last_purge = time.monotonic()
        return gone + self.purge()

    def make_room(self) -> list[str]:
        """When less than LOW_SHARE of the disk is free, remove the oldest entries, before
        they expire, until SPARE_SHARE is free or the bin is empty (entries kept for a hold in
        force stay); return their names."""
        if not self.root.is_dir():
            return []
        usage = shutil.disk_usage(self.root)
        if usage.free >= LOW_SHARE * usage.total:
            return []
        gone, states = [], self.hold_states()
        for folder in sorted(self.root.iterdir()):
            if shutil.disk_usage(self.root).free >= SPARE_SHARE * usage.total:
                break
            entry = self.entry(folder.name)
            if entry is not None and self.held(entry, states):
                continue                    # evidence: never removed while its hold lasts
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder.name)
        if gone:
            self._changed()
            log.warning("recycle bin: the disk is nearly full (%.1f%% free); %d oldest entries "
                        "removed for good before they expired: %s",
                        100 * usage.free / usage.total, len(gone), ", ".join(gone))
        return gone


class EntryWriter:
    """A recycle bin entry being written (:meth:`RecycleBin.begin`): each instance's file
    durably, then the manifest that makes it an entry (:meth:`seal`)."""

    def __init__(self, bin_: RecycleBin, name: str, facts: dict[int, dict], meta: dict):
        self.bin, self.name, self.facts, self.meta = bin_, name, facts, meta
        self.folder = bin_.root / name
        self.kept: list[dict] = []

    def covers(self, inst_id: int) -> bool:
        """Whether the instance row ``inst_id`` is one this entry keeps."""
        return inst_id in self.facts

    def add(self, inst_id: int, inst) -> None:
        """Write the rebuilt instance ``inst`` (retrieved, so checked against its SHA-256)
        of the instance row ``inst_id``."""
        path = self.folder / f"{safe_name(inst.sop_uid)}.dcm"
        write_file(path, inst.sop_class_uid, inst.sop_uid, inst.transfer_syntax, (inst.data,))
        fsync_path(path)
        self.kept.append({"sop_uid": inst.sop_uid, "file": path.name, "bytes": len(inst.data),
                          **_row(self.facts, inst_id)})

    def seal(self) -> str:
        """Write the manifest: the entry is complete; return its name."""
        _write_manifest(self.folder, {"deleted_at": time.time(), **self.meta,
                                      "instances": self.kept})
        self.bin._changed()
        log.info("recycle bin: %d instances (%.1f MB) of %s %s kept as %s%s", len(self.kept),
                 sum(i["bytes"] for i in self.kept) / 1e6, self.meta["level"],
                 self.meta["uid"], self.name,
                 "" if self.meta["kind"] == "deleted" else
                 ", their originals before a correction, while on hold")
        return self.name

    def abandon(self) -> None:
        """Remove what was written (the deletion or correction did not take place)."""
        self.bin.discard(self.name)


def _facts(index: Index, ids: list[int]) -> dict[int, dict]:
    """SHA-256 recorded at ingest, sender, study and patient of instances, by instance id."""
    found = {}
    with index.read() as s:
        for chunk in range(0, len(ids), 500):
            rows = s.execute(
                select(Instance.id, Instance.sha256, Instance.source_ae, Study.study_uid,
                       Patient.patient_id, Series.series_uid)
                .join(Series, Instance.series_fk == Series.id)
                .join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id)
                .where(Instance.id.in_(ids[chunk:chunk + 500])))
            for inst_id, digest, ae, study, patient, series in rows:
                found[inst_id] = {"sha256": digest, "source_ae": ae or "", "study_uid": study,
                                  "series_uid": series, "patient_id": patient}
    return found


def _row(rows: dict[int, dict], inst_id: int) -> dict:
    """The facts of instance ``inst_id``; RecycleBinError when it went meanwhile."""
    if inst_id not in rows:
        raise RecycleBinError(f"instance row {inst_id} went while the deletion was planned")
    return rows[inst_id]


def _dataset_digest(data: bytes) -> str:
    """SHA-256 of the dataset in a bin file (a Part 10 file), as its manifest records it;
    ValueError when the file is not one."""
    return hashlib.sha256(split_file(data)[1]).hexdigest()


def _copy_entry(source: Path, dest: Path, entry: Entry) -> int:
    """Copy the entry in ``source`` to ``dest``, checked, durably, manifest last; bytes."""
    shutil.rmtree(dest, ignore_errors=True)          # what an interrupted copy left
    dest.mkdir(parents=True)
    copied = 0
    for item in entry.instances:
        data = (source / item["file"]).read_bytes()
        if _dataset_digest(data) != item["sha256"]:
            raise RecycleBinError(f"file {item['file']} of recycle bin entry {entry.name} "
                                  "does not match its SHA-256")
        (dest / item["file"]).write_bytes(data)
        fsync_path(dest / item["file"])
        copied += len(data)
    _write_manifest(dest, json.loads((source / MANIFEST).read_text()))
    return copied


def _write_manifest(folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    fsync_path(tmp)
    os.replace(tmp, folder / MANIFEST)
    fsync_path(folder)
    fsync_path(folder.parent)        # the entry's own name in the bin

