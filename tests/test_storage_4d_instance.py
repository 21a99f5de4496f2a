"""A multi-frame instance holding a whole 4D series (time-major frames): its frame cycle found
from the functional groups, coded position-major where that pays, and given back exactly."""

import numpy as np
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

import models
from node_helpers import (archive, dataset_bytes, make_4d_instance,  # noqa: F401
                          make_time_points, store_series)
from storage import header_pack
from storage.assembly import MAX_FOUR_D_VOXELS, assemble
from storage.dataset_parts import header_elements
from storage.frame_order import (FrameCycle, cycle_time_points, frame_cycle, position_major,
                                 position_major_pays, run_time_points)
from storage.index import Blob
from storage.instance_facts import frame_places


@pytest.mark.parametrize("keys, expected", [
    (list("abcabcabc"), 3),           # three time points of three places
    (list("abab"), 2),
    (list("aabbcc"), 1),              # position-major already
    (list("aaaa"), 1),                # one place: a time series of one slice
    (list("abcd"), 1),                # one volume
    (list("abcab"), 1),               # a time point cut short
    (list("abcacb"), 1),              # the places in another order the second time
    ([], 1),
])
def test_the_frame_cycle_counts_time_points_only_for_a_regular_time_major_order(keys, expected):
    assert cycle_time_points(keys) == expected


@pytest.mark.parametrize("keys, expected", [
    (list("aabbcc"), 2),             # each place's frames together
    (list("aaabbb"), 3),
    (list("abcabc"), 1),             # time-major
    (list("aaaa"), 1),
    (list("aabbc"), 1),              # a place cut short
    (list("aabbaa"), 1),             # a place twice
    (list("aabbbc"), 1),
])
def test_runs_of_one_place_count_time_points_of_a_position_major_order(keys, expected):
    assert run_time_points(keys) == expected


def test_the_frame_cycle_says_which_order_holds():
    assert frame_cycle(list("abab")) == FrameCycle(2, True)
    assert frame_cycle(list("aabb")) == FrameCycle(2, False)
    assert frame_cycle(list("abba")) == FrameCycle()


def test_position_major_pays_for_time_points_not_for_other_contrasts():
    rng = np.random.default_rng(1)
    anatomy = np.cumsum(rng.normal(0, 30, (6, 16, 16)), axis=0) + 1000
    series = np.concatenate([anatomy + rng.normal(0, 2, anatomy.shape) for _ in range(4)])
    assert position_major_pays(series, 4)
    mixed = np.concatenate([anatomy, 5000 - 3 * anatomy])      # magnitude, then "phase"
    assert not position_major_pays(mixed, 2)
    assert not position_major_pays(series, 1)


