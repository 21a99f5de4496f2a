"""`voxarc export`: a study's instances as Part 10 files whose datasets are the received bytes,
before and after compaction."""

import subprocess
import sys
from pathlib import Path

from node_helpers import make_series, write_series
from storage.part10 import safe_name
from storage.part10 import split_file

REPO = Path(__file__).resolve().parents[1]


def _voxarc(*args):
    return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _exported(folder: Path) -> dict:
    files = sorted(folder.rglob("*.dcm"))
    return {f.stem: f.read_bytes() for f in files}


def test_export_is_byte_exact_before_and_after_compaction(tmp_path):
    series = make_series(5, 16, 16) + make_series(2, 8, 8, modality="MR", seed=3)
    other = make_series(3, 8, 8, seed=4)                    # another study, not exported
    paths = write_series(series + other, tmp_path / "in")
    received = {ds.SOPInstanceUID: split_file(p.read_bytes()) for ds, p in zip(series, paths)}
    study = series[0].StudyInstanceUID
    assert all(ds.StudyInstanceUID == study for ds in series[:5])
    data = tmp_path / "data"
    assert _voxarc("import", "--data-dir", data, tmp_path / "in").returncode == 0
    mine = {ds.SOPInstanceUID for ds in series if ds.StudyInstanceUID == study}

    proc = _voxarc("export", "--data-dir", data, study, tmp_path / "staged")
    assert proc.returncode == 0, proc.stderr
    staged = _exported(tmp_path / "staged")
    assert set(staged) == mine
    for uid, blob in staged.items():
        assert split_file(blob) == received[uid]
    assert {p.parent.name for p in (tmp_path / "staged").rglob("*.dcm")} == {
        series[0].SeriesInstanceUID}

    assert _voxarc("compress", "--now", "--data-dir", data).returncode == 0
    proc = _voxarc("export", "--data-dir", data, study, tmp_path / "compressed")
    assert proc.returncode == 0, proc.stderr
    assert _exported(tmp_path / "compressed") == staged
    assert _voxarc("export", "--data-dir", data, "1.2.3", tmp_path / "none").returncode == 1


def test_safe_names():
    assert safe_name("1.2.840.10008.5") == "1.2.840.10008.5"
    for hostile in ("../../etc/x", "1.2/3", "", "1." * 40 + "1", "C:\\x"):
        name = safe_name(hostile)
        assert name.startswith("x") and len(name) == 33 and name.isalnum()
