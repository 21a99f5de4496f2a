"""Finding DCMTK's command-line tools (storescu, getscu, ...) on PATH.

pynetdicom installs Python entry points with the same names into the virtual environment, which
come first on PATH once it is activated; those take other options, so we skip scripts and take
the first real executable.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache


@lru_cache(maxsize=None)
def dcmtk(name: str) -> str | None:
    """Path of DCMTK's ``name`` tool, or None when DCMTK is not installed."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = shutil.which(name, path=folder)
        if path and not _is_script(path):
            return path
    return None


def _is_script(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"#!"
