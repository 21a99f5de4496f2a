"""Backups while the archive runs (storage.backup, `voxarc backup`): consistent, incremental,
restorable (to SQLite and PostgreSQL), refusing what would be unsafe."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from node_helpers import BACKENDS, archive, database_url, make_series, store_series  # noqa: F401
from storage import backup as backup_module
from storage.archive import Archive
from storage.backup import BackupError

REPO = Path(__file__).resolve().parents[1]


def _filled(arch) -> dict:
    """One compacted series, one staged; returns every instance's bytes."""
    sent = store_series(arch, make_series(5, 24, 24, seed=1))
    assert arch.compact(stable_age=0) == (1, 0)
    sent |= store_series(arch, make_series(3, 24, 24, seed=2))
    return sent


def _check_copy(dest, sent: dict, url: str = "") -> dict:
    copy = Archive(dest, url)
    try:
        assert all(copy.retrieve(uid).data == data for uid, data in sent.items())
        assert copy.recovery.clean and not copy.recovery.orphans_removed
        from storage.scrub import scrub
        assert scrub(copy).ok
        return copy.stats()
    finally:
        copy.close()


def test_a_backup_is_an_archive_that_gives_every_instance_back(archive, tmp_path):
    sent = _filled(archive)
    report = archive.backup(tmp_path / "copy")
    assert (report.instances, report.blobs, report.rounds) == (8, 1, 1)
    assert report.files_copied == 4 and report.files_kept == report.files_removed == 0
    stats = _check_copy(tmp_path / "copy", sent)
    assert stats == archive.stats()


def test_a_second_backup_copies_only_what_is_new_and_drops_what_went(archive, tmp_path):
    sent = _filled(archive)
    archive.backup(tmp_path / "copy")
    assert archive.compact(stable_age=0) == (1, 0)               # 3 staged files -> 1 blob
    sent |= store_series(archive, make_series(2, 24, 24, seed=3))
    report = archive.backup(tmp_path / "copy")
    assert report.files_kept == 1                                # the first series' blob
    assert report.files_copied == 1 + 2 and report.files_removed == 3
    assert _check_copy(tmp_path / "copy", sent)["instances"] == 10


