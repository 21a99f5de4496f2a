"""Model registry: shipped weights found by name (``load_model("default")``) or by model id."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.container import CorruptBlobError
from models.predictor import DefaultPredictor, model_id

WEIGHTS_DIR = Path(__file__).parent / "weights"
# Retired weights stay here, named by model id, so blobs written with them still decode.
ARCHIVE_DIR = WEIGHTS_DIR / "archive"
_KINDS = {"default": DefaultPredictor}


def register_kind(kind: str, cls) -> None:
    """Make a predictor class loadable from model files whose ``kind`` is ``kind``."""
    _KINDS[kind] = cls


def known_models() -> list[str]:
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.npz"))


def save_model(predictor, path: Path, meta: dict | None = None) -> bytes:
    """Write a predictor's arrays (and JSON metadata) to ``path``; returns its model id."""
    arrays = predictor.to_arrays()
    np.savez(path, **arrays, meta=np.array(json.dumps(meta or {})))
    return model_id(arrays)


def _read(path: Path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays.pop("meta", np.array("{}"))))
    kind = str(arrays["kind"])
    if kind not in _KINDS:
        _import_kind_modules()
    predictor = _KINDS[kind].from_arrays(path.stem, arrays, meta)
    predictor.model_id = model_id(arrays)
    return predictor


def _import_kind_modules() -> None:
    try:  # the paper's models register themselves when imported
        import models.paper  # noqa: F401
    except ImportError:
        pass


@lru_cache(maxsize=None)
def load_model(name: str = "default"):
    """The predictor named ``name``; unknown names fail with the list of known ones."""
    path = WEIGHTS_DIR / f"{name}.npz"
    if not path.exists():
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(known_models())}")
    return _read(path)


@lru_cache(maxsize=None)
def _archived(path: Path):
    return _read(path)


def model_by_id(mid: bytes, name_hint: str = ""):
    """The shipped predictor whose id is ``mid``: current models first (the blob's recorded
    name before the others), then retired ones in ``weights/archive``."""
    names = known_models()
    if name_hint in names:
        names.remove(name_hint)
        names.insert(0, name_hint)
    for name in names:
        predictor = load_model(name)
        if predictor.model_id == mid:
            return predictor
    retired = ARCHIVE_DIR / f"{mid.hex()}.npz"
    if retired.exists():
        return _archived(retired)
    raise CorruptBlobError(
        f"blob needs model {mid.hex()} ({name_hint or 'unnamed'}), which this release lacks")
