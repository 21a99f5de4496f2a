"""`voxarc bench` and the DICOM series reader behind it, on generated and bundled DICOM files."""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from service import bench, bench_codecs, bench_report
from service.bench import BenchOptions, run_bench, select_slices
from service.cli import main as cli_main
from service.series_reader import read_folder

pytest.importorskip("imagecodecs")
pytest.importorskip("zstandard")

ANCHORS = list(bench_codecs.ANCHORS)


def _phantom(slices: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """CT-like int16 stack: a noisy disc of tissue values in -2000 padding."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size / 2
    disc = (xx**2 + yy**2) < (0.4 * size) ** 2
    vol = np.full((slices, size, size), -2000, np.int16)
    for z in range(slices):
        tissue = 40 + 300 * np.sin(xx / 7 + z / 3) + rng.normal(0, 20, (size, size))
        vol[z][disc] = tissue[disc].astype(np.int16)
    return vol


def _write_slice(path, pixels: np.ndarray, z: float, number: int, series_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.InstanceNumber = "CT", series_uid, number
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-100, -100, z]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def ct_folder(tmp_path):
    """Five slices written in shuffled file order (InstanceNumber disagrees with position), plus
    a non-DICOM DIRFILE; returns (folder, stack in ascending position order)."""
    vol = _phantom(5)
    folder = tmp_path / "ct_generated"
    folder.mkdir()
    uid = generate_uid()
    for file_no, z in enumerate([3, 0, 4, 1, 2]):
        _write_slice(folder / f"IM{file_no}", vol[z], z * 2.5 - 30, number=5 - z, series_uid=uid)
    (folder / "DIRFILE").write_bytes(b"not a DICOM file\n")
    return folder, vol


def test_reader_sorts_along_slice_normal_and_skips_non_dicom(ct_folder):
    folder, vol = ct_folder
    (got,) = read_folder(folder)
    assert got.voxels.dtype == np.int16 and got.sorted_by == "position" and got.files == 5
    np.testing.assert_array_equal(got.voxels, vol)  # stored values, no rescale intercept


@pytest.mark.parametrize("variant", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm",
                                     "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm"])
def test_reader_decodes_transfer_syntaxes_to_the_same_stored_values(variant):
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    (got,) = read_folder(get_testdata_file(variant))
    assert got.voxels.dtype == np.int16
    np.testing.assert_array_equal(got.voxels[0], reference)


def test_select_slices():
    assert select_slices(10, None) == list(range(10))
    assert select_slices(10, 20) == list(range(10))
    assert select_slices(10, 3) == [0, 4, 9]
    assert select_slices(10, 4, "block") == [3, 4, 5, 6]


def _check_report(report: dict, volumes: int, codecs: list[str]) -> None:
    rows = report["rows"]
    assert report["ok"]
    assert len(report["volumes"]) == volumes
    assert [r["codec"] for r in rows] == codecs * volumes
    for row in rows:
        assert row["status"] == "ok" and row["verified"] is True
        assert row["bpv"] > 0 and row["bytes"] > 0
        assert row["encode_wall_mvox_s"] > 0 and row["decode_wall_mvox_s"] > 0
        assert row["bpv"] == pytest.approx(8 * row["bytes"] / row["voxels"])
        xl = next(r for r in rows if r["volume"] == row["volume"] and r["codec"] == "jpegxl-e7")
        assert row["ratio_vs_jpegxl_e7"] == pytest.approx(row["bytes"] / xl["bytes"])
    for total in report["overall"]:
        mine = [r for r in rows if r["codec"] == total["codec"]]
        weighted = sum(r["bpv"] * r["voxels"] for r in mine) / sum(r["voxels"] for r in mine)
        assert total["bpv"] == pytest.approx(weighted, rel=1e-12)
        assert total["voxels"] == sum(r["voxels"] for r in mine)
    assert [t["codec"] for t in report["overall"]] == codecs


def test_cli_bench_on_generated_series_writes_json(ct_folder, tmp_path, capsys):
    folder, vol = ct_folder
    out = tmp_path / "bench.json"
    assert cli_main(["bench", str(folder), "--json", str(out), "--repeat", "1"]) == 0
    report = json.loads(out.read_text())
    codecs = ANCHORS + ["voxarc:default"]
    _check_report(report, 1, codecs)
    assert report["volumes"][0]["shape"] == list(vol.shape)
    assert report["environment"]["omp_wait_policy"]
    from models import kernels
    assert report["environment"]["voxarc_kernels"] == \
        ("compiled" if kernels.available() else kernels.status())
    assert report["environment"]["voxarc_network_layers"] == kernels.layers()
    from models.predictor import compute_device
    assert report["environment"]["voxarc_device"].split()[0] == compute_device()
    voxarc = report["rows"][-1]
    assert voxarc["slice_decode_s"] > 0  # random access through models.decode_slices, verified
    assert voxarc["slice_decode_s"] == statistics.median(voxarc["slice_decode_walls_s"])
    assert all(r["slice_decode_s"] is None for r in report["rows"][:-1])
    table = capsys.readouterr().out
    assert table.count("ct_generated") == len(codecs) and "OVERALL" in table
    assert f"network layers {kernels.layers()}, device {compute_device()}" in table


def test_bench_takes_numpy_volumes(ct_folder, tmp_path):
    """A researcher's .npy volume is benchmarked as the same voxels in a DICOM series are;
    a file of another dtype is a clear error (exit 2), not a traceback."""
    _, vol = ct_folder
    np.save(tmp_path / "phantom.npy", vol)
    np.save(tmp_path / "slice.npy", vol[0])
    out = tmp_path / "bench.json"
    assert cli_main(["bench", str(tmp_path / "phantom.npy"), str(tmp_path / "slice.npy"),
                     "--codecs", "voxarc,jpegls", "--json", str(out), "--repeat", "1"]) == 0
    report = json.loads(out.read_text())
    assert [v["shape"] for v in report["volumes"]] == [list(vol.shape), [1, *vol.shape[1:]]]
    assert all(r["status"] == "ok" and r["verified"] for r in report["rows"])
    np.save(tmp_path / "float.npy", vol.astype(np.float32))
    assert cli_main(["bench", str(tmp_path / "float.npy")]) == 2


def test_bench_on_pydicom_test_files():
    paths = [get_testdata_file("CT_small.dcm"), get_testdata_file("MR_small.dcm")]
    report = run_bench(paths, BenchOptions(codecs=ANCHORS, repeat=1))
    _check_report(report, 2, ANCHORS)
    assert [v["shape"] for v in report["volumes"]] == [[1, 128, 128], [1, 64, 64]]


def _broken_codec() -> bench_codecs.Codec:
    good = bench_codecs.ANCHORS["zstd-19"]()
    return bench_codecs.Codec("broken", good.encode, lambda enc: good.decode(enc) ^ 1)


def test_failed_round_trip_is_a_loud_failure_not_a_number(ct_folder, monkeypatch, tmp_path,
                                                          capsys):
    monkeypatch.setitem(bench_codecs.ANCHORS, "broken", _broken_codec)
    monkeypatch.setattr(bench, "ALL_CODECS", (*bench.ALL_CODECS, "broken"))
    folder, _ = ct_folder
    out = tmp_path / "bench.json"
    code = cli_main(["bench", str(folder), "--codecs", "jpegls,broken", "--repeat", "1",
                     "--json", str(out)])
    assert code == 1
    report = json.loads(out.read_text())
    broken = next(r for r in report["rows"] if r["codec"] == "broken")
    assert broken["status"] == "failed" and broken["bpv"] is None and not broken["verified"]
    assert "differ" in broken["error"] and not report["ok"]
    assert "ROUND TRIP FAILED" in capsys.readouterr().out


def test_unknown_codec_is_refused(ct_folder):
    assert cli_main(["bench", str(ct_folder[0]), "--codecs", "gzip"]) == 2


def _slow_voxarc(model: str) -> bench_codecs.Codec:
    """A lossless stand-in for a slow model: 20 ms per slice."""
    inner = bench_codecs.ANCHORS["zstd-19"]()

    def encode(volume):
        time.sleep(0.02 * volume.shape[0])
        return inner.encode(volume)

    return bench_codecs.Codec(bench_codecs.VOXARC_PREFIX + model, encode, inner.decode)


def test_slow_model_runs_on_a_marked_subset_compared_on_the_same_slices(monkeypatch):
    monkeypatch.setattr(bench_codecs, "voxarc_codec", _slow_voxarc)
    vol = bench.SeriesVolume("slow", _phantom(12, 32), "1.2", "CT", "native", 12, "position")
    options = BenchOptions(codecs=["jpegxl-e7", "jpegls", "voxarc"], models=["paper-cube"],
                           budget_s=0.1, repeat=1)
    rows = bench.bench_volume(vol, options, bench.Progress(3))
    bench_report.add_ratios(rows)
    model = next(r for r in rows if r["codec"] == "voxarc:paper-cube")
    assert model["subset"] and model["slices"] < 12 and model["total_slices"] == 12
    first = model["slice_indices"][0]  # default: a central block keeps inter-slice context
    assert model["slice_indices"] == list(range(first, first + model["slices"])) and first > 0
    refs = [r for r in rows if r["role"] == "reference"]
    assert {r["codec"] for r in refs} == {"jpegxl-e7", "jpegls"}
    assert all(r["slice_indices"] == model["slice_indices"] for r in refs)
    xl = next(r for r in refs if r["codec"] == "jpegxl-e7")
    assert model["ratio_vs_jpegxl_e7"] == pytest.approx(model["bytes"] / xl["bytes"])
    overall = bench_report.overall_rows(rows)
    assert [o["codec"] for o in overall] == ["jpegxl-e7", "jpegls", "voxarc:paper-cube"]
    assert overall[0]["voxels"] == 12 * 32 * 32  # reference rows stay out of the anchors' totals
    assert "*" in bench_report.format_table(rows, overall)


def test_voxarc_starts_its_workers_before_anything_is_timed(monkeypatch):
    """A running node has its worker processes: the benchmark starts them (``prepare``) before
    the probe and the timed runs, so that the first adapted encode does not pay for them."""
    events = []
    inner = bench_codecs.ANCHORS["zstd-19"]()
    real = bench_codecs.voxarc_codec

    def recording(model):
        return bench_codecs.Codec(bench_codecs.VOXARC_PREFIX + model,
                                  lambda v: events.append("encode") or inner.encode(v),
                                  inner.decode, prepare=lambda: events.append("prepare"))
    monkeypatch.setattr(bench_codecs, "voxarc_codec", recording)
    vol = bench.SeriesVolume("v", _phantom(3, 16), "1.2", "CT", "native", 3, "position")
    bench.bench_volume(vol, BenchOptions(codecs=["voxarc"], models=["default"], repeat=1),
                       bench.Progress(1))
    assert events[0] == "prepare" and events.count("prepare") == 1 and "encode" in events
    from models import parallel, tune_workers
    warmed = []
    monkeypatch.setattr(parallel, "warm", lambda: warmed.append("decode"))
    monkeypatch.setattr(tune_workers, "warm", lambda: warmed.append("tune"))
    real("default").prepare()
    real("default/no-adapt").prepare()
    assert warmed == ["decode", "tune", "decode"]     # no fine-tuning without adaptation


def test_plot_is_written(ct_folder, tmp_path):
    pytest.importorskip("matplotlib")
    from service.bench_plot import plot_bpv

    report = run_bench([ct_folder[0]], BenchOptions(codecs=["jpegls", "jpegxl-e7"], repeat=1))
    out = tmp_path / "bench.png"
    plot_bpv(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_real_ct_series_few_slices(shared_series):
    folder = shared_series("test", "ct_ge_hispeed_head_tilt")
    options = BenchOptions(codecs=["jpegls", "jpegxl-e7", "voxarc"], max_slices=2, repeat=1,
                           subset_mode="even")
    report = run_bench([folder], options)
    assert report["ok"], [r["error"] for r in report["rows"]]
    assert report["volumes"][0]["shape"] == [28, 512, 512]
    assert (report["volumes"][0]["min"], report["volumes"][0]["max"]) == (-1500, 2121)
    rows = {r["codec"]: r for r in report["rows"]}
    assert all(r["slice_indices"] == [0, 27] and r["subset"] for r in rows.values())
    # JPEG-LS on this head CT is about 3.3 bpv over all slices (BASELINES.md).
    assert 2.0 < rows["jpegls"]["bpv"] < 5.0


class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        pass


def test_progress_is_one_line_on_a_tty_and_log_lines_otherwise(caplog):
    tty = _Stream(True)
    progress = bench.Progress(2, tty)
    progress.step("a: jpegls")
    progress.step("a: zstd-19")
    progress.close()
    assert "\n" not in tty.text and "[2/2] a: zstd-19" in tty.text
    plain = _Stream(False)
    with caplog.at_level("INFO", logger="service.bench"):
        bench.Progress(1, plain).step("b: htj2k")
    assert plain.text == "" and "[1/1] b: htj2k" in caplog.text


def _burn(seconds: float) -> float:
    end, x = time.process_time() + seconds, 0.0
    while time.process_time() < end:
        x += 1.0
    return x


def test_cpu_clock_counts_worker_processes():
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from service.cpu_clock import cpu_seconds

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as workers:
        workers.submit(_burn, 0.01).result()  # the worker exists, alive, before the reading
        before = cpu_seconds()
        workers.submit(_burn, 0.3).result()
        used = cpu_seconds() - before
    assert used >= 0.25  # time.process_time() alone would see almost nothing


def test_crop_codes_the_central_region_with_every_codec(ct_folder):
    report = run_bench([ct_folder[0]], BenchOptions(codecs=["jpegls", "voxarc"], repeat=1,
                                                    crop=24))
    full = run_bench([ct_folder[0]], BenchOptions(codecs=["jpegls"], repeat=1))
    assert report["ok"] and report["volumes"][0]["shape"][1:] == [24, 24]
    slices = full["volumes"][0]["shape"][0]
    assert all(r["voxels"] == slices * 24 * 24 for r in report["rows"])
    assert full["rows"][0]["voxels"] > report["rows"][0]["voxels"]


def test_a_model_without_adaptation_is_benchmarked_beside_the_adapted_one(monkeypatch):
    """``--models default,default/no-adapt``: two rows of the same model, the second encoded
    without per-volume adaptation (the suffix is not part of the model's name)."""
    import models
    from service import bench_codecs
    seen = []
    real = models.encode_volume
    monkeypatch.setattr(models, "encode_volume",
                        lambda vol, **kw: seen.append(kw) or real(vol, **kw))
    vol = np.random.default_rng(5).integers(0, 900, (3, 16, 20)).astype(np.uint16)
    for spec, want in (("default", {"model": "default"}),
                       ("default/no-adapt", {"model": "default", "adapt": False})):
        codec = bench_codecs.voxarc_codec(spec)
        assert codec.name == f"voxarc:{spec}"
        np.testing.assert_array_equal(codec.decode(codec.encode(vol)), vol)
        assert seen[-1] == want


def test_environment_names_the_model_behind_a_no_adapt_column():
    from service import bench
    info = bench._model_info("default/no-adapt")
    assert isinstance(info, dict) and info == bench._model_info("default")
    assert isinstance(bench._model_info("no-such-model"), str)


def test_a_phase_is_repeated_while_its_first_run_is_below_the_bound(monkeypatch):
    """Every codec's phase gets the median of ``repeat`` runs when its first run took less
    than ``repeat_below_s`` (a first run's one-time costs do not decide a slow codec's
    speed), one run otherwise; the first run's time is kept beside the median."""
    from types import SimpleNamespace
    clock = iter([0.0, 1.0, 1.0, 1.5, 1.5, 5.0, 10.0, 13.0])  # runs of 1, 0.5, 3.5; then 3 s
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    results, walls, wall, _ = bench.timed(lambda: "x", 3, cheap_s=2.0)
    assert results == ["x"] * 3 and walls == [1.0, 0.5, 3.5] and wall == 1.0
    results, walls, wall, _ = bench.timed(lambda: "x", 3, cheap_s=2.0)
    assert results == ["x"] and walls == [3.0] and wall == 3.0
    monkeypatch.undo()
    row = bench.measure(bench_codecs.ANCHORS["zstd-19"](), np.zeros((2, 8, 8), np.int16), 2,
                        repeat_below_s=1e9)
    assert row["encode_runs"] == 2 and row["encode_first_wall_s"] > 0


def test_reading_the_cpu_clock_is_not_timed(monkeypatch):
    """The CPU clock reads /proc of every worker process (about 2 ms with four): a wall time
    must not include it, or small volumes decode slower than they do."""
    def slow_clock():
        time.sleep(0.05)
        return 0.0

    monkeypatch.setattr(bench, "cpu_seconds", slow_clock)
    _, walls, wall, _ = bench.timed(lambda: "x", 3)
    assert len(walls) == 3 and max(walls) < 0.02 and wall < 0.02


def test_one_slice_is_timed_as_the_median_of_repeated_verified_runs():
    vol = np.arange(5 * 4 * 3, dtype=np.uint16).reshape(5, 4, 3)
    calls = []

    def decode_slice(encoded, i):
        calls.append(i)
        return vol[i:i + 1] if len(calls) < 3 else vol[i:i + 1] + 1   # the third run is wrong

    codec = bench_codecs.Codec("fake", lambda v: None, lambda e: vol, decode_slice)
    median, walls = bench._time_one_slice(codec, None, vol, repeat=2)
    assert calls == [2, 2] and len(walls) == 2 and median == statistics.median(walls)
    with pytest.raises(bench.RoundTripError):
        bench._time_one_slice(codec, None, vol, repeat=1)
    assert bench._time_one_slice(bench_codecs.Codec("plain", None, None), None, vol, 3) == \
        (None, [])


def test_as_node_stacks_time_points_position_major_and_4d_instances_as_the_node_does(tmp_path):
    from node_helpers import make_4d_instance, make_time_points, write_series
    from service.node_stacks import read_folder_as_node
    from storage.frame_order import position_major

    points = sorted(make_time_points(6, 5, 12, seed=3), key=lambda d: d.InstanceNumber)
    write_series(points, tmp_path / "fmri")
    assert [v.voxels.shape for v in read_folder(tmp_path / "fmri")] == [(5, 12, 12)] * 6
    (vol,) = read_folder_as_node(tmp_path / "fmri")
    frames = np.concatenate([np.frombuffer(d.PixelData, np.int16).reshape(5, 12, 12)
                             for d in points])
    assert np.array_equal(vol.voxels, position_major(frames, 6))
    assert vol.sorted_by == "node: position-major" and vol.coding["slab"] == 8

    write_series([make_4d_instance(9, 4, 10, seed=4)], tmp_path / "one")
    (vol,) = read_folder_as_node(tmp_path / "one")
    assert (vol.sorted_by, vol.coding) == ("node: position-major", {"slab": 9, "max_group": 2})
    write_series([make_4d_instance(2, 10, 10, seed=5, contrasts=True)], tmp_path / "two")
    (vol,) = read_folder_as_node(tmp_path / "two")
    assert (vol.sorted_by, vol.coding["slab"]) == ("node: in their order", 10)


def test_bench_as_node_codes_with_the_nodes_slabs(tmp_path, monkeypatch):
    from node_helpers import make_4d_instance, write_series
    import models

    write_series([make_4d_instance(9, 4, 10, seed=6)], tmp_path / "one")
    seen = []
    real = models.encode_volume

    def spy(volume, **kw):
        seen.append((volume.shape, kw.get("slab"), kw.get("max_group")))
        return real(volume, **kw)

    monkeypatch.setattr(models, "encode_volume", spy)
    report = run_bench([tmp_path / "one"], BenchOptions(codecs=["voxarc", "jpegls"], repeat=1,
                                                        as_node=True))
    assert report["ok"] and report["volumes"][0]["coding"] == {"slab": 9, "max_group": 2}
    whole = [s for s in seen if s[0] == (36, 10, 10)]    # (the others: probes, model info)
    assert whole and all(s == ((36, 10, 10), 9, 2) for s in whole)


def test_cli_as_node_reads_the_folder_as_the_node_stacks_it(tmp_path):
    from node_helpers import make_time_points, write_series

    write_series(make_time_points(4, 3, 10, seed=9), tmp_path / "fmri")
    out = tmp_path / "bench.json"
    assert cli_main(["bench", str(tmp_path / "fmri"), "--as-node", "--codecs", "voxarc,jpegls",
                     "--repeat", "1", "--json", str(out)]) == 0
    (volume,) = json.loads(out.read_text())["volumes"]
    assert volume["shape"] == [12, 10, 10] and volume["sorted_by"] == "node: position-major"
    assert cli_main(["bench", str(tmp_path / "fmri"), "--codecs", "jpegls", "--repeat", "1",
                     "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["volumes"]) == 4      # without: a volume each
