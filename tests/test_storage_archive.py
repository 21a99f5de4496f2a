"""The archive on SQLite and PostgreSQL: staging, duplicates, compaction, exact retrieval, stats."""

import hashlib

import numpy as np
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

import models
from node_helpers import (BUNDLED, archive, bundled, dataset_bytes,  # noqa: F401 (fixture)
                          lose_commit_answer, make_series, make_time_points,
                          real_series_files, store_as_received, stored_codecs)
from storage import header_pack
from storage.archive import Archive
from storage.blobstore import BlobStore, new_key
from storage.errors import (CommitOutcomeUnknown, DuplicateInstanceError, InstanceNotFoundError, IntegrityError,
                            InvalidKeyError, StorageFullError, UnparseableDatasetError)
from storage.index import Blob, Instance, Job
from storage.part10 import split_file


def _assert_exact(arch, sent):
    for uid, (ts, data) in sent.items():
        got = arch.retrieve(uid)
        assert got.transfer_syntax == ts and got.data == data, uid


def test_stage_compact_and_retrieve_exactly(archive):
    series = make_series(5, 16, 12) + make_series(3, 9, 7, dtype="uint8", seed=1)
    sent = store_as_received(archive, series)
    for name in ["CT_small.dcm", "MR_small_RLE.dcm", "rtplan.dcm", "SC_rgb_small_odd.dcm"]:
        ts, data = bundled(name)
        sent[archive.store(data, ts).sop_uid] = (ts, data)
    assert archive.stats()["pending_instances"] == len(sent)
    _assert_exact(archive, sent)
    assert archive.compact(stable_age=0) == (6, 0)
    stats = archive.stats()
    assert stats["pending_instances"] == 0 and stats["instances"] == len(sent)
    assert stats["original_bytes"] == sum(len(d) for _, d in sent.values())
    _assert_exact(archive, sent)
    with archive.index.read() as s:
        codecs = sorted(s.scalars(select(Blob.codec)))
        assert codecs.count("volume+headers") == 3      # the two stacks and CT_small alone
        assert sorted(archive.blobs.keys()) == sorted(s.scalars(select(Blob.key)))


def test_a_lone_image_is_coded_as_a_one_slice_volume(archive):
    """A series' only image of its format (a radiograph, a scout) goes to the volume codec
    as one slice when it holds LONE_MIN_VOXELS pixels or more, in fewer bytes than deflating
    it; a smaller one is deflated."""
    import zlib

    import pydicom.data

    from storage.assembly import LONE_MIN_VOXELS
    ts, data = bundled("CT_small.dcm")                         # 128 x 128, int16
    big = archive.store(data, ts).sop_uid
    (tiny,) = make_series(1, 16, 16, seed=5)                   # 256 pixels: deflated
    sent = {big: (ts, data), **store_as_received(archive, [tiny])}
    assert 16 * 16 < LONE_MIN_VOXELS <= 128 * 128
    assert archive.compact(stable_age=0) == (2, 0)
    _assert_exact(archive, sent)
    with archive.index.read() as s:
        rows = {r.sop_uid: (r.codec, r.stored_bytes) for r in s.execute(
            select(Instance.sop_uid, Blob.codec, Blob.stored_bytes)
            .join(Blob, Instance.blob_fk == Blob.id))}
    assert rows[tiny.SOPInstanceUID][0] != "volume+headers"
    codec, stored = rows[big]
    pixels = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm")).pixel_array.tobytes()
    assert codec == "volume+headers" and stored < 0.8 * len(zlib.compress(pixels, 6))


