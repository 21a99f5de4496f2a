"""A background worker's last outcome, kept as a small JSON file beside the index
(``scrub.json`` of the integrity patrol, ``retention.json`` of the retention rules)."""

from __future__ import annotations

import json
import os


def read(archive, name: str) -> dict | None:
    """The state saved as ``name`` in the archive's data folder, or None (none yet, or
    unreadable)."""
    try:
        return json.loads((archive.data_dir / name).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write(archive, name: str, state: dict) -> None:
    """Replace the state saved as ``name`` at once (a reader never sees half of it)."""
    path = archive.data_dir / name
    tmp = path.with_name(name + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)
