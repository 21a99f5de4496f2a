"""Filling the query attributes a newer version indexes into the rows an older one wrote.

When an opening of the index adds columns for attributes (``Index.added_columns``), the rows
already there hold them empty. This reads one stored instance's header per series (its staged
file, or the header bytes kept beside a compressed stack: no pixels are decoded), takes the
new attributes of its series, study and patient from it as ingest would
(:func:`storage.instance_facts.describe`), and writes them. An instance whose header cannot be
read leaves its rows empty, logged; nothing else is changed.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import func, select, update

from storage.dataset_parts import header_elements
from storage.errors import StorageError
from storage.index import Index, Instance, Patient, Series, Study
from storage.instance_facts import PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS, describe

log = logging.getLogger(__name__)
PROGRESS_EVERY = 1000     # series between progress lines of a long fill

# table -> (model, the facts' part, the attribute columns ingest fills)
_TABLES = {"patients": (Patient, "patient", PATIENT_KEYS), "studies": (Study, "study", STUDY_KEYS),
           "series": (Series, "series", SERIES_KEYS)}


def fill_added_attributes(index: Index, reconstructor, added: list[str]) -> int:
    """Fill the attribute columns in ``added`` (``table.column``) from the stored headers;
    return how many series were read."""
    wanted = {table: [c for t, c in (a.split(".", 1) for a in added) if t == table
                      and c in _TABLES[table][2]] for table in _TABLES}
    if not any(wanted.values()):
        return 0
    with index.read() as s:
        firsts = s.execute(select(Series.id, Series.study_fk, Study.patient_fk,
                                  func.min(Instance.sop_uid))
                           .join(Study, Series.study_fk == Study.id)
                           .join(Instance, Instance.series_fk == Series.id)
                           .group_by(Series.id, Series.study_fk, Study.patient_fk)).all()
    log.info("index upgrade: filling %s from one header of each of %d series",
             ", ".join(added), len(firsts))
    read, start = 0, time.monotonic()
    for n, (series_id, study_id, patient_id, sop_uid) in enumerate(firsts, 1):
        if n % PROGRESS_EVERY == 0:
            log.info("index upgrade: %d of %d series", n, len(firsts))
        facts = _facts(reconstructor, sop_uid)
        if facts is None:
            continue
        read += 1
        with index.write() as s:
            for table, row_id in (("series", series_id), ("studies", study_id),
                                  ("patients", patient_id)):
                if wanted[table]:
                    model, part, _ = _TABLES[table]
                    values = getattr(facts, part)
                    s.execute(update(model).where(model.id == row_id)
                              .values({c: values[c] for c in wanted[table]}))
    log.info("index upgrade: %d of %d series filled in %.1f s", read, len(firsts),
             time.monotonic() - start)
    return read


def _facts(reconstructor, sop_uid: str):
    try:
        head = reconstructor.header(sop_uid)
        return describe(header_elements(head.data, head.transfer_syntax))
    except (StorageError, ValueError) as exc:
        log.warning("index upgrade: the header of %s cannot be read (%s); its series keeps "
                    "the new attributes empty", sop_uid, exc)
        return None