def test_a_stack_of_noise_is_stored_instance_by_instance(archive, caplog):
    """Pixels that the codec cannot shrink (full-range noise) are not kept in a blob larger
    than themselves: the stack's instances are stored one by one, and come back exactly; a
    stack the codec shrinks beside it keeps its blob."""
    rng = np.random.default_rng(3)
    noise = make_series(4, 128, 128, dtype="uint16")
    for ds in noise:
        ds.PixelData = rng.integers(0, 1 << 16, (128, 128), dtype=np.uint16).tobytes()
    smooth = make_series(4, 128, 128, dtype="uint16", seed=2)
    sent = store_as_received(archive, noise + smooth)
    with caplog.at_level("INFO", logger="storage.compaction"):
        assert archive.compact(stable_age=0) == (2, 0)
    _assert_exact(archive, sent)
    codecs = stored_codecs(archive)
    assert {codecs[ds.SOPInstanceUID] for ds in noise} <= {"zlib", "raw"}
    assert {codecs[ds.SOPInstanceUID] for ds in smooth} == {header_pack.CODEC}
    assert "its instances are stored one by one" in caplog.text


def test_text_on_a_flat_ground_is_deflated_where_that_is_smaller(archive, caplog):
    """A screenshot or a dose report (text, which LZ77 matches and a per-voxel predictor does
    not) is stored deflated when that is smaller than the codec's blob, alone or as a stack;
    a CT-like stack beside it keeps its blob."""
    from PIL import Image, ImageDraw

    def report(seed: int) -> bytes:
        page = Image.new("L", (512, 512), 0)
        draw = ImageDraw.Draw(page)
        for line in range(28):
            draw.text((8, 6 + 18 * line), f"{line:2d} CT dose report  CTDIvol "
                      f"{line * 1.7 + seed:.1f} mGy  DLP {line * 31.3:.1f}", fill=255)
        return (np.asarray(page).astype(np.uint16) * 16).tobytes()

    pages = make_series(3, 512, 512, dtype="uint16")
    for k, ds in enumerate(pages):
        ds.PixelData = report(k)
    (lone,) = make_series(1, 512, 512, dtype="uint16", seed=4)
    lone.PixelData = report(9)
    scans = make_series(3, 64, 64, dtype="uint16", seed=2)
    sent = store_as_received(archive, pages + [lone] + scans)
    with caplog.at_level("INFO", logger="storage.compaction"):
        assert archive.compact(stable_age=0) == (3, 0)
    _assert_exact(archive, sent)
    codecs = stored_codecs(archive)
    assert {codecs[ds.SOPInstanceUID] for ds in pages + [lone]} == {"zlib"}
    assert {codecs[ds.SOPInstanceUID] for ds in scans} == {header_pack.CODEC}
    assert caplog.text.count("bytes its pixels deflate to: its instances are stored one by one") \
        == 2
    from storage import lone_images
    assert lone_images.candidates(archive.index) == []      # `--recode` does not try it again
    assert archive.stats()["stored_bytes"] < 0.1 * sum(len(d) for _, d in
                                                       list(sent.values())[:4])


def test_instances_located_ahead_come_back_exactly_after_moving_or_going(archive):
    """A retrieval locates its instances in one query when it starts; one compacted (or
    deleted) meanwhile is located again: the bytes are the received ones, or it is gone."""
    series = make_series(4, 8, 8, seed=7)
    sent = store_as_received(archive, series)
    uids = list(sent)
    located = archive.locate(uids)
    assert sorted(located) == sorted(uids) and all(r.staged_key for r in located.values())
    archive.compact(0)            # the staged files the rows name are gone
    for uid in uids[1:]:
        got = archive.retrieve_parts(uid, located[uid])
        assert b"".join(got.parts) == sent[uid][1]
    archive.delete("instance", uids[0])
    with pytest.raises(InstanceNotFoundError):
        archive.retrieve_parts(uids[0], located[uids[0]])


