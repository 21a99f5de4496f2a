"""Names of staged files that recovery can index again without their index row.

Ingest commits a staged instance's index row once the file is fsync'd, without waiting for the
database's own flush of that commit (:meth:`storage.index.Index.connect` with ``durable=False``):
a crash of the process loses nothing, but a power loss may take the last rows, never their
files. So a staged file's name says what recovery needs to index it again: its transfer syntax
(a code from :data:`SYNTAXES`), the start of its content's SHA-256, which tells a complete
file from one whose write never finished (and was never acknowledged), and when it was received
to the microsecond (keys written before 2026-12-01 evening carry 12 random digits instead): a
file's modification time ticks only every few milliseconds, too coarse to order two versions
of one instance received in a row.
"""

from __future__ import annotations

import os
import re
import secrets
import time

from storage.blobstore import new_key

# Append-only: a code is a position here and is written into file names.
SYNTAXES = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.94", "1.2.840.10008.1.2.4.95",
    "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.100.1", "1.2.840.10008.1.2.4.101",
    "1.2.840.10008.1.2.4.101.1", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.102.1",
    "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.103.1", "1.2.840.10008.1.2.4.104",
    "1.2.840.10008.1.2.4.104.1", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.105.1",
    "1.2.840.10008.1.2.4.106", "1.2.840.10008.1.2.4.106.1", "1.2.840.10008.1.2.4.107",
    "1.2.840.10008.1.2.4.108", "1.2.840.10008.1.2.4.110", "1.2.840.10008.1.2.4.111",
    "1.2.840.10008.1.2.4.112", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.204", "1.2.840.10008.1.2.4.205",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.7.1", "1.2.840.10008.1.2.7.2",
    "1.2.840.10008.1.2.7.3", "1.2.840.10008.1.2.8.1",
)
_CODES = {ts: i for i, ts in enumerate(SYNTAXES)}
DIGEST_CHARS = 40
_KEY = re.compile(r"^s([0-9a-f]{2})_([0-9a-f]{%d})_([0-9a-f]{12}|[0-9a-f]{16})$"
                  % DIGEST_CHARS)


def staged_key(transfer_syntax: str, digest: str) -> str | None:
    """A fresh staged-file key carrying ``transfer_syntax`` and the hex SHA-256 ``digest`` of
    the content, or None for a transfer syntax without a code (such a row needs a durable
    commit)."""
    code = _CODES.get(transfer_syntax)
    if code is None:
        return None
    stamp = time.time_ns() // 1000                 # microseconds: 13 hex digits until 2255
    return f"s{code:02x}_{digest[:DIGEST_CHARS]}_{stamp:013x}{secrets.randbits(12):03x}"


def staged_file_key(transfer_syntax: str, digest: str) -> str:
    """The key of a new staged file: :func:`staged_key` where the transfer syntax has a code,
    else a plain fresh key (recovery cannot index that file again by its name)."""
    return staged_key(transfer_syntax, digest) or new_key("s")


def recoverable(key: str) -> tuple[str, str] | None:
    """``(transfer syntax, SHA-256 prefix)`` named by a :func:`staged_key` key, else None."""
    match = _KEY.match(key)
    if match is None or int(match.group(1), 16) >= len(SYNTAXES):
        return None
    return SYNTAXES[int(match.group(1), 16)], match.group(2)


def received(key: str) -> float | None:
    """When the file of a :func:`staged_key` key was received (seconds since the epoch, to the
    microsecond); None for a key that does not say (an older one, or not a staged key)."""
    match = _KEY.match(key)
    if match is None or len(match.group(3)) != 16:
        return None
    return int(match.group(3)[:13], 16) / 1e6


def reception_time(key: str, path) -> float:
    """When the staged file ``key`` at ``path`` was received: as its name says, else (an older
    key) its modification time."""
    stamp = received(key)
    return os.stat(path).st_mtime if stamp is None else stamp
