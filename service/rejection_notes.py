"""Applying an IOCM rejection note that was just stored, over DIMSE or STOW-RS, when its sender
may reject (``rejection_notes_from``: AE titles, ``@NAME`` for a web user of ``http_users``,
``*`` for any AE title, ``@*`` for anyone who may write on the web side).

The note stays stored either way; a failure to apply it is logged, and the store itself has
succeeded (see :mod:`storage.rejection` for what applying it deletes).
"""

from __future__ import annotations

import logging

from storage import rejection
from storage.deletion import DeletionError

log = logging.getLogger(__name__)


def may_reject(reject_from: str, sender: str) -> bool:
    """Whether ``sender`` (an AE title, or ``@NAME`` for a web user, ``@`` for the shared
    token) is one ``reject_from`` lets apply rejection notes."""
    allowed = {t.strip() for t in reject_from.split(",") if t.strip()}
    web = sender.startswith("@")
    return sender in allowed or ("@*" if web else "*") in allowed


def apply_stored_note(archive, result, data: bytes, transfer_syntax: str, sender: str,
                      actor: str, where: str, reject_from: str) -> dict | None:
    """Apply the instance just stored (``result``, an :class:`storage.ingest.IngestResult`, of
    the dataset ``data``) if it is a new Key Object Selection that is a rejection note
    ``sender`` may send; return what was deleted (see
    :meth:`storage.archive.Archive.apply_rejection`), or None when nothing was applied.
    ``actor`` is noted in the trails, ``where`` in the log."""
    if result.sop_class_uid != rejection.KEY_OBJECT_SELECTION or \
            result.outcome == "duplicate_ignored":
        return None
    try:
        note = rejection.read_note(data, transfer_syntax)
    except Exception as exc:
        log.warning("Key Object Selection from %s not read as a rejection note: %s", where, exc)
        return None
    if note is None:
        return None
    if not may_reject(reject_from, sender):
        log.warning("rejection note %s (%s) from %s stored, not applied: %s is not in "
                    "rejection_notes_from", note.sop_uid, note.title, where, sender or "@")
        return None
    try:
        done = archive.apply_rejection(note, actor)
    except DeletionError as exc:        # on legal hold, say; the note itself stays stored
        log.warning("rejection note %s from %s stored, not applied: %s", note.sop_uid, where,
                    exc)
        return None
    except Exception:
        log.exception("rejection note %s from %s not applied", note.sop_uid, where)
        return None
    log.warning("rejection note %s (%s) from %s: %d instances deleted, %d references passed "
                "over%s", note.sop_uid, note.title, where, done["instances"],
                len(done["passed_over"]),
                f"; sent on to {', '.join(done['sent_to'])}" if done["sent_to"] else "")
    for study, count in done["studies"].items():
        archive.accesses.note(actor, "delete instances", study, note.patient_id, count,
                              detail=note.title, keep=False)
    return done