def test_stack_is_sorted_along_the_normal(archive):
    series = make_series(4, 8, 8)
    store_as_received(archive, series)
    archive.compact(0)
    with archive.index.read() as s:
        rows = list(s.scalars(select(Instance).order_by(Instance.frame_start)))
        blob = s.scalar(select(Blob))
    assert [r.position for r in rows] == sorted(r.position for r in rows)
    volume = models.decode_volume(header_pack.coded_part(archive.blobs.get(blob.key)))
    assert volume.dtype == np.int16 and volume.shape == (4, 8, 8)


def test_multi_frame_instances_of_one_format_share_a_stack_in_time_order(archive):
    """A series of one multi-frame instance per time point is coded as one volume, the
    instances in InstanceNumber order; one of another frame size stays apart; every instance
    and every frame comes back exactly."""
    series = make_time_points(5, 6, 12, seed=3)
    (other,) = make_series(1, 10, 10, seed=4)
    other.StudyInstanceUID, other.SeriesInstanceUID = (series[0].StudyInstanceUID,
                                                       series[0].SeriesInstanceUID)
    other.NumberOfFrames = 3
    other.PixelData = np.arange(300, dtype=np.int16).tobytes()
    sent = store_as_received(archive, series + [other])
    archive.compact(0)
    with archive.index.read() as s:
        rows = {r.sop_uid: r for r in s.scalars(select(Instance))}
        shapes = {b.id: b.shape for b in s.scalars(select(Blob))}
    in_time = sorted(series, key=lambda ds: ds.InstanceNumber)
    assert len({rows[ds.SOPInstanceUID].blob_fk for ds in series}) == 1
    assert [rows[ds.SOPInstanceUID].frame_start for ds in in_time] == [0, 6, 12, 18, 24]
    assert shapes[rows[series[0].SOPInstanceUID].blob_fk] == "30,12,12"
    assert rows[other.SOPInstanceUID].blob_fk != rows[series[0].SOPInstanceUID].blob_fk
    _assert_exact(archive, sent)
    third = np.frombuffer(in_time[2].PixelData, np.int16).reshape(6, 12, 12)
    got = archive.frames(in_time[2].SOPInstanceUID, [2, 6])
    assert [bytes(f) for f in got] == [third[1].tobytes(), third[5].tobytes()]


def test_a_multi_frame_instance_indexed_before_formats_were_kept_stays_alone():
    from storage.assembly import assemble
    from types import SimpleNamespace as Row

    def row(uid, number, fmt, frames=4):
        return Row(sop_uid=uid, instance_number=number, stack_format=fmt, frames=frames,
                   position=None)

    fmt = "multiframe|8x8|int16|1.2.840.10008.1.2.1|none"
    rows = [row("a", 1, fmt), row("b", 2, "multiframe"), row("c", 3, fmt),
            row("d", 4, fmt, frames=5000)]
    stacks, singles = assemble(rows, max_slices=1)     # at most 512 x 512 voxels a stack
    assert sorted([m.sop_uid for m in st.members] for st in stacks) == [["a", "c"], ["b"],
                                                                         ["d"]]
    assert singles == []
    # single-frame instances: runs of max_slices along the normal, a lone one left over
    flat = "8x8|int16|1.2.840.10008.1.2.1|none"
    rows = [Row(sop_uid=u, instance_number=k, stack_format=flat, frames=1, position=-k)
            for k, u in enumerate("vwxyz")]
    stacks, singles = assemble(rows, max_slices=2)
    assert [[m.sop_uid for m in st.members] for st in stacks] == [["z", "y"], ["x", "w"]]
    assert [m.sop_uid for m in singles] == ["v"]


def test_instances_after_compaction_are_compacted_too(archive):
    first, = [make_series(6, 8, 8)]
    sent = store_as_received(archive, first[:3])
    archive.compact(0)
    sent.update(store_as_received(archive, first[3:]))
    assert archive.stats()["pending_instances"] == 3
    archive.compact(0)
    assert archive.stats()["pending_instances"] == 0
    _assert_exact(archive, sent)


