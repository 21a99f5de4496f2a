"""Predictors: turn causal neighbours into a rounded prediction and a coding-table index.

A predictor is what a model file holds: its neighbourhood, its exact integer network, the
integer head constants and the coding tables. The codec (models.codec) needs only
``neighbourhood``, ``tables`` and :meth:`predict`.
"""

from __future__ import annotations

import hashlib
import os
import sys

import numpy as np

from models import kernels
from models.context import Neighbourhood
from models.entropy import CodingTables
from models.features import (DEFAULT_NEIGHBOURHOOD, default_features, flat_contexts,
                             fraction_bin, n_features, prediction, scale_index, take_rows)
from models.intnet import IntMLP


def compute_device() -> str:
    """Where the integer network runs: ``VOXARC_DEVICE`` (cpu, cuda, ...) or, by default, the
    GPU when there is one. The result is identical on every device (see models.intnet)."""
    want = os.environ.get("VOXARC_DEVICE", "auto")
    if want == "auto":
        want = "cpu" if _no_gpu_device() else _torch_device()
    if want.startswith("cuda"):
        import torch
        torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would round the partial sums
    return want


# what a CUDA (or ROCm) device needs on Linux; without any, torch could not find one either
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def _no_gpu_device() -> bool:
    """Whether this Linux machine has no GPU device file: then the codec need not import torch
    (over a second of every decoder process's start) to learn that it has no GPU."""
    return sys.platform.startswith("linux") and not any(map(os.path.exists, _GPU_DEVICE_FILES))


def _torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


SPARE_NETWORK = 0.125  # from this share of flat contexts on, the network skips them


def _at(bound, index):
    """A per-voxel bound (training samples) at ``index``, or the volume's scalar bound."""
    return bound[index] if np.ndim(bound) else bound


