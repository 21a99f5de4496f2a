"""Recoding stored stacks of an older blob format with today's codec (storage.recode and
`voxarc compress --recode`)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

import models
from models import api, value_range
from node_helpers import (archive, lose_commit_answer, make_series,  # noqa: F401
                          store_series)
from storage import header_pack
from storage.archive import Archive
from storage.index import Blob, Instance
from storage.recode import RecodeError

REPO = Path(__file__).resolve().parents[1]


def padded_ct_series(n=6, size=48, seed=0):
    """A CT series whose air is clipped at 0 and whose corners hold -2000 (padding): blob
    format 4 codes it smaller than format 3."""
    rng = np.random.default_rng(seed)
    series = make_series(n, size, size, seed=seed)
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    for ds in series:
        pix = np.maximum(np.round(np.where(x ** 2 + y ** 2 < 0.3, 900.0, 3.0)
                                  + rng.normal(0, 10, (size, size))), 0)
        pix[x ** 2 + y ** 2 > 0.85] = -2000
        ds.PixelData = pix.astype(np.int16).tobytes()
    return series


@pytest.fixture
def format_3(monkeypatch):
    """Compaction writes blob format 3 (coded within the dtype's range) while this is active."""
    monkeypatch.setattr(api, "WRITE_FORMAT", 3)
    monkeypatch.setattr(value_range, "scan", lambda v: value_range.ValueRange.of_dtype(v.dtype))
    return monkeypatch


def _blob(arch) -> Blob:
    with arch.index.read() as s:
        (blob,) = s.scalars(select(Blob).where(Blob.codec.in_(header_pack.VOLUME_CODECS)))
        return blob


def _format(arch, blob: Blob) -> int:
    return models.blob_info(header_pack.coded_view(arch.blobs.get(blob.key)))["format"]


def test_recoding_brings_an_old_stack_to_today_and_every_instance_back_exact(archive,
                                                                               format_3):
    sent = store_series(archive, padded_ct_series())
    assert archive.compact(stable_age=0) == (1, 0)
    old = _blob(archive)
    assert _format(archive, old) == 3
    before = archive.stats()["stored_bytes"]
    format_3.undo()
    recoder = archive.recoder()
    assert recoder.volume_blobs() == [old.id]
    done = recoder.recode(old.id)
    assert done.state == "recoded" and done.old_format == 3 and done.new_bytes < done.old_bytes
    new = _blob(archive)
    assert new.key != old.key and not archive.blobs.exists(old.key)
    assert _format(archive, new) == 6 and "format 6" in new.codec_info
    assert header_pack.pack_bytes(new.codec_info) > 0
    assert archive.stats()["stored_bytes"] == before - (done.old_bytes - done.new_bytes)
    with archive.index.read() as s:
        assert s.scalar(select(func.count()).where(Instance.blob_fk == new.id)) == len(sent)
    for uid, data in sent.items():
        assert archive.retrieve(uid).data == data
    assert recoder.recode(new.id).state == "current"      # nothing left to do


@pytest.mark.parametrize("really_commit", [True, False])
def test_a_recode_whose_commit_answer_is_lost_loses_nothing(tmp_path, format_3, really_commit):
    arch = Archive(tmp_path / "data")
    try:
        sent = store_series(arch, padded_ct_series())
        assert arch.compact(stable_age=0) == (1, 0)
        old = _blob(arch)
        format_3.undo()
        lose_commit_answer(arch.index, format_3, really_commit)
        if really_commit:
            assert arch.recoder().recode(old.id).state == "recoded"
        else:
            with pytest.raises(OperationalError):
                arch.recoder().recode(old.id)
        assert (_blob(arch).key != old.key) == really_commit
        assert len(list(arch.blobs.keys())) == 1      # the blob in use, no orphan
        for uid, data in sent.items():
            assert arch.retrieve(uid).data == data
    finally:
        arch.close()


def test_a_new_blob_that_is_not_smaller_is_not_kept(archive, format_3, monkeypatch):
    store_series(archive, padded_ct_series(4, 32, seed=1))
    archive.compact(stable_age=0)
    format_3.undo()
    old = _blob(archive)
    encode = models.encode_volume
    monkeypatch.setattr(models, "encode_volume",      # a poor coding: one-voxel tiles
                        lambda vol, **kw: encode(vol, tile=(1, 1), adapt=False))
    done = archive.recoder().recode(old.id)
    assert done.state == "kept" and done.new_bytes >= done.old_bytes
    assert _blob(archive).key == old.key and archive.blobs.exists(old.key)


def test_an_old_stack_format_4_would_not_shrink_is_not_coded_again(archive, format_3,
                                                                     monkeypatch):
    """An MR's background at the uint16 floor, no padding: format 4 changes nothing there."""
    series = make_series(4, 24, 24, dtype="uint16", seed=5)
    for ds in series:
        rng = np.random.default_rng(int(ds.InstanceNumber))
        ds.PixelData = np.abs(rng.normal(0, 30, (24, 24))).astype(np.uint16).tobytes()
    store_series(archive, series)
    archive.compact(stable_age=0)
    format_3.undo()
    monkeypatch.setattr(api, "SMALL_SLICE_VOXELS", 0)    # slices too large to share streams

    def no_encoding(*args, **kwargs):
        raise AssertionError("coded again")

    monkeypatch.setattr(models, "encode_volume", no_encoding)
    old = _blob(archive)
    done = archive.recoder().recode(old.id)
    assert done.state == "current" and done.old_format == 3 and _blob(archive).key == old.key


def test_a_format_4_stack_of_todays_model_is_not_coded_again(archive, monkeypatch):
    """Format 5 codes the same bits as format 4 (its tokens in two stages, for speed): a new
    blob would be no smaller, so none is made."""
    monkeypatch.setattr(api, "WRITE_FORMAT", 4)
    store_series(archive, padded_ct_series(4, 32, seed=6))
    archive.compact(stable_age=0)
    old = _blob(archive)
    assert _format(archive, old) == 4
    monkeypatch.undo()
    monkeypatch.setattr(api, "SMALL_SLICE_VOXELS", 0)    # slices too large to share streams

    def no_encoding(*args, **kwargs):
        raise AssertionError("coded again")

    monkeypatch.setattr(models, "encode_volume", no_encoding)
    done = archive.recoder().recode(old.id)
    assert done.state == "current" and done.old_format == 4 and _blob(archive).key == old.key


def test_a_format_5_stack_of_small_slices_is_recoded_into_stream_groups(archive, monkeypatch):
    """Format 6 lets small slices share streams: the same bits in fewer streams, so a format 5
    stack of 32 x 32 slices comes out smaller, and every instance back exact."""
    monkeypatch.setattr(api, "WRITE_FORMAT", 5)
    sent = store_series(archive, padded_ct_series(6, 32, seed=8))
    archive.compact(stable_age=0)
    old = _blob(archive)
    assert _format(archive, old) == 5
    monkeypatch.undo()
    done = archive.recoder().recode(old.id)
    assert done.state == "recoded" and done.old_format == 5 and done.new_bytes < done.old_bytes
    new = _blob(archive)
    coded = header_pack.coded_view(archive.blobs.get(new.key))
    assert models.blob_info(coded)["format"] == 6 and models.blob_info(coded)["stream_group"] > 1
    for uid, data in sent.items():
        assert archive.retrieve(uid).data == data
    assert archive.recoder().recode(new.id).state == "current"


def test_a_damaged_stack_is_left_as_it_is(archive, format_3):
    sent = store_series(archive, padded_ct_series(4, 32, seed=2))
    archive.compact(stable_age=0)
    format_3.undo()
    old = _blob(archive)
    path = archive.blobs.path(old.key)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(RecodeError, match="SHA-256"):
        archive.recoder().recode(old.id)
    assert _blob(archive).key == old.key and path.read_bytes() == bytes(data)
    assert len(sent) == 4


def test_retrieval_follows_a_stack_recoded_after_it_was_located(archive, format_3):
    """The index said where the instance was; its file went before it was read (the recoder
    committed the new blob and removed the old file): retrieval locates it again."""
    sent = store_series(archive, padded_ct_series(4, 32, seed=3))
    archive.compact(stable_age=0)
    format_3.undo()
    old = _blob(archive)
    get, recoded = archive.blobs.get, []

    def get_after_recoding(key):
        if key == old.key and not recoded:
            recoded.append(None)                       # (the recoder reads it through here)
            recoded[0] = archive.recoder().recode(old.id)
        return get(key)

    format_3.setattr(archive.blobs, "get", get_after_recoding)
    uid = next(iter(sent))
    assert archive.retrieve(uid).data == sent[uid]
    assert recoded[0].state == "recoded" and not archive.blobs.exists(old.key)


def test_voxarc_compress_recode(tmp_path, format_3):
    data = tmp_path / "data"
    arch = Archive(data)
    sent = store_series(arch, padded_ct_series(6, 40, seed=4))
    arch.compact(stable_age=0)
    arch.close()
    format_3.undo()

    def voxarc(*args):
        return subprocess.run([sys.executable, "-m", "service.cli", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    before = json.loads(voxarc("stats", "--json", "--data-dir", data).stdout)["stored_bytes"]
    proc = voxarc("compress", "--recode", "--data-dir", data)
    assert proc.returncode == 0, proc.stderr
    assert "recode: 1 of 1 stacks recoded" in proc.stderr
    after = json.loads(voxarc("stats", "--json", "--data-dir", data).stdout)["stored_bytes"]
    assert after < before
    proc = voxarc("compress", "--recode", "--data-dir", data)
    assert "0 of 1 stacks recoded" in proc.stderr and "1 already current" in proc.stderr
    arch = Archive(data)
    try:
        for uid, raw in sent.items():
            assert arch.retrieve(uid).data == raw
    finally:
        arch.close()


def test_recoding_a_position_major_stack_keeps_its_order(archive, format_3):
    from node_helpers import make_time_points

    from storage import compaction
    # format 3 codes these padded 48 x 48 frames in more bytes than deflating each time point
    # does, and compaction would then store them one by one: keep the codec's blob to recode
    format_3.setattr(compaction, "DEFLATE_GATE", 0.0)
    series = make_time_points(6, 5, 48, seed=11)
    for ds in series:            # time points of the padded CT: format 5 codes them smaller
        # (the same noise in each: time points closer than neighbouring slices)
        ds.PixelData = b"".join(f.PixelData for f in padded_ct_series(5, 48, 1))
    sent = store_series(archive, series)
    assert archive.compact(stable_age=0) == (1, 0)
    old = _blob(archive)
    assert old.interleave == 6 and _format(archive, old) == 3
    format_3.undo()
    done = archive.recoder().recode(old.id)
    assert done.state == "recoded"
    new = _blob(archive)
    assert new.interleave == 6 and new.key != old.key
    for uid, data in sent.items():
        assert archive.retrieve(uid).data == data