def test_stable_age_holds_fresh_series(archive):
    store_as_received(archive, make_series(2, 8, 8))
    assert archive.compact(stable_age=3600) == (0, 0)
    assert archive.stats()["pending_instances"] == 2


@pytest.mark.parametrize("policy,outcome", [("keep_first", "duplicate_ignored"),
                                            ("replace", "replaced")])
def test_duplicate_policy(tmp_path, policy, outcome):
    arch = Archive(tmp_path, duplicates=policy)
    ds = make_series(1, 8, 8)[0]
    ts, first = dataset_bytes(ds)
    arch.store(first, ts)
    ds.PatientName = "Other^Name"
    _, second = dataset_bytes(ds)
    assert arch.store(second, ts).outcome == outcome
    expect = first if policy == "keep_first" else second
    assert arch.retrieve(ds.SOPInstanceUID).data == expect
    assert arch.stats()["instances"] == 1
    assert len(list(arch.blobs.keys())) == 1


def test_duplicate_reject(tmp_path):
    arch = Archive(tmp_path, duplicates="reject")
    ts, data = dataset_bytes(make_series(1)[0])
    arch.store(data, ts)
    with pytest.raises(DuplicateInstanceError):
        arch.store(data, ts)
    assert len(list(arch.blobs.keys())) == 1


def test_bad_input_leaves_nothing(archive):
    ts, data = dataset_bytes(make_series(1)[0])
    with pytest.raises(UnparseableDatasetError):
        archive.store(data[:-10], ts)
    ds = make_series(1)[0]
    del ds.SeriesInstanceUID
    with pytest.raises(UnparseableDatasetError):
        archive.store(dataset_bytes(ds)[1], ts)
    assert archive.stats()["instances"] == 0 and not list(archive.blobs.keys())
    with pytest.raises(InstanceNotFoundError):
        archive.retrieve("1.2.3")


def test_storage_limit(tmp_path):
    ts, data = dataset_bytes(make_series(1, 16, 16)[0])
    arch = Archive(tmp_path, max_storage_bytes=len(data) + 100)
    arch.store(data, ts)
    with pytest.raises(StorageFullError):
        arch.store(dataset_bytes(make_series(1, 16, 16)[0])[1], ts)
    assert arch.stats()["instances"] == 1


@pytest.mark.parametrize("really_commit", [True, False])
def test_a_compaction_whose_commit_answer_is_lost_loses_nothing(tmp_path, monkeypatch,
                                                                really_commit):
    arch = Archive(tmp_path / "data")
    sent = store_as_received(arch, make_series(3, 8, 8))
    lose_commit_answer(arch.index, monkeypatch, really_commit, skip=1)   # after the job's
    assert arch.compact(0) == ((1, 0) if really_commit else (0, 1))
    assert arch.stats()["pending_instances"] == (0 if really_commit else 3)
    assert len(list(arch.blobs.keys())) == (1 if really_commit else 3)   # no file too many
    arch.close()
    arch = Archive(tmp_path / "data")             # the next start finds nothing to mend
    try:
        assert not arch.recovery.missing_staged and not arch.recovery.missing_blobs
        _assert_exact(arch, sent)
    finally:
        arch.close()


def test_a_commit_is_judged_by_the_index_when_its_answer_is_lost(tmp_path, monkeypatch):
    index = Archive(tmp_path / "data").index
    with pytest.raises(ZeroDivisionError):              # the body's error: nothing written
        index.write_checked(lambda s: 1 / 0, lambda s: True)
    lose_commit_answer(index, monkeypatch, True)
    assert index.write_checked(lambda s: "done", lambda s: True) == "done"
    lose_commit_answer(index, monkeypatch, False)
    with pytest.raises(OperationalError):
        index.write_checked(lambda s: "done", lambda s: False)
    lose_commit_answer(index, monkeypatch, True)
    with pytest.raises(CommitOutcomeUnknown):          # and when the index cannot tell
        index.write_checked(lambda s: "done", lambda s: s.execute(text("SELECT nothing")))