def test_frame_places_come_from_the_functional_groups():
    ds = make_4d_instance(2, 3, 8, seed=2)
    ts, data = dataset_bytes(ds)
    places = frame_places(header_elements(data, ts))
    assert len(places) == 6 and places[0] == places[3] != places[1]
    assert places[0] == ((-10.5, 4.25, -20.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    assert cycle_time_points(places) == 2
    del ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence
    assert frame_places(header_elements(*reversed(dataset_bytes(ds)))) is None
    assert frame_places(Dataset()) is None


def _row(frames=40, size=8):
    from types import SimpleNamespace
    return SimpleNamespace(sop_uid="u1", instance_number=1, frames=frames, position=None,
                           stack_format=f"multiframe|{size}x{size}|int16|1.2.840.10008.1.2.1|none")


def test_assembly_makes_a_4d_instance_a_stack_of_its_own():
    def shape(cycle, **row):
        stacks, singles = assemble([_row(**row)], cycles={"u1": cycle})
        assert singles == [] and len(stacks) == 1
        return stacks[0].interleave, stacks[0].slab

    assert shape(FrameCycle(4, True)) == (4, 0)         # time-major: coded position-major
    assert shape(FrameCycle(10, True)) == (10, 10)      # a slab per position
    assert shape(FrameCycle(10, False)) == (1, 10)      # position-major already: its order
    assert shape(FrameCycle(4, False)) == (1, 0)
    assert shape(FrameCycle(40, True), frames=80) == (40, 20)   # at most 32, dividing 40
    assert shape(FrameCycle(37, True), frames=74) == (37, 0)    # none divides 37
    assert shape(None) == (1, 0)
    side = int((MAX_FOUR_D_VOXELS // 40) ** 0.5) + 1  # too large to reorder
    assert shape(FrameCycle(4, True), size=side) == (1, 0)
    assert shape(FrameCycle(10, False), size=side) == (1, 0)   # too large for a slab each


def _volume_blob(arch) -> Blob:
    with arch.index.read() as s:
        (blob,) = s.scalars(select(Blob).where(Blob.codec.in_(header_pack.VOLUME_CODECS)))
        return blob


def _frames(ds, size: int) -> np.ndarray:
    return np.frombuffer(ds.PixelData, np.int16).reshape(-1, size, size)


def test_a_4d_instance_is_coded_position_major_and_comes_back_exactly(archive):
    ds = make_4d_instance(9, 5, 12, seed=3)
    sent = store_series(archive, [ds])
    assert archive.compact(stable_age=0) == (1, 0)
    blob = _volume_blob(archive)
    assert (blob.interleave, blob.slab, blob.shape) == (9, 9, "45,12,12")
    coded = models.decode_volume(header_pack.coded_view(archive.blobs.get(blob.key)))
    assert np.array_equal(coded, position_major(_frames(ds, 12), 9))
    uid = ds.SOPInstanceUID
    ordered, prefetch = archive.plan_retrieval([uid])
    prefetch.thread.join(60)
    assert ordered == [uid] and archive.retrieve(uid).data == sent[uid]
    assert [bytes(f) for f in archive.frames(uid, [2, 7])] == \
        [_frames(ds, 12)[k].tobytes() for k in (1, 6)]


def test_a_position_major_4d_instance_keeps_its_order_a_slab_per_position(archive):
    ds = make_4d_instance(9, 5, 12, seed=6, by_position=True)
    sent = store_series(archive, [ds])
    assert archive.compact(stable_age=0) == (1, 0)
    blob = _volume_blob(archive)
    assert (blob.interleave, blob.slab) == (1, 9)
    coded = models.decode_volume(header_pack.coded_view(archive.blobs.get(blob.key)))
    assert np.array_equal(coded, _frames(ds, 12))
    assert archive.retrieve(ds.SOPInstanceUID).data == sent[ds.SOPInstanceUID]


def test_a_4d_instance_of_other_contrasts_keeps_its_frame_order(archive):
    ds = make_4d_instance(2, 12, 12, seed=4, contrasts=True)
    sent = store_series(archive, [ds])
    assert archive.compact(stable_age=0) == (1, 0)
    blob = _volume_blob(archive)
    assert (blob.interleave, blob.slab) == (1, 12)      # a slab per contrast's volume
    coded = models.decode_volume(header_pack.coded_view(archive.blobs.get(blob.key)))
    assert np.array_equal(coded, _frames(ds, 12))
    assert archive.retrieve(ds.SOPInstanceUID).data == sent[ds.SOPInstanceUID]


def test_time_point_instances_of_other_contrasts_keep_their_order(archive):
    series = make_time_points(2, 6, 12, seed=5)     # e.g. magnitude and phase instances
    ds = max(series, key=lambda d: d.InstanceNumber)
    ds.PixelData = (4000 - 5 * _frames(ds, 12).astype(np.int32)).astype(np.int16).tobytes()
    sent = store_series(archive, series)
    assert archive.compact(stable_age=0) == (1, 0)
    assert (_volume_blob(archive).interleave, _volume_blob(archive).slab) == (1, 8)  # 6 a volume
    for uid, data in sent.items():
        assert archive.retrieve(uid).data == data


def test_deleting_a_4d_instance_frees_its_blob_and_leaves_the_series_rest_exact(archive):
    four_d = make_4d_instance(4, 6, 12, seed=7)
    (other,) = make_time_points(1, 5, 10, seed=8)
    other.SeriesInstanceUID = four_d.SeriesInstanceUID
    other.StudyInstanceUID = four_d.StudyInstanceUID
    sent = store_series(archive, [four_d, other])
    assert archive.compact(stable_age=0) == (1, 0)
    with archive.index.read() as s:
        shapes = sorted((b.shape, b.interleave) for b in s.scalars(
            select(Blob).where(Blob.codec.in_(header_pack.VOLUME_CODECS))))
    assert shapes == [("24,12,12", 4), ("5,10,10", 1)]
    archive.delete("instance", four_d.SOPInstanceUID)
    with archive.index.read() as s:
        assert [b.shape for b in s.scalars(select(Blob))] == ["5,10,10"]
    assert archive.retrieve(other.SOPInstanceUID).data == sent[other.SOPInstanceUID]
