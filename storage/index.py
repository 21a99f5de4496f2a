"""The SQLAlchemy index: patients, studies, series, instances, blobs, compaction jobs, forwarding
state, the files and audit trail of deletions, and legal holds.

The same models run on SQLite (the default, one file in the data folder) and PostgreSQL. The index
never reads blobs: it records keys, sizes and hashes so that what the blob store returns can be
trusted.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

from sqlalchemy import (
    BigInteger, Float, ForeignKey, Integer, LargeBinary, String, UniqueConstraint, create_engine,
    event, inspect, make_url, text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import GenericFunction
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from storage.errors import CommitOutcomeUnknown

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    """Declarative base of the index tables."""


#: the default of a text column added to an existing index (storage.index_upgrade fills it)
_EMPTY = text("''")


class Patient(Base):
    __tablename__ = "patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String, unique=True)
    patient_name: Mapped[str] = mapped_column(String, default="")
    birth_date: Mapped[str] = mapped_column(String, default="")
    sex: Mapped[str] = mapped_column(String, default="")


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String, unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patients.id"), index=True)
    study_date: Mapped[str] = mapped_column(String, default="")
    study_time: Mapped[str] = mapped_column(String, default="")
    accession_number: Mapped[str] = mapped_column(String, default="")
    study_description: Mapped[str] = mapped_column(String, default="")
    study_id: Mapped[str] = mapped_column(String, default="")
    referring_physician: Mapped[str] = mapped_column(String, default="")
    patient_age: Mapped[str] = mapped_column(String, default="", server_default=_EMPTY)
    patient: Mapped[Patient] = relationship()


class Series(Base):
    __tablename__ = "series"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String, unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String, default="")
    series_number: Mapped[str] = mapped_column(String, default="")
    series_description: Mapped[str] = mapped_column(String, default="")
    series_date: Mapped[str] = mapped_column(String, default="")
    series_time: Mapped[str] = mapped_column(String, default="", server_default=_EMPTY)
    body_part: Mapped[str] = mapped_column(String, default="", server_default=_EMPTY)
    protocol_name: Mapped[str] = mapped_column(String, default="", server_default=_EMPTY)
    last_received: Mapped[float] = mapped_column(Float, default=0.0)
    study: Mapped[Study] = relationship()


class Blob(Base):
    """One stored blob: a coded stack of pixels or one instance under a general codec."""

    __tablename__ = "blobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String, unique=True)
    codec: Mapped[str] = mapped_column(String)  # "volume+headers", "volume", "zlib" or "raw"
    codec_info: Mapped[str] = mapped_column(String, default="")
    dtype: Mapped[str] = mapped_column(String, default="")
    shape: Mapped[str] = mapped_column(String, default="")
    slab: Mapped[int] = mapped_column(Integer, default=0)   # slices per decodable slab
    # time points coded position-major (storage.frame_order); 1: slices in instance order
    interleave: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    raw_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String)
    created_at: Mapped[float] = mapped_column(Float)


class Instance(Base):
    """One received instance; either staged (``staged_key``) or compacted (``blob_fk``)."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String, unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String)
    transfer_syntax: Mapped[str] = mapped_column(String)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String)
    received_at: Mapped[float] = mapped_column(Float)
    # the calling AE title of the C-STORE that brought it ("" from import or STOW-RS)
    source_ae: Mapped[str] = mapped_column(String, default="", server_default=_EMPTY)
    # Pixel layout found at ingest (pixel_length 0: not stackable)
    pixel_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    pixel_length: Mapped[int] = mapped_column(BigInteger, default=0)
    stack_format: Mapped[str] = mapped_column(String, default="")
    frames: Mapped[int] = mapped_column(Integer, default=1)
    position: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Where the bytes are now
    staged_key: Mapped[str | None] = mapped_column(String, nullable=True, index=True)
    blob_fk: Mapped[int | None] = mapped_column(ForeignKey("blobs.id"), nullable=True, index=True)
    frame_start: Mapped[int] = mapped_column(Integer, default=0)
    header_before: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    header_after: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    series: Mapped[Series] = relationship()
    blob: Mapped[Blob | None] = relationship()


class Job(Base):
    """A compaction job of one series: pending, running, done or failed (with its reason)."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    kind: Mapped[str] = mapped_column(String, default="compact")
    state: Mapped[str] = mapped_column(String, default="pending")
    reason: Mapped[str] = mapped_column(String, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


class Forward(Base):
    """Where forwarding a series to a destination stands (:mod:`storage.forwarding`): its
    instances received up to ``sent_until`` have gone (or did not match), a failed attempt is
    retried from ``next_attempt``; ``by_hand``: the attempt was a send asked for by hand, which
    a retry sends whole."""

    __tablename__ = "forwards"
    __table_args__ = (UniqueConstraint("series_fk", "destination"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    destination: Mapped[str] = mapped_column(String)
    state: Mapped[str] = mapped_column(String, default="done")
    sent_until: Mapped[float] = mapped_column(Float, default=0.0)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[float] = mapped_column(Float, default=0.0)
    reason: Mapped[str] = mapped_column(String, default="")
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)
    by_hand: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ForwardRule(Base):
    """A forwarding rule and when it took effect: only instances received since then go by it
    (enabling a rule does not send the archive's past)."""

    __tablename__ = "forward_rules"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String, unique=True)
    rule: Mapped[str] = mapped_column(String, default="")
    since: Mapped[float] = mapped_column(Float, default=0.0)


