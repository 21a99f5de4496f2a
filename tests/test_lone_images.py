"""Lone images: coded as one-slice volumes by compaction, and those an older release deflated
staged again and coded by `voxarc compress --recode` (storage.lone_images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from node_helpers import (BACKENDS, database_url, make_series, retrieves_exactly,
                          store_series, stored_codecs)

from storage import assembly, lone_images
from storage.archive import Archive

REPO = Path(__file__).resolve().parents[1]


def _smooth(ds, seed: int) -> None:
    """Pixels with a radiograph's smooth gradients and noise (which deflating codes poorly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:ds.Rows, :ds.Columns]
    pixels = 800 + 300 * np.sin(x / 9.0) * np.cos(y / 13.0) + rng.normal(0, 6, y.shape)
    ds.PixelData = pixels.astype(np.int16).tobytes()


def _old_archive(tmp_path, url="") -> tuple[Archive, dict, dict]:
    """An archive compacted as before 2026-12-05: lone images deflated. Holds a lone 64 x 64
    image, a series of two images of that format, and a lone 64 x 64 image of noise."""
    arch = Archive(tmp_path / "data", url)
    lone = make_series(1, 64, 64, seed=1)
    pair = make_series(2, 64, 64, seed=2)
    noise = make_series(1, 64, 64, seed=3)
    for ds in lone + pair:
        _smooth(ds, 4)
    noise[0].PixelData = np.random.default_rng(5).integers(
        -32768, 32767, (64, 64), dtype=np.int16).tobytes()
    sent = store_series(arch, lone + pair + noise)
    patch = pytest.MonkeyPatch()
    patch.setattr(assembly, "LONE_MIN_VOXELS", 1 << 40)        # the older release's choice
    try:
        assert arch.compact(stable_age=0) == (3, 0)
    finally:
        patch.undo()
    uids = {"lone": lone[0].SOPInstanceUID, "noise": noise[0].SOPInstanceUID,
            "pair": pair[0].SOPInstanceUID}
    return arch, sent, uids


@pytest.mark.parametrize("backend", BACKENDS)
def test_deflated_lone_images_are_staged_again_and_coded(backend, tmp_path):
    arch, sent, uids = _old_archive(tmp_path, database_url(backend, tmp_path))
    try:
        codecs = stored_codecs(arch)
        assert codecs[uids["lone"]] == "zlib" and codecs[uids["pair"]] == "volume+headers"
        before = arch.stats()["stored_bytes"]
        found = lone_images.candidates(arch.index)
        assert [c[1] for c in found] == [uids["lone"]]          # not the noise, nor the pair
        series = arch.restage_lone_images()
        assert len(series) == 1 and arch.stats()["pending_instances"] == 1
        assert retrieves_exactly(arch, sent)                    # staged, as received
        assert arch.compactor.compact_series(series[0])
        assert stored_codecs(arch)[uids["lone"]] == "volume+headers"
        assert arch.stats()["stored_bytes"] < before and retrieves_exactly(arch, sent)
        assert lone_images.candidates(arch.index) == [] and arch.restage_lone_images() == []
    finally:
        arch.close()


def test_compress_recode_codes_the_deflated_lone_images(tmp_path):
    arch, sent, uids = _old_archive(tmp_path)
    arch.close()
    run = subprocess.run([sys.executable, "-m", "service.cli", "compress", "--recode",
                          "--data-dir", tmp_path / "data"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "lone images of 1 series staged again and compacted (0 failed)" in run.stderr
    arch = Archive(tmp_path / "data")
    try:
        assert stored_codecs(arch)[uids["lone"]] == "volume+headers"
        assert stored_codecs(arch)[uids["noise"]] in ("zlib", "raw")
        assert retrieves_exactly(arch, sent)
    finally:
        arch.close()


def test_a_lone_image_the_codec_cannot_shrink_is_deflated_whatever_its_size(tmp_path):
    arch = Archive(tmp_path / "data")
    try:
        (noise,) = make_series(1, 48, 48, seed=6)               # 4.6 KB of pixels
        noise.PixelData = np.random.default_rng(7).integers(
            -32768, 32767, (48, 48), dtype=np.int16).tobytes()
        (smooth,) = make_series(1, 48, 48, seed=8)
        _smooth(smooth, 9)
        sent = store_series(arch, [noise, smooth])
        assert arch.compact(stable_age=0) == (2, 0)
        codecs = stored_codecs(arch)
        assert codecs[noise.SOPInstanceUID] in ("zlib", "raw")
        assert codecs[smooth.SOPInstanceUID] == "volume+headers"
        assert retrieves_exactly(arch, sent)
    finally:
        arch.close()
