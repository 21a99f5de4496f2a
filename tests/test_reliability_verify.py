"""`voxarc verify [--repair]`: a sound archive passes; a corrupted blob and a missing staged file
are found and reported with exit status 1; --repair re-queues failed jobs and orphans go."""

import json

from sqlalchemy import select

from node_helpers import dataset_bytes, make_series
from service.cli import main
from storage.archive import Archive
from storage.blobstore import new_key
from storage.index import Blob, Instance, Job


def _archive(path):
    arch = Archive(path)
    compacted = make_series(4, 16, 16)
    for ds in compacted:
        arch.store(*reversed(dataset_bytes(ds)))
    arch.compact(0)
    staged = make_series(2, 16, 16)
    for ds in staged:
        arch.store(*reversed(dataset_bytes(ds)))
    arch.close()
    return [d.SOPInstanceUID for d in compacted], [d.SOPInstanceUID for d in staged]


def _verify(capsys, path, *flags):
    code = main(["verify", "--data-dir", str(path), "--json", *flags])
    return code, json.loads(capsys.readouterr().out)


def test_sound_archive_passes(tmp_path, capsys):
    _archive(tmp_path)
    code, out = _verify(capsys, tmp_path)
    assert code == 0 and out["ok"]
    assert out["blobs_checked"] == 1 and out["instances_checked"] == 6
    assert main(["verify", "--data-dir", str(tmp_path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_corrupted_blob_and_missing_staged_file(tmp_path, capsys):
    compacted, staged = _archive(tmp_path)
    arch = Archive(tmp_path)
    with arch.index.read() as s:
        key = s.scalar(select(Blob.key))
        staged_key = s.scalar(select(Instance.staged_key).where(Instance.sop_uid == staged[0]))
    blob = bytearray(arch.blobs.get(key))
    blob[len(blob) // 2] ^= 0x10                      # same size, one bit flipped
    arch.blobs.put(key, bytes(blob))
    arch.blobs.delete(staged_key)
    arch.close()
    code, out = _verify(capsys, tmp_path)
    assert code == 1 and not out["ok"]
    assert list(out["bad_blobs"]) == [key] and "SHA-256" in out["bad_blobs"][key]
    assert set(out["bad_instances"]) == set(compacted) | {staged[0]}
    assert main(["verify", "--data-dir", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert f"BAD blob {key}" in text and f"BAD instance {staged[0]}" in text
    arch = Archive(tmp_path)
    assert arch.stats()["instances"] == 6                 # reported, never dropped
    assert arch.retrieve(staged[1]).data                  # the sound one still served
    arch.close()


def test_repair_requeues_failed_jobs_and_removes_orphans(tmp_path, capsys):
    _archive(tmp_path)
    arch = Archive(tmp_path)
    with arch.index.write() as s:
        series_fk = s.scalar(select(Instance.series_fk).where(Instance.staged_key.is_not(None)))
        s.add(Job(series_fk=series_fk, state="failed", reason="boom", attempts=3,
                  next_attempt=1e12))
    orphan = new_key("b")
    arch.blobs.put(orphan, b"uncommitted")
    assert arch.pending_series(0) == []
    arch.close()
    code, out = _verify(capsys, tmp_path, "--repair")
    assert code == 0 and out["jobs_requeued"] == 1 and out["orphans_removed"] == 1
    arch = Archive(tmp_path)
    assert not arch.blobs.exists(orphan)
    assert arch.pending_series(0) == [series_fk]
    assert arch.compact(0) == (1, 0)
    arch.close()


def test_orphans_kept_while_a_node_holds_the_archive(tmp_path, capsys):
    _archive(tmp_path)
    holder = Archive(tmp_path)
    in_flight = new_key("s")
    holder.blobs.put(in_flight, b"being ingested")
    code, out = _verify(capsys, tmp_path, "--repair")
    assert code == 0 and not out["recovery_ran"] and holder.blobs.exists(in_flight)
    holder.close()
