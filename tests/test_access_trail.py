"""The access trail (storage.access_log): who read which study, how and when, from C-FIND,
C-GET, C-MOVE, DICOMweb, downloads and exports, coalesced per minute; on SQLite and, when
configured, PostgreSQL."""

import io
import subprocess
import sys
import zipfile
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian

from admin_helpers import (CHROMIUM, admin_site, chromium, get_json, http_get,  # noqa: F401
                           http_token)
from node_helpers import (archive, dataset_bytes, make_series, node,  # noqa: F401
                          store_as_received)
from scu_helpers import StoreSCP, find, get, move, store_bytes
from service.web_access import classify
from storage import access_log
from storage.access_log import AccessLog

CT = "1.2.840.10008.5.1.4.1.1.2"
REPO = Path(__file__).resolve().parents[1]


def _stored(arch, **kwargs):
    series = make_series(3, 8, 8, **kwargs)
    store_as_received(arch, series)
    return series[0].StudyInstanceUID


def test_notes_within_a_minute_are_one_row_and_later_ones_another(archive):  # noqa: F811
    study = _stored(archive, patient_id="PAT7")
    trail = AccessLog(archive.index, window_s=60, flush_s=3600)
    trail.note("http 10.0.0.1", "WADO-RS rendered", study, now=1000.0)
    trail.note("http 10.0.0.1", "WADO-RS rendered", study, now=1030.0)
    trail.note("http 10.0.0.2", "WADO-RS rendered", study, now=1031.0)      # another actor
    trail.flush()
    trail.note("http 10.0.0.1", "WADO-RS rendered", study, now=1080.0)      # the row grows
    trail.note("VIEW@10.0.0.3", "C-GET", study, "PAT7", instances=3, now=1200.0)
    trail.note("VIEW@10.0.0.3", "C-GET", study, "PAT7", instances=3, now=1300.0)  # new row
    trail.note("VIEW@10.0.0.3", "C-FIND", "", "", instances=2, detail="STUDY PatientID=P*",
               now=1301.0)
    trail.close()
    rows = access_log.history(archive.index)
    got = [(r["actor"], r["action"], r["first_at"], r["last_at"], r["requests"],
            r["instances"], r["patient_id"], r["study_uid"]) for r in rows]
    assert got == [
        ("VIEW@10.0.0.3", "C-FIND", 1301.0, 1301.0, 1, 2, "", ""),
        ("VIEW@10.0.0.3", "C-GET", 1300.0, 1300.0, 1, 3, "PAT7", study),
        ("VIEW@10.0.0.3", "C-GET", 1200.0, 1200.0, 1, 3, "PAT7", study),
        ("http 10.0.0.1", "WADO-RS rendered", 1000.0, 1080.0, 3, 0, "PAT7", study),  # looked up
        ("http 10.0.0.2", "WADO-RS rendered", 1031.0, 1031.0, 1, 0, "PAT7", study)]
    assert rows[0]["detail"] == "STUDY PatientID=P*"
    assert len(access_log.history(archive.index, study_uid=study)) == 4
    assert len(access_log.history(archive.index, patient_id="PAT7", limit=2)) == 2
    assert access_log.history(archive.index, patient_id="PAT") == []
    assert {r["actor"] for r in access_log.history(archive.index, user="VIEW")} == \
        {"VIEW@10.0.0.3"}


def test_a_users_reads_whatever_they_came_by(archive):  # noqa: F811
    """``user``: a named web user's, a calling AE title's and a command user's rows."""
    study = _stored(archive, patient_id="PAT8")
    trail = AccessLog(archive.index, window_s=60, flush_s=3600)
    for actor in ("http alice@10.0.0.1", "alice@10.0.0.2", "cli export (alice)", "http 10.0.0.1",
                  "http alicia@10.0.0.1", "malice@10.0.0.2", "cli export (bob)"):
        trail.note(actor, "WADO-RS", study, now=1000.0)
    trail.close()
    assert {r["actor"] for r in access_log.history(archive.index, user="alice")} == \
        {"http alice@10.0.0.1", "alice@10.0.0.2", "cli export (alice)"}
    assert access_log.history(archive.index, user="ali_e") == []


