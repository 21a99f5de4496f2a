"""`voxarc train --model default` trains, writes weights and a model card that the codec reads."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from models.codec import decode_slabs, encode_slab
from models.features import NEIGHBOURHOODS
from models.registry import _read, load_model
from service.cli import main


SMALL = ["--keep", "1.0", "--slabs-per-volume", "1"]       # every voxel of one slab
TINY_NET = ["--epochs", "1", "--hidden", "8,8"]


def _train(tmp_path, *options: str):
    """``voxarc train --model default`` on pydicom's CT_small; returns the weights folder."""
    series = tmp_path / "series"
    if not series.exists():
        series.mkdir()
        (series / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    out = tmp_path / "weights"
    assert main(["train", "--model", "default", str(series), "--out", str(out), *SMALL,
                 *options]) == 0
    return out


def _assert_round_trip(predictor, vol: np.ndarray) -> None:
    payload = encode_slab(predictor, vol, 0, 65535, 8, (8, 16))
    (back,) = decode_slabs(predictor, [payload], [len(vol)], vol.shape[1], vol.shape[2], 0,
                           65535, 8, (8, 16))
    np.testing.assert_array_equal(back, vol)


@pytest.mark.parametrize("hood", ["default", "wide"])
def test_train_default_writes_a_usable_model(tmp_path, hood):
    out = _train(tmp_path, *TINY_NET, "--neighbourhood", hood)
    card = (out / "default.md").read_text()
    assert "default" in card and "voxarc train" in card
    predictor = _read(out / "default.npz")
    assert predictor.float_arrays and predictor.net.layers[0].weight.shape[0] == 8
    assert predictor.neighbourhood == NEIGHBOURHOODS[hood]
    assert predictor.net.layers[0].weight.shape[1] == NEIGHBOURHOODS[hood].size + 5
    _assert_round_trip(predictor,
                       np.random.default_rng(0).integers(0, 4000, (3, 20, 24)).astype(np.uint16))


def test_train_with_flat_contexts_and_a_kept_network(tmp_path):
    """``--flat-contexts`` trains the network on the other contexts and adds the flat row;
    ``--network-from`` keeps a shipped network and fits only the tables."""
    out = _train(tmp_path, *TINY_NET, "--flat-contexts")
    trained = _read(out / "default.npz")
    assert trained.tables.flat and trained.net.layers[0].weight.shape[0] == 8
    _train(tmp_path, "--name", "kept", "--network-from", "default", "--flat-contexts")
    kept = _read(out / "kept.npz")
    shipped = load_model("default")
    assert kept.tables.flat and kept.neighbourhood == shipped.neighbourhood
    for a, b in zip(kept.net.layers, shipped.net.layers):
        np.testing.assert_array_equal(a.weight, b.weight)
    assert "network_from" in (out / "kept.md").read_text()
    vol = np.full((3, 20, 24), 100, np.uint16)
    vol[:, 5:15, 6:18] = np.random.default_rng(0).integers(0, 4000, (3, 10, 12))
    for predictor in (trained, kept):
        _assert_round_trip(predictor, vol)


def test_weight_bits_set_the_width_of_trained_and_requantised_networks(tmp_path):
    """A trained network takes 10-bit weights unless ``--weight-bits 8``; with
    ``--network-from``, ``--weight-bits`` quantises the shipped model's float twin afresh
    (here at 8 bits: the 10-bit shipped network's own weights are not kept)."""
    out = _train(tmp_path, *TINY_NET)
    assert np.abs(_read(out / "default.npz").net.layers[0].weight).max() == 511
    _train(tmp_path, *TINY_NET, "--name", "narrow", "--weight-bits", "8")
    narrow = _read(out / "narrow.npz")
    assert narrow.net.is_default and np.abs(narrow.net.layers[0].weight).max() == 127
    _train(tmp_path, "--name", "requant", "--network-from", "default", "--weight-bits", "8",
           "--flat-contexts", "--fraction-bins", "4")
    requant, shipped = _read(out / "requant.npz"), load_model("default")
    assert requant.net.is_default and not shipped.net.is_default
    assert [layer.weight.shape for layer in requant.net.layers] == \
        [layer.weight.shape for layer in shipped.net.layers]
    np.testing.assert_array_equal(requant.float_arrays["float_net.0.weight"],
                                  shipped.float_arrays["float_net.0.weight"])
    assert '"weight_max": 127' in (out / "requant.md").read_text()
    vol = np.random.default_rng(1).integers(0, 4000, (3, 20, 24)).astype(np.uint16)
    for predictor in (narrow, requant):
        _assert_round_trip(predictor, vol)


def test_train_on_a_numpy_volume(tmp_path):
    """A researcher's .npy volume trains a model as a series folder does."""
    from pydicom import dcmread
    np.save(tmp_path / "ct.npy", dcmread(get_testdata_file("CT_small.dcm")).pixel_array[None])
    out = tmp_path / "weights"
    assert main(["train", "--model", "default", str(tmp_path / "ct.npy"), "--out", str(out),
                 *SMALL, *TINY_NET]) == 0
    assert "ct" in (out / "default.md").read_text()
    _assert_round_trip(_read(out / "default.npz"),
                       np.random.default_rng(1).integers(0, 4000, (3, 20, 24)).astype(np.uint16))
