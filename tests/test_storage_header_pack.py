"""Header packs: a coded stack's headers stored once, together, in front of its codec blob."""

import numpy as np
import pytest
from sqlalchemy import select

from node_helpers import archive, make_series, store_series  # noqa: F401 (fixture)
from storage import header_pack, reports
from storage.errors import IntegrityError
from storage.index import Blob, Instance


def _series_with_private_block(n=6, size=40_000):
    """A series whose instances repeat a large private element (as MR vendors do)."""
    block = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8).tobytes()
    series = make_series(n, 16, 12)
    for ds in series:
        ds.add_new(0x00191010, "OB", block)
    return series


def test_pack_round_trip_and_damage():
    headers = {0: (b"a" * 100, b"z"), 1: (b"b" * 70_000, b""), 5: (b"", b"tail")}
    blob = header_pack.wrap(headers, b"CODEC-BLOB")
    assert header_pack.unpack(blob) == headers
    assert header_pack.coded_part(blob) == b"CODEC-BLOB"
    assert header_pack.coded_part(b"VXA-not-a-pack") == b"VXA-not-a-pack"
    view = header_pack.coded_view(blob)          # the same bytes, without a copy
    assert isinstance(view, memoryview) and view.tobytes() == b"CODEC-BLOB"
    assert header_pack.coded_view(b"VXA-not-a-pack").tobytes() == b"VXA-not-a-pack"
    for bad in (blob[:20], blob[:8] + bytes([blob[8] ^ 1]) + blob[9:], b"VXHP\x02" + blob[5:]):
        with pytest.raises(header_pack.HeaderPackError):
            header_pack.unpack(bad)


def test_compaction_stores_repeated_headers_once(archive):
    series = _series_with_private_block()
    sent = store_series(archive, series)
    assert archive.compact(stable_age=0) == (1, 0)
    with archive.index.read() as s:
        (blob,) = s.scalars(select(Blob)).all()
        columns = s.execute(select(Instance.header_before, Instance.header_after)).all()
    assert blob.codec == header_pack.CODEC
    assert all(not before and not after for before, after in columns)
    # six copies of a 40 kB private block cost about one copy
    stats = archive.stats() | reports.bits_per_voxel(archive.index)
    assert stats["stored_bytes"] < 40_000 * 1.5
    # the codec's bits per voxel count pixels only, not the pack in front of them
    assert 0 < stats["bits_per_voxel"] < 16 and header_pack.pack_bytes(blob.codec_info) > 0
    for uid, data in sent.items():
        assert archive.retrieve(uid).data == data


def test_blobs_of_the_plain_volume_codec_still_read(archive):
    """Archives written before header packs: codec "volume", headers in the index."""
    sent = store_series(archive, make_series(4, 12, 10))
    archive.compact(stable_age=0)
    with archive.index.write() as s:
        blob = s.scalars(select(Blob)).one()
        stored = archive.blobs.get(blob.key)
        packed = header_pack.unpack(stored)
        archive.blobs.put(blob.key, header_pack.coded_part(stored))
        blob.codec = "volume"
        for row in s.scalars(select(Instance)):
            row.header_before, row.header_after = packed[row.frame_start]
    for uid, data in sent.items():  # nothing of this blob was read (or cached) before
        assert archive.retrieve(uid).data == data


def test_damaged_pack_is_never_sent(archive):
    sent = store_series(archive, make_series(3, 12, 10))
    archive.compact(stable_age=0)
    with archive.index.read() as s:
        key = s.scalars(select(Blob.key)).one()
    stored = archive.blobs.get(key)
    archive.blobs.put(key, stored[:30] + bytes([stored[30] ^ 0x40]) + stored[31:])
    for uid in sent:
        with pytest.raises(IntegrityError):
            archive.retrieve(uid)


@pytest.mark.parametrize("adapt", [True, False])
def test_codec_adapt_setting_reaches_the_encoder(tmp_path, monkeypatch, adapt):
    """``codec_adapt`` (archive ``adapt``): False never fine-tunes, whatever the stack's size."""
    from models import api
    from storage.archive import Archive
    calls = []
    monkeypatch.setattr(api, "ADAPT_VOXELS", 1)          # every stack is "large"
    monkeypatch.setattr(api.adaptation, "adapt", lambda *a, **k: calls.append(a) and None)
    arch = Archive(tmp_path / "data", adapt=adapt)
    try:
        sent = store_series(arch, make_series(5, 12, 10))
        arch.compact(stable_age=0)
        assert len(calls) == (1 if adapt else 0)
        for uid, data in sent.items():
            assert arch.retrieve(uid).data == data
    finally:
        arch.close()


def test_codec_slab_setting_reaches_the_blobs(tmp_path):
    """``codec_slab`` (archive ``slab``): the random-access granularity of coded stacks."""
    from storage.archive import Archive
    arch = Archive(tmp_path / "data", slab=3)
    try:
        sent = store_series(arch, make_series(7, 12, 10))
        arch.compact(stable_age=0)
        with arch.index.read() as s:
            blob = s.scalars(select(Blob)).one()
        assert blob.slab == 3
        for uid, data in sent.items():
            assert arch.retrieve(uid).data == data
    finally:
        arch.close()
    with pytest.raises(ValueError):
        Archive(tmp_path / "other", slab=0)