def test_a_failed_write_keeps_the_notes_for_the_next(archive, monkeypatch):  # noqa: F811
    study = _stored(archive)
    trail = AccessLog(archive.index, window_s=60, flush_s=3600)
    trail.note("a", "C-GET", study, instances=2, now=10.0)
    trail.note("a", "C-GET", study, instances=2, now=100.0)     # the first row, not yet written
    real = AccessLog._write

    def broken(self, todo):
        raise OSError("disk gone")
    monkeypatch.setattr(AccessLog, "_write", broken)
    trail.flush()
    assert access_log.history(archive.index) == []
    monkeypatch.setattr(AccessLog, "_write", real)
    trail.close()
    assert sorted(r["first_at"] for r in access_log.history(archive.index)) == [10.0, 100.0]


def test_dicomweb_paths_are_classified():
    study = "1.2.3"
    assert classify(f"/dicom-web/studies/{study}", b"") == ("WADO-RS", study, "", "")
    assert classify(f"/dicom-web/studies/{study}/series/4/instances/5/frames/1", b"") == \
        ("WADO-RS frames", study, "", "")
    assert classify(f"/dicom-web/studies/{study}/series/4/instances/5/rendered", b"") == \
        ("WADO-RS rendered", study, "", "")
    assert classify(f"/dicom-web/studies/{study}/series/4/metadata", b"") == \
        ("WADO-RS metadata", study, "", "")
    assert classify(f"/dicom-web/studies/{study}/series", b"Modality=CT") == \
        ("QIDO-RS", study, "", "Modality=CT")
    assert classify("/dicom-web/studies", b"PatientName=Doe%5E*") == \
        ("QIDO-RS", "", "", "studies PatientName=Doe^*")
    assert classify("/dicom-web/studies", b"PatientID=P-1") == \
        ("QIDO-RS", "", "P-1", "studies PatientID=P-1")
    assert classify("/dicom-web/studies", b"00100020=P*")[2] == ""        # not one patient
    assert classify("/wado", b"requestType=WADO&studyUID=1.2.3&seriesUID=4") == \
        ("WADO-URI", study, "", "")
    assert classify("/api/stats", b"") is None


