"""`voxarc bench-node` on a tiny generated series: the voxarc half always (it needs DCMTK's
storescu), the Orthanc half when the Debian `orthanc` package is installed."""

import json

import pytest

from node_helpers import make_series, needs_dcmtk, write_series
from service import node_bench
from service.cli import build_parser

pytestmark = needs_dcmtk


@pytest.fixture(scope="module")
def tiny_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("series") / "tiny_ct"
    write_series(make_series(6, 24, 20, seed=7), folder)
    return folder


def _check_get(side, n):
    assert side["get_received"] == n
    assert 0 < side["get_first_s"] <= side["get_total_s"]
    assert side["get_per_s"] > 0 and side["get_mvox_s"] > 0


def test_voxarc_half(tiny_series, tmp_path):
    info = node_bench.describe_series(tiny_series)
    assert len(info.files) == 6 and info.voxels == 6 * 24 * 20
    out = node_bench.bench_voxarc(info, tmp_path, runs=1, get_runs=1)
    assert out["ingest_per_s"] > 0 and len(out["ingest_rates"]) == 1
    assert out["stats"]["instances"] == 6 and out["stats"]["pending_instances"] == 0
    assert 0 < out["stored_bytes"] < info.original_bytes
    assert out["codec_decode_mvox_s"] > 0
    _check_get(out, 6)


@pytest.mark.skipif(not node_bench.orthanc_binary(), reason="orthanc not installed")
def test_command_with_orthanc(tiny_series, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    args = build_parser().parse_args(["bench-node", str(tiny_series), "--runs", "1",
                                      "--get-runs", "1", "--json", str(out_json),
                                      "--get-client", "pynetdicom"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "tiny_ct" in table and "load average" in table
    result = json.loads(out_json.read_text())
    assert result["get_client"] == "pynetdicom"
    row, = result["series"]
    assert row["instances"] == 6
    for side in ("voxarc", "orthanc", "orthanc_z"):
        assert row[side]["ingest_per_s"] > 0 and row[side]["stored_bytes"] > 0
    _check_get(row["orthanc_z"], 6)
    _check_get(row["voxarc"], 6)


def test_ingest_only_rounds(tiny_series, tmp_path, capsys):
    with_orthanc = bool(node_bench.orthanc_binary())
    out_json = tmp_path / "ingest.json"
    argv = ["bench-node", str(tiny_series), "--runs", "2", "--ingest-only",
            "--json", str(out_json)] + ([] if with_orthanc else ["--no-orthanc"])
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "voxarc / Orthanc" in table and "tiny_ct" in table
    result = json.loads(out_json.read_text())
    row, = result["series"]
    assert result["ingest_only"] and len(row["voxarc"]["ingest_rates"]) == 2
    assert "stats" not in row["voxarc"] and "orthanc_z" not in row     # no compression, no C-GET
    if with_orthanc:
        assert len(row["orthanc"]["ingest_rates"]) == 2
        assert row["ingest_ratio"] == pytest.approx(
            row["voxarc"]["ingest_per_s"] / row["orthanc"]["ingest_per_s"])


def test_storescu_proposes_the_series_compressed_syntax():
    from service.node_bench import storescu_options
    assert storescu_options({"1.2.840.10008.1.2.1"}) == []
    assert storescu_options({"1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"}) == ["-xs"]
    assert storescu_options({"1.2.840.10008.1.2.4.90"}) == ["-xv"]
    with pytest.raises(ValueError):
        storescu_options({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"})


def test_getscu_accepts_one_compressed_syntax_at_most():
    explicit, jpeg_ls, j2k = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80", \
        "1.2.840.10008.1.2.4.90"
    assert node_bench.getscu_options({explicit}) == []
    assert node_bench.getscu_options({explicit, jpeg_ls}) == ["+xt"]
    assert node_bench.getscu_options({jpeg_ls, j2k}) is None          # the pynetdicom SCU then
    assert node_bench.getscu_options({"1.2.840.10008.1.2.4.50"}) is None


def test_bench_web_opens_the_series_three_ways(tiny_series, tmp_path, capsys):
    """`voxarc bench-web`: every request of the third opening is answered 304 and sends no
    body; the first two send the same bytes."""
    out_json = tmp_path / "web.json"
    args = build_parser().parse_args(["bench-web", str(tiny_series), "--runs", "1",
                                      "--json", str(out_json), "--work-dir", str(tmp_path)])
    assert args.func(args) == 0
    assert "| tiny_ct | 6 | revalidated |" in capsys.readouterr().out
    (row,) = json.loads(out_json.read_text())
    first, again, revalidated = (row[k] for k in ("first", "again", "revalidated"))
    assert first["bytes"] == again["bytes"] > 6 * 24 * 20 * 2
    assert (revalidated["not_modified"], revalidated["bytes"]) == (7, 0)   # metadata, 6 frames
    assert first["not_modified"] == again["not_modified"] == 0
    assert 0 < first["first_frame_s"] <= first["seconds"]