def test_failed_compaction_leaves_series_staged(archive, monkeypatch):
    sent = store_as_received(archive, make_series(3, 8, 8))

    def lossy(volume, model="default", **options):
        changed = volume.copy()
        changed[0, 0, 0] += 1
        return models.api.encode_volume(changed) if hasattr(models, "api") else None

    monkeypatch.setattr(models, "encode_volume", lossy)
    assert archive.compact(0) == (0, 1)
    with archive.index.read() as s:
        job = s.scalar(select(Job))
        assert job.state == "failed" and "VerificationError" in job.reason
        assert not list(s.scalars(select(Blob)))
    assert archive.stats()["pending_instances"] == 3
    assert archive.pending_series(0) == []                 # waits for its retry time
    _assert_exact(archive, sent)
    assert len(list(archive.blobs.keys())) == 3            # no orphan blob


def test_corrupted_blob_is_never_sent(archive):
    ds = make_series(3, 8, 8)
    store_as_received(archive, ds)
    archive.compact(0)
    with archive.index.read() as s:
        key = s.scalar(select(Blob.key))
    blob = bytearray(archive.blobs.get(key))
    blob[-5] ^= 0xFF
    archive.blobs.put(key, bytes(blob))
    archive.reconstructor.cache = type(archive.reconstructor.cache)(1 << 20)
    with pytest.raises(IntegrityError):
        archive.retrieve(ds[0].SOPInstanceUID)


def test_blob_keys_cannot_escape(tmp_path):
    store = BlobStore(tmp_path / "b")
    for bad in ["../../etc/passwd", "a/b", "..", "", "A" * 10, "x" * 65, "abc.def12"]:
        with pytest.raises(InvalidKeyError):
            store.put(bad, b"x")
    key = new_key("s")
    store.put(key, b"data")
    assert store.get(key) == b"data" and list(store.keys()) == [key]
    store.delete(key)
    with pytest.raises(KeyError):
        store.get(key)


def test_uids_never_become_paths(archive):
    ds = make_series(1)[0]
    ds.SOPInstanceUID = "../../../../tmp/voxarc-escape"
    ts, data = dataset_bytes(ds)
    archive.store(data, ts)
    assert archive.retrieve(ds.SOPInstanceUID).data == data
    for path in archive.data_dir.rglob("*"):
        assert "escape" not in path.name


def test_bundled_files_store_and_compact(archive):
    sent = {}
    for name in BUNDLED:            # some share a SOP Instance UID: the first one is kept
        ts, data = bundled(name)
        sent.setdefault(archive.store(data, ts).sop_uid, (ts, data))
    archive.compact(0)
    _assert_exact(archive, sent)


def test_real_series_compacted_exactly(archive, shared_series):
    sent = {}
    for path in real_series_files(shared_series("test", "mr_enh_siemens_xa10")):
        ts, data = split_file(path.read_bytes())
        sent[archive.store(data, ts).sop_uid] = (ts, data)
    archive.compact(0)
    assert archive.stats()["pending_instances"] == 0
    _assert_exact(archive, sent)
    assert all(hashlib.sha256(d).digest() for _, d in sent.values())