def test_dimse_reads_are_noted(node, tmp_path):  # noqa: F811
    series = make_series(4, 8, 8, patient_id="PAT9")
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    study = series[0].StudyInstanceUID
    status, matches = find(node.port, {"QueryRetrieveLevel": "STUDY", "PatientID": "PAT9",
                                       "StudyInstanceUID": ""})
    assert status == 0 and len(matches) == 1
    final, got = get(node.port, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                     [(CT, ExplicitVRLittleEndian)])
    assert final.Status == 0 and len(got) == 4
    dest = StoreSCP("DEST")
    node.settings.destinations["dest"] = f"DEST@127.0.0.1:{dest.port}"
    query = {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": series[0].SeriesInstanceUID}
    assert move(node.port, query, "DEST").Status == 0
    node.archive.accesses.flush()
    rows = {r["action"]: r for r in access_log.history(node.archive.index)}
    assert set(rows) == {"C-FIND", "C-GET", "C-MOVE to dest"}
    for action in ("C-GET", "C-MOVE to dest"):
        assert rows[action]["instances"] == 4 and rows[action]["study_uid"] == study
        assert rows[action]["patient_id"] == "PAT9"
        assert rows[action]["actor"] == "TESTSCU@127.0.0.1"
    assert rows["C-FIND"]["patient_id"] == "PAT9" and rows["C-FIND"]["instances"] == 1
    assert rows["C-FIND"]["detail"] == "STUDY PatientID=PAT9"


def test_web_reads_downloads_and_the_page_show_in_the_trail(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(3, 8, 8, patient_id="PATW")
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert set(store_bytes(node.port, items, tmp_path)) == {0}
    study = series[0].StudyInstanceUID
    base = f"{admin.url}/dicom-web/studies/{study}"
    for _ in range(3):
        assert http_get(f"{base}/series/{series[0].SeriesInstanceUID}/instances/"
                        f"{series[0].SOPInstanceUID}/rendered", accept="image/png")[0] == 200
    assert http_get(f"{admin.url}/dicom-web/studies/1.2.3.4")[0] == 404    # not a read
    status, body = http_get(f"{admin.url}/api/media.zip?patient=PATW")
    assert status == 200 and len(zipfile.ZipFile(io.BytesIO(body)).namelist()) == 4
    rows = get_json(f"{admin.url}/api/accesses?patient=PATW")
    got = {(r["action"], r["requests"], r["instances"]) for r in rows}
    assert got == {("WADO-RS rendered", 3, 0), ("download (DICOMDIR, ZIP)", 1, 3)}
    assert all(r["actor"] == "http 127.0.0.1" and r["study_uid"] == study for r in rows)
    assert get_json(f"{admin.url}/api/accesses?study=1.2.3.4") == []

    if CHROMIUM is None:
        return
    dom = chromium(f"{admin.url}/#patient/PATW", tmp_path / "profile", "--dump-dom")
    table = dom[dom.index('<table id="accesses">'):]
    table = table[:table.index("</table>")]
    assert "(patient PATW, newest first)" in dom
    assert "WADO-RS rendered" in table and "download (DICOMDIR, ZIP)" in table
    assert f'href="#study/{study}"' in table and "3 requests" in table


def test_export_is_noted_with_who_ran_it(tmp_path):
    from storage.archive import Archive
    arch = Archive(tmp_path / "data")
    study = _stored(arch, patient_id="PATX")
    arch.close()
    proc = subprocess.run([sys.executable, "-m", "service.cli", "export", "--data-dir",
                           str(tmp_path / "data"), study, str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    arch = Archive(tmp_path / "data")
    (row,) = access_log.history(arch.index)
    arch.close()
    assert row["actor"].startswith("cli export (") and row["action"] == "export"
    assert (row["study_uid"], row["patient_id"], row["instances"]) == (study, "PATX", 3)
    assert row["detail"] == f"to {(tmp_path / 'out').resolve()}"


def test_the_command_prints_a_patients_trail(tmp_path):
    import csv
    from storage.archive import Archive
    arch = Archive(tmp_path / "data")
    mine, other = _stored(arch, patient_id="PATC"), _stored(arch, patient_id="PATD")
    arch.accesses.note("VIEW@10.1.1.1", "C-GET", mine, instances=3, now=1_700_000_000.0)
    arch.accesses.note("VIEW@10.1.1.1", "C-GET", other, instances=3, now=1_700_000_001.0)
    arch.close()

    def voxarc(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", "accesses", "--data-dir",
                               str(tmp_path / "data"), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    proc = voxarc("--patient", "PATC", "--csv")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(proc.stdout.splitlines()))
    assert [(r["actor"], r["action"], r["study_uid"], r["instances"]) for r in rows] == \
        [("VIEW@10.1.1.1", "C-GET", mine, "3")]
    assert rows[0]["first_at"].startswith("2023-11-1")
    assert "PATD" in voxarc().stdout and "PATC" in voxarc().stdout
    assert voxarc("--since", "2999-01-01").stdout.strip() == "no access recorded"
    assert voxarc("--since", "yesterday").returncode == 2


def test_rows_older_than_the_retention_are_removed(archive):  # noqa: F811
    study = _stored(archive)
    trail = AccessLog(archive.index, flush_s=3600, keep_days=30)
    now = 1_800_000_000.0
    trail.note("a", "C-GET", study, now=now - 31 * 86400)
    trail.note("b", "C-GET", study, now=now - 29 * 86400)
    trail.flush()
    assert trail.prune(now) == 1
    assert [r["actor"] for r in access_log.history(archive.index)] == ["b"]
    assert AccessLog(archive.index, keep_days=0).prune(now + 1e9) == 0      # kept for ever
    assert len(access_log.history(archive.index)) == 1
    trail.close()