class Removal(Base):
    """A file to remove once the transaction that stopped referring to it has committed (a
    deletion, a compaction; :mod:`storage.removals`); recovery finishes what a crash
    interrupted before it looks for orphans, so that such a staged file is never indexed
    again."""

    __tablename__ = "removals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String, unique=True)
    created_at: Mapped[float] = mapped_column(Float)


class Deletion(Base):
    """The audit trail of deletions: what was asked for and what it removed (UIDs and counts,
    no patient names)."""

    __tablename__ = "deletions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deleted_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String)       # patient, study, series or instance
    uid: Mapped[str] = mapped_column(String)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    series: Mapped[int] = mapped_column(Integer, default=0)
    studies: Mapped[int] = mapped_column(Integer, default=0)
    patients: Mapped[int] = mapped_column(Integer, default=0)
    restaged: Mapped[int] = mapped_column(Integer, default=0)
    freed_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    reason: Mapped[str] = mapped_column(String, default="")


_SQLITE_ENGINE = {"connect_args": {"check_same_thread": False, "timeout": 30}}


class lower_text(GenericFunction):
    """``lower()`` of text for every letter: SQLite's own lowers ASCII letters only, so on
    SQLite it is Python's ``str.lower`` (registered on each connection), elsewhere the
    database's ``lower``, which is Unicode-aware (PostgreSQL)."""

    type = String()
    inherit_cache = True


@compiles(lower_text, "sqlite")
def _lower_text_sqlite(element, compiler, **kw):
    return f"voxarc_lower({compiler.process(element.clauses, **kw)})"


@compiles(lower_text)
def _lower_text(element, compiler, **kw):
    return f"lower({compiler.process(element.clauses, **kw)})"


def _lower(value):
    return value.lower() if isinstance(value, str) else value


def _sqlite_pragmas(dbapi_conn, _record, synchronous: str = "FULL") -> None:
    dbapi_conn.create_function("voxarc_lower", 1, _lower, deterministic=True)
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_relaxed_pragmas(dbapi_conn, record) -> None:
    # WAL + NORMAL: a commit is not flushed, but a crash of the process cannot lose it, and the
    # next FULL commit or checkpoint flushes it (the WAL is one file, written in order)
    _sqlite_pragmas(dbapi_conn, record, "NORMAL")


def add_missing_columns(engine) -> list[str]:
    """Add to existing tables the columns that later versions gave them (each has a server
    default, which the rows already there take, or may be empty); return ``table.column`` of
    each added.
    ``create_all`` makes missing tables only, so an index written by an earlier version would
    otherwise fail on its first query."""
    found = inspect(engine)
    added = []
    for table in Base.metadata.sorted_tables:
        if not found.has_table(table.name):
            continue
        have = {c["name"] for c in found.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if column.server_default is None and not column.nullable:
                raise RuntimeError(f"index table {table.name} lacks column {column.name}, "
                                   "which has no default to add it with")
            kind = column.type.compile(dialect=engine.dialect)
            fill = "" if column.server_default is None else \
                f" NOT NULL DEFAULT {column.server_default.arg}"
            try:
                with engine.begin() as conn:
                    conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} "
                                      f"{kind}{fill}"))
            except SQLAlchemyError:
                # another process starting on the same index (a `voxarc compress --now` beside
                # `serve`) may have added it in between
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise
                continue
            added.append(f"{table.name}.{column.name}")
            log.warning("index upgraded: column %s.%s added", table.name, column.name)
    return added


class Correction(Base):
    """The audit trail of corrections (:mod:`storage.correction`): which patient, study or series,
    what changed from what to what, why."""

    __tablename__ = "corrections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    corrected_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String)       # patient, study or series
    uid: Mapped[str] = mapped_column(String)
    studies: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    changes: Mapped[str] = mapped_column(String, default="")
    reason: Mapped[str] = mapped_column(String, default="")


class Hold(Base):
    """A legal hold on a patient or a study (:mod:`storage.holds`): nothing of it may be
    deleted while ``released_at`` is empty; released holds stay as their trail."""

    __tablename__ = "holds"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    level: Mapped[str] = mapped_column(String)       # patient or study
    uid: Mapped[str] = mapped_column(String, index=True)
    reason: Mapped[str] = mapped_column(String)
    held_by: Mapped[str] = mapped_column(String)
    held_at: Mapped[float] = mapped_column(Float)
    released_by: Mapped[str | None] = mapped_column(String, nullable=True)
    released_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # a study's hold placed with its patient's: that Patient ID (the study stays held when a
    # correction or a merge files it under another)
    through: Mapped[str | None] = mapped_column(String, nullable=True)