def test_computed_query_attributes_count_only_their_own_entities(archive):
    study = "1.2.826.0.1.3680043.8.498.1"
    store_as_received(archive, make_series(3, 8, 8, study_uid=study, modality="CT", seed=1))
    store_as_received(archive, make_series(2, 8, 8, study_uid=study, modality="MR", seed=2))
    store_as_received(archive, make_series(4, 8, 8, modality="US", study_date="20250101", seed=3))
    store_as_received(archive, make_series(5, 8, 8, patient_id="PAT2", modality="CT", seed=4))
    found = archive.find("STUDY", {"PatientID": "PAT1", "StudyDate": "20240101-20241231",
                                   "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
                                   "NumberOfStudyRelatedInstances": "",
                                   "NumberOfPatientRelatedStudies": "",
                                   "NumberOfPatientRelatedInstances": ""})
    assert [(r["StudyInstanceUID"], r["ModalitiesInStudy"], r["NumberOfStudyRelatedSeries"],
             r["NumberOfStudyRelatedInstances"], r["NumberOfPatientRelatedStudies"],
             r["NumberOfPatientRelatedInstances"]) for r in found] == \
        [(study, ["CT", "MR"], 2, 5, 2, 9)]
    assert len(archive.find("STUDY", {"ModalitiesInStudy": "MR"})) == 1     # a computed filter
    assert [r["NumberOfSeriesRelatedInstances"] for r in archive.find(
        "SERIES", {"StudyInstanceUID": study, "Modality": "MR",
                   "NumberOfSeriesRelatedInstances": ""})] == [2]


def test_a_failed_commit_is_not_taken_for_another_compactors(tmp_path):
    # two compactors on one series (the node's worker and `voxarc compress --now`): the one
    # whose commit fails must not take the other's finished job for its own commit, or it
    # would remove the staged copy of an instance only it had read
    import threading
    import time
    from contextlib import contextmanager

    from storage.blobstore import BlobStore
    from storage.compaction import Compactor
    from storage.index import Index
    arch = Archive(tmp_path / "data")
    series = make_series(4, 8, 8)
    sent = store_as_received(arch, series[:3])
    other = Compactor(Index(arch.index.url), BlobStore(arch.blobs.root))
    go, results = threading.Event(), []
    real_commit = other._commit
    other._commit = lambda plan, members, job: (go.wait(), real_commit(plan, members, job))[1]
    with arch.index.read() as s:
        series_id = s.scalar(select(Instance.series_fk))
    racing = threading.Thread(target=lambda: results.append(other.compact_series(series_id)))
    racing.start()
    for _ in range(200):                          # it has read its three instances
        with arch.index.read() as s:
            if s.scalar(select(Job.state)) == "running":
                break
        time.sleep(0.05)
    time.sleep(0.5)
    sent.update(store_as_received(arch, series[3:]))
    real_write, calls = arch.index.write, []

    @contextmanager
    def write():                                  # this one's commit fails, not taking place
        calls.append(None)
        if len(calls) == 1:                       # its job's start
            with real_write() as s:
                yield s
            return
        arch.index.write = real_write
        with real_write() as s:
            yield s
            s.rollback()
        go.set()
        racing.join()                             # the other commits meanwhile
        raise OperationalError("COMMIT", {}, OSError(28, "database or disk is full"))
    arch.index.write = write
    try:
        assert arch.compactor.compact_series(series_id) is False and results == [True]
        _assert_exact(arch, sent)
        assert arch.stats()["pending_instances"] == 1
    finally:
        arch.close()


def _lose_next_commit_answer(index, monkeypatch, unreadable: bool = False):
    """The next ``index.connect()`` commits, then raises as a dropped server connection would;
    with ``unreadable``, the index cannot be read afterwards either."""
    from contextlib import contextmanager
    real = index.connect

    @contextmanager
    def connect(durable=True):
        monkeypatch.setattr(index, "connect", real)
        with real(durable) as conn:
            yield conn
        if unreadable:
            monkeypatch.setattr(index.engine, "connect", _unreachable)
        raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))
    monkeypatch.setattr(index, "connect", connect)


def _unreachable(*args, **kwargs):
    raise OperationalError("connect", {}, ConnectionError("server unreachable"))


