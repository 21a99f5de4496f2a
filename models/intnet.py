"""Exact integer MLP: int8-range weights, integer activations, power-of-two requantisation.

Every product and partial sum is an integer below 2**24, so a float32 matmul computes it
exactly whatever the summation order, batch size, thread count or device; ``floor(acc * 2**-k)``
is exact in float32 too. The result therefore equals the plain int64 numpy reference
(:meth:`IntMLP.reference`) bit for bit, which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WEIGHT_MAX = 127
ACT_MAX = 1023
INPUT_MAX = 1024
EXACT_LIMIT = 2 ** 24


@dataclass
class IntLayer:
    weight: np.ndarray   # int64 (out, in)
    bias: np.ndarray     # int64 (out,)
    shift: np.ndarray | None  # int64 (out,) for hidden layers: h = clip(acc >> shift, 0, ACT_MAX)


class IntMLP:
    """A ReLU MLP in exact integer arithmetic; the last layer returns raw accumulators."""

    def __init__(self, layers: list[IntLayer]):
        self.layers = layers
        self._check_exact()
        self._torch = None

    def _check_exact(self) -> None:
        bound = INPUT_MAX
        for layer in self.layers:
            worst = np.abs(layer.weight).sum(axis=1) * bound + np.abs(layer.bias)
            if worst.max() >= EXACT_LIMIT:
                raise ValueError("integer network could exceed 2**24: not exact in float32")
            if np.abs(layer.weight).max() > WEIGHT_MAX:
                raise ValueError("weights outside int8 range")
            bound = ACT_MAX

    # ------------------------------------------------------------------ inference
    def reference(self, x: np.ndarray) -> np.ndarray:
        """Plain int64 numpy evaluation (slow; the definition the fast path must equal)."""
        h = np.clip(np.asarray(x, dtype=np.int64), -INPUT_MAX, INPUT_MAX)
        for layer in self.layers:
            acc = h @ layer.weight.T + layer.bias
            h = acc if layer.shift is None else np.clip(acc >> layer.shift, 0, ACT_MAX)
        return h

    def _torch_params(self, device):
        if self._torch is None or self._torch[0] != device:
            params = []
            for layer in self.layers:
                w = torch.tensor(layer.weight.T, dtype=torch.float32, device=device)
                b = torch.tensor(layer.bias, dtype=torch.float32, device=device)
                k = None if layer.shift is None else torch.tensor(
                    2.0 ** -layer.shift, dtype=torch.float32, device=device)
                params.append((w, b, k))
            self._torch = (device, params)
        return self._torch[1]

    @torch.inference_mode()
    def __call__(self, x: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Fast exact evaluation with float32 matmuls of integer inputs ``(n, in)`` within
        +-INPUT_MAX (any strides); returns int64 accumulators ``(n, out)``."""
        h = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device)
        for w, b, k in self._torch_params(device):
            h = torch.addmm(b, h, w)
            if k is not None:
                h = torch.clamp_(torch.floor_(h.mul_(k)), 0, ACT_MAX)
        return h.cpu().numpy().astype(np.int64)

    # ------------------------------------------------------------------ persistence
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"{prefix}w{i}"] = layer.weight.astype(np.int8)
            out[f"{prefix}b{i}"] = layer.bias.astype(np.int64)
            if layer.shift is not None:
                out[f"{prefix}k{i}"] = layer.shift.astype(np.int8)
        return out

    @classmethod
    def from_arrays(cls, arrays, prefix: str) -> "IntMLP":
        layers, i = [], 0
        while f"{prefix}w{i}" in arrays:
            shift = arrays.get(f"{prefix}k{i}")
            layers.append(IntLayer(np.asarray(arrays[f"{prefix}w{i}"], dtype=np.int64),
                                   np.asarray(arrays[f"{prefix}b{i}"], dtype=np.int64),
                                   None if shift is None else np.asarray(shift, dtype=np.int64)))
            i += 1
        return cls(layers)


def quantize_mlp(weights: list[np.ndarray], biases: list[np.ndarray], calib: np.ndarray,
                 input_scale: float = 1.0):
    """Quantise a float ReLU MLP (``weights[i]`` is (out, in)) that takes ``calib * input_scale``.

    Per-output-channel weight scales; hidden activations get a per-channel power-of-two shift
    chosen on the calibration inputs (integers within +-INPUT_MAX). Returns the
    :class:`IntMLP` and the float scale of each output channel (real output = acc * scale).
    """
    in_scale = np.full(weights[0].shape[1], float(input_scale))  # real input = h_int * in_scale
    h = np.clip(calib.astype(np.int64), -INPUT_MAX, INPUT_MAX)
    layers = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        w_eff = w.astype(np.float64) * in_scale[None, :]
        alpha = np.maximum(np.abs(w_eff).max(axis=1), 1e-12) / WEIGHT_MAX
        wq = np.round(w_eff / alpha[:, None]).astype(np.int64)
        last = i == len(weights) - 1
        if last:
            bq = np.round(b / alpha).astype(np.int64)
            layers.append(IntLayer(wq, bq, None))
            return IntMLP(layers), alpha
        acc = h @ wq.T + np.round(b / alpha).astype(np.int64)
        top = np.maximum(np.quantile(np.maximum(acc, 0), 0.9999, axis=0), 1.0)
        shift = np.maximum(np.ceil(np.log2(top / ACT_MAX)), 0).astype(np.int64)
        half = np.where(shift > 0, 1 << np.maximum(shift - 1, 0), 0)
        bq = np.round(b / alpha).astype(np.int64) + half  # floor(acc/2**k) becomes rounding
        layer = IntLayer(wq, bq, shift)
        layers.append(layer)
        h = np.clip((h @ wq.T + bq) >> shift, 0, ACT_MAX)
        in_scale = alpha * (2.0 ** shift)
    raise AssertionError("unreachable")
