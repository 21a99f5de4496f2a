"""`voxarc train --model default` trains, writes weights and a model card that the codec reads."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from models.codec import decode_slabs, encode_slab
from models.features import NEIGHBOURHOODS
from models.registry import _read
from service.cli import main


@pytest.mark.parametrize("hood", ["default", "wide"])
def test_train_default_writes_a_usable_model(tmp_path, hood):
    series = tmp_path / "series"
    series.mkdir()
    (series / "ct.dcm").write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    out = tmp_path / "weights"
    assert main(["train", "--model", "default", str(series), "--out", str(out), "--epochs", "1",
                 "--hidden", "8,8", "--keep", "1.0", "--slabs-per-volume", "1",
                 "--neighbourhood", hood]) == 0
    card = (out / "default.md").read_text()
    assert "default" in card and "voxarc train" in card
    predictor = _read(out / "default.npz")
    assert predictor.float_arrays and predictor.net.layers[0].weight.shape[0] == 8
    assert predictor.neighbourhood == NEIGHBOURHOODS[hood]
    assert predictor.net.layers[0].weight.shape[1] == NEIGHBOURHOODS[hood].size + 5
    vol = np.random.default_rng(0).integers(0, 4000, (3, 20, 24)).astype(np.uint16)
    payload = encode_slab(predictor, vol, 0, 65535, 8, (8, 16))
    (back,) = decode_slabs(predictor, [payload], [3], 20, 24, 0, 65535, 8, (8, 16))
    np.testing.assert_array_equal(back, vol)
