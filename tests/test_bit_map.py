"""Where the bits go (models.bit_map, `voxarc bits`): the per-voxel code lengths add up to what
the encoder writes, and fall where the volume is hard to predict."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import models
from models import bit_map
from node_helpers import make_series, write_series

REPO = Path(__file__).resolve().parents[1]


def _volume(dtype="int16", seed=0, shape=(12, 72, 80)):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    smooth = 300 + 200 * np.sin(x / 9.0) * np.cos(y / 13.0) + 30 * z
    vol = smooth + rng.normal(0, 5, shape)
    vol[:, :, :12] = 0                       # a flat border, as CT padding or MR background
    return np.clip(vol, 0, None).astype(dtype)


@pytest.mark.parametrize("dtype", ["int16", "uint16"])
def test_the_bits_add_up_to_the_blob(dtype):
    vol = _volume(dtype)
    blob = models.encode_volume(vol, adapt=False)
    predictor, values = bit_map.predictor_for(vol)
    bits = bit_map.volume_bits(vol, predictor, values)
    assert 0.97 < bits.sum() / (8 * len(blob)) < 1.0      # the blob adds headers and CRCs
    assert np.array_equal(bit_map.slice_bits(vol, 9, predictor, values), bits[9])
    assert bits[:, :, :8].mean() < 0.1 and bits[:, :, 20:].mean() > 1


def test_noise_costs_bits_and_a_plane_does_not():
    vol = np.full((8, 64, 64), 500, np.int16)
    vol[:, :, :32] += np.random.default_rng(1).integers(-40, 40, (8, 64, 32)).astype(np.int16)
    predictor, values = bit_map.predictor_for(vol)
    bits = bit_map.slice_bits(vol, 4, predictor, values)
    assert bits[:, :28].mean() > 5 and bits[:, 36:].mean() < 0.5


def test_voxarc_bits(tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "series"
    write_series(make_series(10, 48, 48, seed=2), folder)
    pytest.importorskip("imagecodecs")
    out = subprocess.run([sys.executable, "-m", "service.cli", "bits", str(folder), "--slice",
                          "8", "--out", str(tmp_path / "map.png"), "--json", "--anchor",
                          "jpegls"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["shape"] == [10, 48, 48] and result["slice"] == 8
    assert len(result["profile"]) == 10 and result["bits_per_voxel"] > 0
    assert len(result["anchor_profile"]) == 10 and 0 <= result["slices_above_anchor"] <= 10
    assert result["ratio"] == pytest.approx(result["bits_per_voxel"] /
                                            result["anchor_bits_per_voxel"], rel=1e-3)
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "service.cli", "bits", str(folder), "--slice",
                          "10"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "outside" in bad.stderr


def test_voxarc_bits_of_a_numpy_volume(tmp_path):
    """The same analysis of a .npy volume; a file of floats is refused plainly (exit 2)."""
    vol = np.full((6, 40, 40), 500, np.int16)
    vol += np.random.default_rng(3).integers(-20, 20, vol.shape).astype(np.int16)
    np.save(tmp_path / "vol.npy", vol)
    out = subprocess.run([sys.executable, "-m", "service.cli", "bits", str(tmp_path / "vol.npy"),
                          "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["shape"] == [6, 40, 40] and result["series"] == "vol"
    np.save(tmp_path / "float.npy", vol.astype(np.float32))
    bad = subprocess.run([sys.executable, "-m", "service.cli", "bits",
                          str(tmp_path / "float.npy")], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "float32" in bad.stderr