def test_the_recycle_bin_goes_with_the_backup(archive, tmp_path):
    """Deletions that can be undone (and originals kept for holds) survive the archive's disk:
    the copy's bin restores them; entries the archive's bin dropped leave the copy too."""
    sent = _filled(archive)
    archive.recycle.keep_days = 7
    gone = {uid: sent.pop(uid) for uid in list(sent)[5:]}            # the staged series
    kept = archive.delete("series", archive.find("IMAGE", {
        "SOPInstanceUID": next(iter(gone)), "SeriesInstanceUID": ""})[0]["SeriesInstanceUID"]
                          )["kept_as"]
    report = archive.backup(tmp_path / "copy")
    assert (report.bin_entries_copied, report.bin_entries_kept, report.bin_entries_removed) \
        == (1, 0, 0) and report.bin_bytes_copied > sum(map(len, gone.values()))
    copy = Archive(tmp_path / "copy", deleted_keep_days=7)
    try:
        assert [e.name for e in copy.recycle.entries()] == [kept]
        assert copy.restore_deleted(kept, "test")["restored"] == 3
        assert all(copy.retrieve(uid).data == data for uid, data in (sent | gone).items())
    finally:
        copy.close()
    report = archive.backup(tmp_path / "copy")       # the copy's restore is undone: a mirror
    assert (report.bin_entries_copied, report.bin_entries_kept) == (1, 0)
    report = archive.backup(tmp_path / "copy")
    assert (report.bin_entries_copied, report.bin_entries_kept) == (0, 1)
    archive.recycle.purge(everything=True)
    assert archive.backup(tmp_path / "copy").bin_entries_removed == 1
    assert not any((tmp_path / "copy" / "recycle").iterdir())
    # a damaged copy in the bin fails the backup, naming it
    second = archive.delete("series", archive.find("IMAGE", {
        "SOPInstanceUID": next(iter(sent)), "SeriesInstanceUID": ""})[0]["SeriesInstanceUID"]
                            )["kept_as"]
    victim = next((archive.recycle.root / second).glob("*.dcm"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(BackupError, match="recycle bin is not: file .* of recycle bin entry "
                                          f"{second} does not match its SHA-256"):
        archive.backup(tmp_path / "copy")


def test_files_moving_while_copying_make_a_new_snapshot(archive, tmp_path, monkeypatch):
    sent = _filled(archive)
    real_get, compacted = archive.blobs.get, []

    def get_while_compacting(key):
        if not compacted:                   # the node compacts right after the snapshot
            compacted.append(None)
            compacted[0] = archive.compact(stable_age=0)
        return real_get(key)
    monkeypatch.setattr(archive.blobs, "get", get_while_compacting)
    report = archive.backup(tmp_path / "copy")
    assert compacted == [(1, 0)] and report.rounds == 2 and report.blobs == 2
    _check_copy(tmp_path / "copy", sent)


def test_a_damaged_file_fails_the_backup_and_keeps_the_previous_one(archive, tmp_path):
    sent = _filled(archive)
    archive.backup(tmp_path / "copy")
    new = store_series(archive, make_series(2, 24, 24, seed=4))
    uid = next(iter(new))
    with archive.index.read() as s:
        from sqlalchemy import select
        from storage.index import Instance
        key = s.scalar(select(Instance.staged_key).where(Instance.sop_uid == uid))
    archive.blobs.path(key).write_bytes(b"damaged")
    with pytest.raises(BackupError, match="SHA-256"):
        archive.backup(tmp_path / "copy")
    assert _check_copy(tmp_path / "copy", sent)["instances"] == 8    # the previous backup


def test_a_destination_in_use_or_the_archive_itself_is_refused(archive, tmp_path):
    _filled(archive)
    with pytest.raises(BackupError, match="own data folder"):
        archive.backup(archive.data_dir)
    serving = Archive(tmp_path / "busy")
    try:
        with pytest.raises(BackupError, match="open in another process"):
            archive.backup(tmp_path / "busy")
    finally:
        serving.close()


@pytest.mark.parametrize("restore_to", BACKENDS)
def test_a_backup_restores_onto_another_database_and_takes_new_instances(tmp_path,
                                                                         restore_to):
    source = Archive(tmp_path / "data")
    try:
        sent = _filled(source)
        source.backup(tmp_path / "copy")
    finally:
        source.close()
    url = database_url(restore_to, tmp_path / "restored")
    if restore_to == "sqlite":
        (tmp_path / "restored").mkdir()
    restored = Archive(tmp_path / "copy")
    try:
        report = restored.backup(tmp_path / "new", url)
        assert report.instances == 8
    finally:
        restored.close()
    _check_copy(tmp_path / "new", sent, url)
    again = Archive(tmp_path / "new", url)          # ids continue after the copied rows
    try:
        more = store_series(again, make_series(2, 24, 24, seed=5))
        assert again.compact(stable_age=0) == (2, 0)
        assert all(again.retrieve(u).data == d for u, d in (sent | more).items())
    finally:
        again.close()


def test_snapshot_of_a_non_sqlite_index_goes_through_rows(tmp_path, monkeypatch):
    calls = []
    real = backup_module._copy_rows
    monkeypatch.setattr(backup_module, "_copy_rows",
                        lambda *a: calls.append(1) or real(*a))
    source = Archive(tmp_path / "data")
    try:
        sent = _filled(source)
        monkeypatch.setattr(source.index, "url", "postgresql://stand-in/for-the-path")
        source.backup(tmp_path / "copy")
    finally:
        source.close()
    assert calls == [1]                     # the snapshot, read in one transaction
    _check_copy(tmp_path / "copy", sent)


def test_voxarc_backup(tmp_path):
    arch = Archive(tmp_path / "data")
    try:
        sent = _filled(arch)
    finally:
        arch.close()
    out = subprocess.run([sys.executable, "-m", "service.cli", "backup", "--data-dir",
                          str(tmp_path / "data"), str(tmp_path / "copy"), "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["instances"] == 8
    out = subprocess.run([sys.executable, "-m", "service.cli", "verify", "--data-dir",
                          str(tmp_path / "copy")], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout
    _check_copy(tmp_path / "copy", sent)


def _readable(arch, sent: dict) -> bool:
    return all(arch.retrieve(uid).data == data for uid, data in sent.items())


@pytest.mark.parametrize("force", [False, True])
def test_the_archives_own_index_is_never_the_copys(archive, tmp_path, force):
    sent = store_series(archive, make_series(3, 24, 24, seed=1))
    with pytest.raises(BackupError, match="archive's own index"):
        backup_module.backup(archive.index, archive.blobs, tmp_path / "copy",
                             archive.index.url, force=force)
    assert archive.stats()["instances"] == 3 and _readable(archive, sent)
    assert not (tmp_path / "copy").exists()


def test_a_backup_into_the_folder_of_the_live_sqlite_index_is_refused(tmp_path):
    (tmp_path / "db").mkdir()
    arch = Archive(tmp_path / "data", f"sqlite:///{tmp_path / 'db' / 'index.sqlite'}")
    try:
        sent = store_series(arch, make_series(3, 24, 24, seed=1))
        for force in (False, True):
            with pytest.raises(BackupError, match="archive's own index"):
                backup_module.backup(arch.index, arch.blobs, tmp_path / "db", force=force)
        assert _readable(arch, sent) and arch.compact(stable_age=0) == (1, 0)
    finally:
        arch.close()


def test_a_server_index_is_recognised_however_its_url_is_spelled(tmp_path, monkeypatch):
    arch = Archive(tmp_path / "data")
    try:
        monkeypatch.setattr(arch.index, "url", "postgresql+psycopg://vx:secret@DB.lan/voxarc")
        for url in ("postgresql://admin@db.lan:5432/voxarc", "postgresql+psycopg2://db.lan/voxarc"):
            with pytest.raises(BackupError, match="own index") as err:
                arch.backup(tmp_path / "copy", url)
            assert "secret" not in str(err.value)
    finally:
        arch.close()
    same = backup_module._same_database
    assert same("postgresql://localhost/v", "postgresql+psycopg://127.0.0.1:5432/v")
    assert same("postgresql:///v?host=/run/postgresql", "postgresql://localhost/v")
    assert not same("postgresql://db.lan/v", "postgresql://db.lan/w")
    assert not same("postgresql://db.lan/v", "postgresql://db.lan:5433/v")
    assert not same("postgresql://db.lan/v", "postgresql://other.lan/v")
    assert not same("sqlite://", "sqlite://")                       # two in-memory databases


def _other_archive(path, url: str = "") -> dict:
    other = Archive(path, url)
    try:
        return store_series(other, make_series(4, 24, 24, patient_id="OTHER", seed=7))
    finally:
        other.close()


def _check_other(path, sent: dict, url: str = "") -> None:
    other = Archive(path, url)
    try:
        assert other.stats()["instances"] == len(sent) and _readable(other, sent)
    finally:
        other.close()


def test_a_folder_that_is_not_a_backup_of_this_archive_is_refused_unless_forced(tmp_path):
    theirs = _other_archive(tmp_path / "node2")
    source = Archive(tmp_path / "data")
    try:
        sent = store_series(source, make_series(2, 24, 24, seed=1))
        with pytest.raises(BackupError, match="not empty and is not a voxarc backup"):
            source.backup(tmp_path / "node2")
        _check_other(tmp_path / "node2", theirs)
        source.backup(tmp_path / "copy")
        other = Archive(tmp_path / "other")
        try:
            store_series(other, make_series(2, 24, 24, seed=3))
            with pytest.raises(BackupError, match="backup of another archive"):
                other.backup(tmp_path / "copy")
        finally:
            other.close()
        _check_copy(tmp_path / "copy", sent)
        report = backup_module.backup(source.index, source.blobs, tmp_path / "node2", force=True)
        assert report.files_removed == 4
    finally:
        source.close()
    _check_copy(tmp_path / "node2", sent)


def test_the_marker_names_the_source_and_the_first_backups_time(tmp_path):
    source = Archive(tmp_path / "data")
    try:
        store_series(source, make_series(2, 24, 24, seed=1))
        source.backup(tmp_path / "copy")
        marker = json.loads((tmp_path / "copy" / backup_module.MARKER).read_text())
        assert marker["source"] == {"data_dir": str((tmp_path / "data").resolve()),
                                    "index": f"sqlite:///{(tmp_path / 'data').resolve()}"
                                             "/index.sqlite"}
        source.backup(tmp_path / "copy")
        again = json.loads((tmp_path / "copy" / backup_module.MARKER).read_text())
        assert again == marker                  # the first backup's time kept
    finally:
        source.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_database_holding_rows_is_refused_unless_the_backup_marker_names_it(tmp_path,
                                                                              backend):
    (tmp_path / "db").mkdir()
    url = database_url(backend, tmp_path / "db")
    theirs = _other_archive(tmp_path / "node2", url)
    source = Archive(tmp_path / "data")
    try:
        sent = store_series(source, make_series(2, 24, 24, seed=1))
        with pytest.raises(BackupError, match="already holds an archive's rows"):
            source.backup(tmp_path / "copy", url)
        _check_other(tmp_path / "node2", theirs, url)
        backup_module.backup(source.index, source.blobs, tmp_path / "copy", url, force=True)
        assert source.backup(tmp_path / "copy", url).files_kept == 2     # its marker names it
    finally:
        source.close()
    _check_copy(tmp_path / "copy", sent, url)


def test_a_destination_that_is_a_file_is_refused_plainly(tmp_path):
    (tmp_path / "afile").write_bytes(b"")
    source = Archive(tmp_path / "data")
    try:
        for dest in (tmp_path / "afile", tmp_path / "afile" / "sub"):
            with pytest.raises(BackupError, match="afile"):
                source.backup(dest)
    finally:
        source.close()


def test_voxarc_backup_refuses_plainly_and_force_replaces(tmp_path):
    arch = Archive(tmp_path / "data")
    try:
        store_series(arch, make_series(2, 24, 24, seed=1))
    finally:
        arch.close()
    _other_archive(tmp_path / "node2")
    (tmp_path / "afile").write_bytes(b"")

    def voxarc_backup(dest, *more):
        return subprocess.run([sys.executable, "-m", "service.cli", "backup", "--data-dir",
                               str(tmp_path / "data"), str(dest), *more], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    for dest, message in ((tmp_path / "afile", "is not a folder"),
                          (tmp_path / "node2", "--force replaces it")):
        out = voxarc_backup(dest)
        assert out.returncode == 1 and message in out.stderr
        assert "Traceback" not in out.stderr
    out = voxarc_backup(tmp_path / "node2", "--force", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files_removed"] == 4
