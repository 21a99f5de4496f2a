"""Every compute path gives the same voxels and the same bytes.

The integer network runs in the compiled kernels (CPU), in torch on the CPU (kernels switched
off) and in torch on the GPU when there is one (``VOXARC_DEVICE``, default: the GPU). A blob
written on one machine must decode on any other, so each path must equal the int64 reference
and the others exactly. On a machine without CUDA the GPU cases are simply not generated;
on one with it (the device check of docs/gpu-check.md) they run with the rest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import models
from models import adapt, kernels, registry
from models.intnet import INPUT_MAX
from models.container import unpack_header
from models.registry import load_model

GOLDEN = Path(__file__).parent / "golden"
BUILT = kernels.available()   # the compiled kernels (pip install with a C compiler)
# "torch-device": the network in torch on a device named other than "cpu" (the CPU's "cpu:0"),
# as on a GPU, the features still compiled: what a GPU runs, checked where there is none
PATHS = (["kernels"] if BUILT else []) + ["cpu-torch", "torch-device"] \
    + (["cuda"] if torch.cuda.is_available() else [])
DEVICES = {"cuda": "cuda", "torch-device": "cpu:0"}


def _clear_models():
    registry.load_model.cache_clear()
    registry._archived.cache_clear()
    adapt._with_embedded.cache_clear()


@pytest.fixture
def compute_path(monkeypatch):
    """Switch the codec to one compute path (fresh predictors, as a new process would get)."""

    def use(path: str) -> None:
        monkeypatch.setenv("VOXARC_DEVICE", DEVICES.get(path, "cpu"))
        monkeypatch.setenv("VOXARC_KERNELS", "numpy" if path == "cpu-torch" else "auto")
        monkeypatch.setenv("VOXARC_DECODE_WORKERS", "1")   # the workers would not see the switch
        _clear_models()

    yield use
    monkeypatch.undo()
    _clear_models()


def _sha(vol: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vol).tobytes()).hexdigest()


def _phantom(shape, dtype, seed):
    """A smooth body with noise, a padded corner and values at both ends of the dtype."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    info = np.iinfo(dtype)
    vol = 0.3 * info.max + 0.2 * info.max * np.cos(3 * x + 2 * y + z) \
        + rng.normal(0, 0.01 * info.max, shape)
    vol = np.clip(np.round(vol), info.min, info.max).astype(dtype)
    vol[:, :4, :5] = info.min
    vol[:, -1, -1] = info.max
    return vol


@pytest.mark.parametrize("path", PATHS)
def test_shipped_network_equals_int64_reference_on_each_path(path, compute_path):
    compute_path(path)
    predictor = load_model("default")
    assert predictor.device == DEVICES.get(path, "cpu")
    assert (predictor.kernel_network() is None) == (path in DEVICES)   # a device's torch layers
    assert kernels.available() == (BUILT and path != "cpu-torch")
    net = predictor.net
    rng = np.random.default_rng(7)
    n_in = net.layers[0].weight.shape[1]
    # extremes as well as typical inputs: the partial sums must stay exact at the clip
    x = np.concatenate([rng.integers(-INPUT_MAX, INPUT_MAX + 1, (30_000, n_in)),
                        rng.choice([-INPUT_MAX, INPUT_MAX], (2_000, n_in)),
                        rng.integers(-40, 41, (30_000, n_in))])
    want = net.reference(x)
    for batch in (1, 333, 8192, len(x)):
        got = np.concatenate([net(x[a:a + batch], predictor.device)
                              for a in range(0, min(len(x), 50 * batch), batch)])
        np.testing.assert_array_equal(got, want[:len(got)], err_msg=f"batch {batch}")


@pytest.mark.parametrize("path", PATHS)
def test_golden_blobs_decode_to_their_records_on_each_path(path, compute_path):
    compute_path(path)
    record = json.loads((GOLDEN / "golden.json").read_text())
    for name, want in sorted(record.items()):
        vol = models.decode_volume((GOLDEN / f"{name}.vxa").read_bytes())
        assert _sha(vol) == want["sha256"], name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, shape", [("int16", (10, 40, 52)), ("uint16", (3, 33, 17)),
                                          ("uint8", (4, 9, 70))])
def test_each_path_writes_the_same_bytes_and_reads_the_others(path, dtype, shape, compute_path):
    vol = _phantom(shape, dtype, seed=len(path) + shape[0])
    compute_path(PATHS[0])
    reference = models.encode_volume(vol, adapt=False)
    adapted = models.encode_volume(vol, adapt=True)
    compute_path(path)
    assert models.encode_volume(vol, adapt=False) == reference
    for blob in (reference, adapted):
        np.testing.assert_array_equal(models.decode_volume(blob), vol)
        np.testing.assert_array_equal(models.decode_slices(blob, 1, 2), vol[1:2])


@pytest.mark.skipif(not BUILT, reason="the compiled kernels are not built")
def test_an_adapted_blob_is_the_same_whatever_the_compiled_layers(monkeypatch):
    """The fine-tuning step runs on the widest float layers the CPU has; the runs must give the
    same blob with the AVX2 ones (a volume codes to the same bytes on every CPU the compiled
    step runs on). On a CPU without AVX-512 both are the AVX2 layers."""
    vol = _phantom((8, 96, 120), "int16", seed=3)
    monkeypatch.setenv("VOXARC_TUNE_WORKERS", "0")   # the runs in this process, which sees the env
    blobs = {}
    for layers in ("auto", "avx2"):
        monkeypatch.setenv("VOXARC_KERNELS", layers)
        blobs[layers] = models.encode_volume(vol, adapt=True)
    assert blobs["auto"] == blobs["avx2"]
    assert models.decode_volume(blobs["auto"]).tobytes() == vol.tobytes()
    assert unpack_header(blobs["auto"])[0].embedded     # it did carry an adapted model


@pytest.mark.parametrize("device_file", [False, True])
def test_default_device_asks_torch_only_where_a_gpu_device_file_exists(monkeypatch, tmp_path,
                                                                        device_file):
    """Without a GPU device file (Linux) the network runs on the CPU and torch is not asked
    (nor imported); with one, torch decides."""
    from models import predictor
    node = tmp_path / "nvidiactl"
    if device_file:
        node.write_bytes(b"")
    monkeypatch.setattr(predictor, "_GPU_DEVICE_FILES", (str(node),))
    monkeypatch.setattr(predictor, "_torch_device", lambda: "asked torch")
    monkeypatch.setattr(predictor.sys, "platform", "linux")
    monkeypatch.delenv("VOXARC_DEVICE", raising=False)
    assert predictor.compute_device() == ("asked torch" if device_file else "cpu")
    monkeypatch.setenv("VOXARC_DEVICE", "cpu")
    assert predictor.compute_device() == "cpu"