class ReconciledPatient(Base):
    """A Patient ID the hospital information system has told the archive of (HL7 ADT updates
    and merges, :mod:`storage.reconciled`): its demographics as the HIS last gave them, and the
    patient it was merged into, if it was."""

    __tablename__ = "reconciled_patients"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String, unique=True)
    merged_into: Mapped[str | None] = mapped_column(String, nullable=True)
    patient_values: Mapped[str] = mapped_column(String, default="{}")    # JSON, DICOM keywords
    updated_at: Mapped[float] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String, default="")


class Access(Base):
    """The access trail: who read which study, how, when (:mod:`storage.access_log`). One row
    per actor, action, study and detail, repeated reads within a minute added to it."""

    __tablename__ = "accesses"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_at: Mapped[float] = mapped_column(Float, index=True)
    last_at: Mapped[float] = mapped_column(Float)
    actor: Mapped[str] = mapped_column(String)       # AE@host, "http HOST", "cli export USER"
    action: Mapped[str] = mapped_column(String)      # C-GET, C-MOVE to X, WADO-RS, download...
    study_uid: Mapped[str] = mapped_column(String, default="", index=True)
    patient_id: Mapped[str] = mapped_column(String, default="", index=True)
    requests: Mapped[int] = mapped_column(Integer, default=1)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str] = mapped_column(String, default="")


class Index:
    """The database of the archive: an engine, a session factory and one write lock.

    SQLite has a single writer, so every writing transaction goes through :meth:`write`, which
    serialises writers within the process.

    Parameters
    ----------
    url : str
        SQLAlchemy database URL (``sqlite:///path`` or ``postgresql+psycopg://...``).
    """

    def __init__(self, url: str):
        self.url = url
        kwargs = _SQLITE_ENGINE if url.startswith("sqlite") else {"pool_pre_ping": True}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)
        #: ``table.column`` of each column this opening added to an older index
        self.added_columns = add_missing_columns(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_lock = threading.RLock()
        self._relaxed_engine = None

    @contextmanager
    def read(self):
        """Yield a session for reading (rolled back on exit)."""
        with self.sessions() as session:
            yield session

    @contextmanager
    def write(self):
        """Yield a session whose transaction commits on normal exit, rolls back on error."""
        with self._write_lock, self.sessions() as session, session.begin():
            yield session

    def write_checked(self, body, took_place):
        """``body(session)`` in a :meth:`write` transaction; return its result. A commit can
        raise and still have taken place (a server connection lost with the commit's answer):
        then ``took_place(session)`` decides on a fresh read, and the result is returned when
        it did.

        Raises
        ------
        What ``body`` raised (nothing committed); the commit's error when it did not take
        place; CommitOutcomeUnknown when the index cannot be read to tell.
        """
        written = False
        try:
            with self.write() as s:
                result = body(s)
                written = True          # what fails from here on is the commit itself
        except BaseException as exc:
            if not written:
                raise
            try:
                with self.read() as s:
                    took = took_place(s)
            except SQLAlchemyError as again:
                raise CommitOutcomeUnknown(f"a commit failed ({exc}) and the index cannot be "
                                           f"read to tell whether it took place ({again})") from exc
            if not took:
                raise
            log.warning("a commit reported an error but took place: %s", exc)
        return result

    @contextmanager
    def connect(self, durable: bool = True):
        """Yield a Core connection whose transaction commits on normal exit, rolls back on
        error; serialised with :meth:`write` (hot paths: no ORM session to build).

        ``durable=False``: on SQLite the commit does not wait for the database's flush to disk
        (``synchronous=NORMAL``): a crash of the process cannot lose it, a power loss can, and
        the next start indexes the lost rows again from their files; only for rows that can be
        rebuilt so (staged instances, see :mod:`storage.staged_keys`). PostgreSQL commits are
        always durable: its server can crash (and restart) under a node that goes on running,
        whose recovery only runs when it starts, so an acknowledged instance would be missing
        until then."""
        engine = self.engine if durable else self._relaxed()
        with self._write_lock, engine.begin() as conn:
            yield conn

    def _relaxed(self):
        """The engine for ``durable=False`` commits (SQLite: a second one on the same file)."""
        url = make_url(self.url)
        if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return self.engine
        if self._relaxed_engine is None:
            engine = create_engine(self.url, **_SQLITE_ENGINE)
            event.listen(engine, "connect", _sqlite_relaxed_pragmas)
            self._relaxed_engine = engine
        return self._relaxed_engine

    def drop_all(self) -> None:
        """Remove every index table (tests use this to start a PostgreSQL database clean)."""
        Base.metadata.drop_all(self.engine)
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()
        if self._relaxed_engine is not None:
            self._relaxed_engine.dispose()
