"""Time points of multi-frame instances coded position-major (storage.frame_order): the order
in the blob, the groups assembly makes, exact instances and frames back, deletion, recoding,
and an index written before the blob rows recorded the order."""

from types import SimpleNamespace as Row

import numpy as np
import pytest
from sqlalchemy import select, text

import models
from node_helpers import archive, make_series, make_time_points, store_series  # noqa: F401
from storage import header_pack, reports
from storage.archive import Archive
from storage.assembly import assemble
from storage.frame_order import instance_major, position_major
from storage.index import Blob, Instance
from storage.reconstruct import WHOLE

FMT = "multiframe|10x10|int16|1.2.840.10008.1.2.1|none"


def _in_time(series):
    return sorted(series, key=lambda ds: ds.InstanceNumber)


def _pixels(ds, frames: int, size: int) -> np.ndarray:
    return np.frombuffer(ds.PixelData, np.int16).reshape(frames, size, size)


def _volume_blob(arch) -> Blob:
    with arch.index.read() as s:
        (blob,) = s.scalars(select(Blob).where(Blob.codec.in_(header_pack.VOLUME_CODECS)))
        return blob


def test_the_two_orders_are_inverse_and_position_major_puts_time_points_together():
    logical = np.arange(3 * 4 * 2 * 2).reshape(12, 2, 2)     # 3 time points of 4 frames
    coded = position_major(logical, 3)
    assert [int(s[0, 0]) // 4 for s in coded] == [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11]
    assert np.array_equal(instance_major(coded, 3), logical)
    assert position_major(logical, 1) is logical


def test_time_points_are_coded_position_major_and_come_back_exactly(archive):
    series = make_time_points(9, 5, 12, seed=7)
    sent = store_series(archive, series)
    assert archive.compact(stable_age=0) == (1, 0)
    blob = _volume_blob(archive)
    assert blob.interleave == 9 and blob.shape == "45,12,12" and blob.slab == 9  # a position each
    coded = models.decode_volume(header_pack.coded_view(archive.blobs.get(blob.key)))
    in_time = _in_time(series)
    for t, ds in enumerate(in_time):       # slice z*9 + t of the blob: frame z of time point t
        assert np.array_equal(coded[t::9], _pixels(ds, 5, 12))
    with archive.index.read() as s:
        starts = {r.sop_uid: r.frame_start for r in s.scalars(select(Instance))}
    assert [starts[ds.SOPInstanceUID] for ds in in_time] == list(range(0, 45, 5))
    (shown,) = reports.series_detail(archive.index, series[0].SeriesInstanceUID)["blobs"]
    assert (shown["time_points"], shown["slab"]) == (9, 9)

    uids = [ds.SOPInstanceUID for ds in series]
    ordered, prefetch = archive.plan_retrieval(uids)
    assert ordered == [ds.SOPInstanceUID for ds in in_time]
    prefetch.thread.join(60)
    assert archive.reconstructor.cache.peek((blob.key, WHOLE)) is not None
    for uid, data in sent.items():
        assert archive.retrieve(uid).data == data
    got = archive.frames(in_time[3].SOPInstanceUID, [1, 5])
    assert [bytes(f) for f in got] == [_pixels(in_time[3], 5, 12)[k].tobytes() for k in (0, 4)]


def test_a_cold_instance_of_a_position_major_stack_comes_back_without_a_plan(archive):
    series = make_time_points(4, 3, 10, seed=8)
    sent = store_series(archive, series)
    archive.compact(stable_age=0)
    last = _in_time(series)[-1].SOPInstanceUID
    assert archive.retrieve(last).data == sent[last]
    assert archive.frames(last, [2]) == [memoryview(_pixels(_in_time(series)[-1], 3, 10)[1]
                                                    .tobytes())]


def test_deleting_a_time_point_restages_the_others_exactly(archive):
    series = make_time_points(5, 4, 10, seed=9)
    sent = store_series(archive, series)
    archive.compact(stable_age=0)
    gone = _in_time(series)[2].SOPInstanceUID
    archive.delete("instance", gone)
    del sent[gone]
    assert archive.stats()["pending_instances"] == 4
    assert all(archive.retrieve(uid).data == data for uid, data in sent.items())
    archive.compact(stable_age=0)
    assert _volume_blob(archive).interleave == 4
    assert all(archive.retrieve(uid).data == data for uid, data in sent.items())


def _row(uid, number, frames=10, fmt=FMT):
    return Row(sop_uid=uid, instance_number=number, stack_format=fmt, frames=frames,
               position=None)


def test_assembly_groups_time_points_by_size_and_no_fewer_than_the_encoder_adapts_to(
        monkeypatch):
    from storage import assembly
    rows = [_row(f"t{k:02d}", k) for k in range(25)]          # 1,000 voxels a time point
    stacks, singles = assemble(list(reversed(rows)), adapt_voxels=10_001)
    assert singles == [] and [(len(st.members), st.interleave) for st in stacks] == [(25, 25)]
    monkeypatch.setattr(assembly, "GROUP_VOXELS", 8_000)       # groups of about 8 time points
    stacks, _ = assemble(list(reversed(rows)), adapt_voxels=5_001)
    assert [(len(st.members), st.interleave) for st in stacks] == [(6, 6), (6, 6), (7, 7), (6, 6)]
    stacks, _ = assemble(rows, adapt_voxels=10_001)            # but at least 11 each
    assert [(len(st.members), st.interleave) for st in stacks] == [(12, 12), (13, 13)]
    assert [m.sop_uid for st in stacks for m in st.members] == [r.sop_uid for r in rows]
    # fewer time points than the encoder adapts to: one group of them all, still interleaved
    stacks, _ = assemble(rows[:4], adapt_voxels=10_001)
    assert [(len(st.members), st.interleave) for st in stacks] == [(4, 4)]
    # a slab per position: at most 256 time points a group, however small they are
    many = [_row(f"m{k:03d}", k) for k in range(600)]
    stacks, _ = assemble(many, adapt_voxels=10_000_000)
    assert [st.interleave for st in stacks] == [200, 200, 200]


@pytest.mark.parametrize("rows, why", [
    ([_row("a", 1), _row("b", 2, frames=9), _row("c", 3)], "unequal frames"),
    ([_row("a", 1, frames=1), _row("b", 2, frames=1)], "single frames"),
    ([_row("a", 1), _row("b", 2)], "time points as large as the threshold"),
])
def test_what_is_not_a_small_equal_time_point_stacks_in_instance_order(rows, why):
    stacks, _ = assemble(rows, adapt_voxels=1000 if "large" in why else 10_001)
    assert [st.interleave for st in stacks] == [1], why
    assert [m.sop_uid for m in stacks[0].members] == [r.sop_uid for r in rows]


def test_an_index_written_before_the_order_was_recorded_is_upgraded(archive, tmp_path):
    series = make_time_points(3, 4, 10, seed=10)
    sent = store_series(archive, series)
    archive.compact(stable_age=0)
    url, data_dir = archive.index.url, archive.blobs.root.parent
    with archive.index.engine.begin() as conn:      # as an index of 2026-12-04 has it
        conn.execute(text("UPDATE blobs SET interleave = 1"))
        conn.execute(text("ALTER TABLE blobs DROP COLUMN interleave"))
    archive.close()
    again = Archive(data_dir, url)
    try:
        with again.index.read() as s:
            assert list(s.scalars(select(Blob.interleave))) == [1]
        with again.index.engine.begin() as conn:    # what compaction wrote
            conn.execute(text("UPDATE blobs SET interleave = 3"))
        assert all(again.retrieve(uid).data == data for uid, data in sent.items())
    finally:
        again.close()


def _flat(uid, number, position):
    return Row(sop_uid=uid, instance_number=number, stack_format="10x10|int16|x|none",
               frames=1, position=position)


def test_a_4d_series_of_single_frames_stacks_whole_positions_a_slab_each():
    rows = [_flat(f"p{p}t{t}", 100 * t + p, -2.5 * p) for p in range(7) for t in range(9)]
    stacks, singles = assemble(rows[::-1], max_slices=30)
    assert singles == []
    # 30 slices are 3.3 positions of 9: stacks of 3 positions (27), the last of the rest
    assert [(st.slices, st.slab) for st in stacks] == [(27, 9), (27, 9), (9, 9)]
    for st in stacks:
        for k in range(0, st.slices, 9):  # each slab one position's time points, in time order
            assert [m.sop_uid for m in st.members[k:k + 9]] == \
                [f"p{st.members[k].sop_uid[1]}t{t}" for t in range(9)]
    # positions seen unequally often, each once, or fewer times than a default slab's 8
    # slices: runs of max_slices, the coder's slabs
    for odd in (rows[:-1], [r for r in rows if r.sop_uid.endswith("t0")],
                [r for r in rows if int(r.sop_uid[3:]) < 7]):
        assert {st.slab for st in assemble(odd, max_slices=30)[0]} == {0}
    # 8 images of 512 x 512 a position fit a slab of the default's voxels, 9 do not
    for t, slab in ((8, 8), (9, 0)):
        big = [Row(sop_uid=f"b{p}t{k}", instance_number=k, frames=1, position=float(p),
                   stack_format="512x512|int16|x|none") for p in range(3) for k in range(t)]
        assert {st.slab for st in assemble(big, max_slices=30)[0]} == {slab}


def test_a_4d_series_of_single_frames_comes_back_exactly_from_slabs_of_its_positions(archive):
    series = _repeated_positions(3, 9, 10, seed=12)   # 3 positions x 9 time points
    sent = store_series(archive, series)
    archive.compact(stable_age=0)
    blob = _volume_blob(archive)
    assert blob.slab == 9 and blob.interleave == 1 and blob.shape == "27,10,10"
    assert all(archive.retrieve(uid).data == data for uid, data in sent.items())
    starts = _frame_starts(archive, series)
    assert starts[:3] == [0, 9, 18]      # InstanceNumber k: position k % 3, a slab each


def _repeated_positions(positions: int, times: int, size: int, seed: int, contrasts=False):
    """Single frames of ``positions`` places, each ``times`` times (InstanceNumber k: place
    k % positions, repetition k // positions): time points of one anatomy, or with
    ``contrasts`` each repetition another contrast (echoes, b-values)."""
    rng = np.random.default_rng(seed)
    anatomy = np.cumsum(rng.normal(0, 40, (positions, size, size)), axis=0) + 1500
    series = sorted(make_series(positions * times, size, size, seed=seed),
                    key=lambda d: d.InstanceNumber)
    for k, ds in enumerate(series):
        p, r = k % positions, k // positions
        ds.ImagePositionPatient = [0, 0, 2.5 * p]
        image = (4000 - 3 * anatomy[p]) * (1 + r) / 2 if contrasts and r % 2 else anatomy[p]
        ds.PixelData = np.round(image + rng.normal(0, 2, image.shape)).astype(np.int16).tobytes()
    return series


def _frame_starts(archive, series) -> list[int]:
    with archive.index.read() as s:
        starts = {r.sop_uid: r.frame_start for r in s.scalars(select(Instance))}
    return [starts[ds.SOPInstanceUID] for ds in series]


@pytest.mark.parametrize("times", [2, 9])
def test_repetitions_of_other_contrasts_at_each_position_are_coded_one_after_the_other(
        archive, times):
    series = _repeated_positions(12, times, 10, seed=13, contrasts=True)
    sent = store_series(archive, series)
    archive.compact(stable_age=0)
    blob = _volume_blob(archive)
    assert (blob.slab, blob.interleave) == (12, 1)      # a slab per repetition
    # repetition r of position p at r * 12 + p: each repetition a volume of its own
    assert _frame_starts(archive, series) == list(range(12 * times))
    assert all(archive.retrieve(uid).data == data for uid, data in sent.items())


def test_a_few_similar_images_at_each_position_stay_together(archive):
    series = _repeated_positions(12, 3, 10, seed=14)
    sent = store_series(archive, series)
    archive.compact(stable_age=0)
    assert _volume_blob(archive).slab == 8
    assert _frame_starts(archive, series)[:3] == [0, 3, 6]      # position-major
    assert all(archive.retrieve(uid).data == data for uid, data in sent.items())


def test_a_retrievals_first_instance_goes_out_before_its_stack_is_decoded(archive, monkeypatch):
    """A plan decodes its first instance's time point first (the first slices of each slab),
    then the rest of the stack, in one decode (no slice twice): the first instance does not
    wait for the rest, and nothing else decodes the stack meanwhile."""
    import threading
    from storage.reconstruct import Reconstructor
    series = make_time_points(9, 5, 12, seed=13)
    sent = store_series(archive, series)
    archive.compact(stable_age=0)
    archive.reconstructor = Reconstructor(archive.index, archive.blobs)      # cold cache
    first_sent, pieces_of = threading.Event(), models.decode_with_slab_slices

    def held(blob, k):
        pieces = pieces_of(blob, k)
        yield next(pieces)
        if not first_sent.wait(10):
            raise AssertionError("the whole stack was needed before the first instance")
        yield next(pieces)

    def again(*args):
        raise AssertionError("the stack decoded a second time")
    monkeypatch.setattr(models, "decode_with_slab_slices", held)
    monkeypatch.setattr(models, "decode_volume", again)
    monkeypatch.setattr(models, "decode_slab_slices", again)
    ordered, prefetch = archive.plan_retrieval(list(sent))
    assert archive.retrieve(ordered[0]).data == sent[ordered[0]]
    first_sent.set()
    assert all(archive.retrieve(uid).data == sent[uid] for uid in ordered[1:])
    prefetch.thread.join(30)
    assert not prefetch.thread.is_alive() and archive.reconstructor._points == {}
    cached = list(archive.reconstructor.cache._items)
    assert cached and all(key[1] == WHOLE for key in cached)   # the time point not kept apart


def test_a_stack_a_slab_per_position_keeps_its_stream_groups_to_a_quarter_of_the_time_points(
        archive):
    """Its time points are read one at a time (a retrieval's first instance first), and one
    decodes its stream group in every slab: groups of at most a quarter of them."""
    from storage.frame_order import point_group
    assert (point_group(20, 20), point_group(9, 9), point_group(7, 7), point_group(9, 8)) \
        == (5, 2, 1, None)
    sent = store_series(archive, make_time_points(12, 4, 16, seed=14))
    archive.compact(stable_age=0)
    with archive.index.read() as s:
        (blob,) = s.scalars(select(Blob).where(Blob.interleave > 1))
    info = models.blob_info(header_pack.coded_view(archive.blobs.get(blob.key)))
    assert (info["slab"], info["stream_group"]) == (12, 3)      # slices alone would allow 12
    assert all(archive.retrieve(uid).data == data for uid, data in sent.items())


def test_a_column_another_process_added_meanwhile_is_not_an_error(tmp_path, monkeypatch):
    """Two processes opening an older index at once: the second one's ALTER fails because
    the first one's went through in between; that is no reason not to start."""
    from sqlalchemy import create_engine
    from storage import index as index_module
    url = f"sqlite:///{tmp_path / 'index.db'}"
    index_module.Index(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE blobs DROP COLUMN interleave"))
    before = index_module.inspect(engine)         # what the second process saw first
    seen = {name: before.get_columns(name) for name in before.get_table_names()}

    class Stale:
        def has_table(self, name):
            return name in seen

        def get_columns(self, name):
            return seen[name]
    looks = [Stale()]
    with engine.begin() as conn:                  # then the first process added it
        conn.execute(text("ALTER TABLE blobs ADD COLUMN interleave INTEGER NOT NULL DEFAULT 1"))
    real = index_module.inspect
    monkeypatch.setattr(index_module, "inspect", lambda e: looks.pop() if looks else real(e))
    assert index_module.add_missing_columns(engine) == []
    engine.dispose()