@pytest.mark.parametrize("policy", ["keep_first", "replace", "reject"])
@pytest.mark.parametrize("warm", [False, True])
def test_an_ingest_whose_commit_answer_is_lost_keeps_its_instance(tmp_path, monkeypatch,
                                                                  policy, warm):
    arch = Archive(tmp_path / "data", duplicates=policy)
    first, second = make_series(2, 8, 8)
    if warm:                                    # an earlier store filled the row-id cache
        store_as_received(arch, [first])
    _lose_next_commit_answer(arch.index, monkeypatch)
    sent = store_as_received(arch, [second])           # acknowledged: it took place
    try:
        _assert_exact(arch, sent)
        if policy == "reject":                  # sent again: refused as the duplicate it is
            with pytest.raises(DuplicateInstanceError):
                store_as_received(arch, [second])
        else:
            store_as_received(arch, [second])
        assert arch.stats()["instances"] == 1 + warm
        _assert_exact(arch, sent)               # and still there
    finally:
        arch.close()


def test_an_ingest_whose_commit_cannot_be_judged_keeps_its_file(tmp_path, monkeypatch):
    from storage.errors import CommitOutcomeUnknown
    arch = Archive(tmp_path / "data")
    (ds,) = make_series(1, 8, 8)
    _lose_next_commit_answer(arch.index, monkeypatch, unreadable=True)
    with pytest.raises(CommitOutcomeUnknown):
        store_as_received(arch, [ds])
    monkeypatch.undo()
    keys = list(arch.blobs.keys())
    arch.close()
    arch = Archive(tmp_path / "data")           # the row is there (it took place): nothing lost
    try:
        assert len(keys) == 1 and arch.stats()["instances"] == 1
        assert not arch.recovery.missing_staged
    finally:
        arch.close()


def test_compacting_a_multi_frame_instance_never_holds_its_pixels_many_times(tmp_path,
                                                                           monkeypatch):
    # a multi-frame instance is one stack however many frames it has: its staged file is
    # mapped, not read, and its decoded copy for the check is taken piece by piece, not whole
    # (with its byte string twice more)
    import tracemalloc
    monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")     # decoded here, so it is counted
    frames, size = 96, 256
    (ds,) = make_series(1, size, size, seed=1)
    y, x = np.mgrid[:size, :size]
    noise = np.random.default_rng(0).normal(0, 5, (frames, size, size))
    volume = np.round(800 * np.exp(-((x - 128) ** 2 + (y[None] - 128 - np.arange(frames)[
        :, None, None]) ** 2) / 4000) + noise).astype(np.int16)
    ds.NumberOfFrames, ds.PixelData = frames, volume.tobytes()
    arch = Archive(tmp_path / "data", adapt=False)
    try:
        sent = store_as_received(arch, [ds])
        tracemalloc.start()
        try:
            assert arch.compact(stable_age=0) == (1, 0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        _assert_exact(arch, sent)
        # 7.8x, then 4.7x; 3.6x with the staged file mapped rather than read (the rest is the
        # coder's, at this size)
        assert peak < 4.2 * volume.nbytes
    finally:
        arch.close()


def test_retrieval_order_stops_its_prefetch_and_does_without_a_plan(tmp_path, monkeypatch,
                                                                    caplog):
    arch = Archive(tmp_path / "data")
    stopped = []

    class Prefetch:
        def cancel(self):
            stopped.append(True)
    monkeypatch.setattr(arch, "plan_retrieval", lambda uids: (list(reversed(uids)), Prefetch()))
    with arch.retrieval_order(["a", "b"]) as (ordered, stop):
        assert ordered == ["b", "a"] and not stopped
        stop()                                          # early, as a C-MOVE whose peer left
        assert stopped == [True]
    assert stopped == [True, True]                      # and when the block ends

    def no_plan(uids):
        raise RuntimeError("index unreachable")
    monkeypatch.setattr(arch, "plan_retrieval", no_plan)
    with arch.retrieval_order(["a", "b"], "C-GET") as (ordered, stop):
        assert ordered == ["a", "b"]
        stop()
    assert "C-GET: no retrieval plan (index unreachable)" in caplog.text
    arch.close()