class DefaultPredictor:
    """The production model: local-reference features, integer MLP, mean and scale outputs."""

    kind = "default"

    def __init__(self, name: str, net: IntMLP, head: np.ndarray, tables: CodingTables,
                 meta: dict | None = None, neighbourhood: Neighbourhood = DEFAULT_NEIGHBOURHOOD):
        if net.layers[0].weight.shape[1] != n_features(neighbourhood):
            raise ValueError(f"network takes {net.layers[0].weight.shape[1]} inputs, the "
                             f"neighbourhood gives {n_features(neighbourhood)}")
        self.name = name
        self.neighbourhood = neighbourhood
        self.net = net
        self.head = np.asarray(head, dtype=np.int64)  # mean_mult, mean_shift, scale_mult, scale_shift
        self.tables = tables
        self.meta = meta or {}
        self.device = compute_device()
        self.float_arrays: dict[str, np.ndarray] = {}  # the float twin, for further training

    def predict(self, values: np.ndarray, valid: np.ndarray, lo: int, hi: int):
        """Rounded predictions (int64, within [lo, hi]) and table indices for ``(K, n)``
        neighbour values."""
        feats = kernels.features(values, valid, self.tables.flat, self.kernel_network()) \
            if self.uses_kernels(lo, hi) else None
        if feats is None:
            ref, s, lq, x = default_features(values, valid)
            return self.outputs(ref, s, lq, x.T, lo, hi)
        return self.kernel_outputs(feats, lo, hi)

    def predict_runs(self, buf: np.ndarray, runs: "kernels.Runs", koff: np.ndarray,
                     lo: int, hi: int):
        """:meth:`predict` of voxels whose neighbours are read in ``runs`` of the int32
        buffer ``buf`` (models.kernels.run_features), where :meth:`uses_kernels`."""
        feats = kernels.run_features(buf, runs, koff, self.tables.flat, self.kernel_network())
        return self.kernel_outputs(feats, lo, hi)

    def uses_kernels(self, lo, hi) -> bool:
        """Whether predictions for the volume range ``lo, hi`` come from the compiled kernels
        (models.kernels): when they were built, for one range per call and a network whose
        float32 accumulators are exact."""
        return kernels.available() and self.net.integer_exact and np.ndim(lo) == 0 \
            and np.ndim(hi) == 0

    def kernel_network(self) -> "kernels.Network | None":
        """The network for the compiled kernels to run in the features' pass (on the CPU, and
        when they take its widths)."""
        net = self.net.kernel_network() if self.device == "cpu" else None
        return net if net is not None and net.fits else None

    def kernel_outputs(self, feats: "kernels.Features", lo: int, hi: int):
        """:meth:`outputs` from the compiled kernel's features (when :meth:`uses_kernels`);
        flat contexts, which the kernel left out, predict their reference."""
        acc = feats.acc
        if acc is None:
            acc = self.net.float_accumulators(feats.x, self.device) if len(feats.s) \
                else np.zeros((0, 2), np.float32)
        return kernels.outputs(feats, acc, self.head, self.tables.fraction_bins,
                               self.tables.flat_index, int(lo), int(hi))

    def outputs(self, ref, s, lq, inputs, lo, hi):
        """Predictions and table indices from the features (``inputs`` is ``(n, F)``).

        With flat contexts in the tables, a context whose neighbours all equal the reference
        predicts the reference and codes with the flat row; the network only runs on the
        others when flat ones are many (it would not change their outputs). Table rows are
        ``scale index * fraction_bins + fraction bin`` (see models.entropy.row_shifts)."""
        flat = flat_contexts(s, inputs[:, :self.neighbourhood.size]) if self.tables.flat \
            else None
        if flat is None or not flat.any():
            return self._network(ref, s, lq, inputs, lo, hi)
        if flat.mean() < SPARE_NETWORK:
            pred, j = self._network(ref, s, lq, inputs, lo, hi)
        else:
            busy = np.flatnonzero(~flat)
            pred, j = np.empty(len(ref), np.int64), np.empty(len(ref), np.int64)
            pred[busy], j[busy] = self._network(ref[busy], s[busy], lq[busy],
                                                take_rows(inputs, busy), _at(lo, busy),
                                                _at(hi, busy))
        pred[flat] = np.clip(ref[flat], _at(lo, flat), _at(hi, flat))
        j[flat] = self.tables.flat_index
        return pred, j

    def _network(self, ref, s, lq, inputs, lo, hi):
        """Predictions and table rows: the scale index, and with several fraction bins per
        scale, the bin of the mean's fraction too."""
        acc = self.net(inputs, self.device)
        mm, ms, sm, ss = (int(v) for v in self.head)
        pred = prediction(ref, s, acc[:, 0], mm, ms, lo, hi)
        j = scale_index(lq, acc[:, 1], sm, ss)
        bins = self.tables.fraction_bins
        if bins > 1:
            j = j * bins + fraction_bin(s, acc[:, 0], mm, ms, bins)
        return pred, j

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"kind": np.array(self.kind), "head": self.head,
               "token_table": self.tables.tokens, "class_table": self.tables.classes}
        out.update(self.net.to_arrays("net_"))
        out.update(self.float_arrays)
        if self.neighbourhood != DEFAULT_NEIGHBOURHOOD:   # older files hold no offsets
            out["offsets"] = np.array(self.neighbourhood.offsets, dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, name: str, arrays, meta=None) -> "DefaultPredictor":
        tables = CodingTables(arrays["token_table"], arrays["class_table"])
        hood = DEFAULT_NEIGHBOURHOOD
        if "offsets" in arrays:
            hood = Neighbourhood(tuple(tuple(int(v) for v in o) for o in arrays["offsets"]))
            if hood.offsets[:DEFAULT_NEIGHBOURHOOD.size] != DEFAULT_NEIGHBOURHOOD.offsets:
                raise ValueError("a default-kind model's neighbourhood must start with the "
                                 "default one")
        predictor = cls(name, IntMLP.from_arrays(arrays, "net_"), arrays["head"], tables, meta,
                        hood)
        predictor.float_arrays = {k: v for k, v in arrays.items() if k.startswith("float_")}
        return predictor


def model_id(arrays: dict[str, np.ndarray]) -> bytes:
    """16-byte identity of a model: SHA-256 over its arrays' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.digest()[:16]
