"""Series previews of the admin page (service.preview, /api/series/{uid}/preview.png)."""

import io

import numpy as np
import pytest
from PIL import Image

from admin_helpers import admin_site, http_get, http_token, store_series  # noqa: F401
from node_helpers import bundled, dataset_bytes, make_series
from service.preview import PreviewError, render_image


def _png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(data)))


def _ramp(photometric="MONOCHROME2", window=None, frames=1):
    """A 64 x 64 int16 image whose values rise left to right (one dataset, its bytes)."""
    (ds,) = make_series(1, 64, 64, seed=0)
    ramp = np.tile(np.arange(64, dtype=np.int16) * 10, (64, 1))
    stack = np.stack([ramp + 1000 * f for f in range(frames)])
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    ds.PhotometricInterpretation = photometric
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ts, data = dataset_bytes(ds)
    return ds, ts, data


def _render(ds, ts, data, size=64) -> np.ndarray:
    return _png(render_image(ds.SOPClassUID, ds.SOPInstanceUID, ts, data, size))


def test_a_ramp_stays_a_ramp_from_black_to_white():
    grey = _render(*_ramp())
    assert grey.shape == (64, 64) and grey.dtype == np.uint8
    row = grey[32].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] < 10 and row[-1] > 245


def test_monochrome1_is_inverted_and_a_window_saturates_outside_it():
    inverted = _render(*_ramp("MONOCHROME1"))[32].astype(int)
    assert np.all(np.diff(inverted) <= 0) and inverted[0] > 245
    # rescale intercept -1024: stored 0..630 are -1024..-394; a window of -700 +- 100
    windowed = _render(*_ramp(window=(-700, 200)))[32].astype(int)
    assert windowed[:20].max() == 0 and windowed[-20:].min() == 255
    assert 0 < windowed[32] < 255


def test_the_middle_frame_and_the_size_limit():
    grey = _render(*_ramp(frames=3), size=32)
    assert grey.shape == (32, 32)
    one = _render(*_ramp(frames=1), size=32)
    assert np.abs(grey.astype(int) - one.astype(int)).max() <= 2     # same ramp, percentiles


def test_an_instance_without_an_image_has_no_preview():
    ts, data = bundled("test-SR.dcm")
    with pytest.raises(PreviewError):
        render_image("1.2.840.10008.5.1.4.1.1.88.33", "1.2.3", ts, data)


def test_the_api_gives_the_middle_image_staged_and_compressed(admin_site, tmp_path):
    node, admin = admin_site
    (stored,) = store_series(node, tmp_path, [("CT", 5, "P1")])
    url = f"{admin.url}/api/series/{stored['series_uid']}/preview.png?size=32"
    status, staged = http_get(url)
    assert status == 200 and _png(staged).shape == (32, 32) and _png(staged).std() > 10
    assert node.archive.compact_series(stored["series_uid"])
    status, compressed = http_get(url.replace("size=32", "size=31"))   # not the cached one
    assert status == 200 and _png(compressed).shape == (31, 31)
    assert http_get(f"{admin.url}/api/series/1.2.3/preview.png")[0] == 404
    assert http_get(url.replace("size=32", "size=big"))[0] == 400


def test_the_middle_instance_is_the_middle_slice(tmp_path):
    from storage.archive import Archive
    from storage.reports import middle_instance
    from node_helpers import store_series as store
    arch = Archive(tmp_path / "data")
    try:
        series = make_series(5, seed=3)
        store(arch, series)
        middle = sorted(series, key=lambda ds: ds.ImagePositionPatient[2])[2]
        uid, sha = middle_instance(arch.index, series[0].SeriesInstanceUID)
        assert uid == middle.SOPInstanceUID and len(sha) == 64
        assert middle_instance(arch.index, "1.2.3") is None
    finally:
        arch.close()


def test_a_lossless_jpeg_image_is_previewed_as_its_uncompressed_twin():
    """The node's decoders (GDCM, pylibjpeg-openjpeg) read the lossless compressed syntaxes:
    MR_small as JPEG-LS and JPEG 2000 lossless previews as MR_small itself."""
    names = ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm")
    images = [_png(render_image("1.2.840.10008.5.1.4.1.1.4", "1.2.3", *bundled(name), 64))
              for name in names]
    for image in images[1:]:
        np.testing.assert_array_equal(image, images[0])


def test_an_image_no_decoder_reads_is_one_error_not_a_traceback_per_decoder(caplog):
    """pydicom logs a traceback for each decoder plugin that fails on a 12-bit JPEG Extended
    image; the node keeps them out of its log and says once, naming the instance, why."""
    from service import quiet_log
    quiet_log.install()
    ts, data = bundled("JPEG-lossy.dcm")
    with caplog.at_level("DEBUG"), pytest.raises(PreviewError, match="(?s)has no image to show .*"
                                                 "JPEG Extended"):
        render_image("1.2.840.10008.5.1.4.1.1.2", "1.3.6.1.4.1.5962.1.1.8.1.5.20040826185059.5457",
                     ts, data)
    assert [r for r in caplog.records if r.exc_info] == []
