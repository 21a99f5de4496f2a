"""Exact integer MLP: int8-range weights, integer activations, power-of-two requantisation.

Every product and partial sum is an integer below 2**24, so a float32 matmul computes it
exactly whatever the summation order, batch size, thread count or device; ``floor(acc * 2**-k)``
is exact in float32 too. The result therefore equals the plain int64 numpy reference
(:meth:`IntMLP.reference`) bit for bit, which the tests check.

Wide networks (the paper's models: ~660 raw 16-bit inputs, 1024 hidden units) cannot stay below
2**24. They use the same construction with float64 matmuls (``exact="float64"``: every partial
sum an integer below 2**53), wider weights (up to int16) and activations, and optionally a
LeakyReLU whose slope is an exact power of two, ``2**-leaky_shift``:
``h = clip(floor(acc / 2**k), 0, act_max)`` (ReLU) or
``h = clip(floor(acc / 2**k) if acc >= 0 else floor(acc / 2**(k + leaky_shift)), -act_max - 1,
act_max)`` (LeakyReLU). Networks built with the defaults behave and are stored exactly as before;
the others carry a small configuration array (``<prefix>cfg``) in their file.

Between the two: the networks an encoder adapts to a volume (models.adapt) keep the shipped
shape and bounds but take 10-bit weights (+-511), which place their outputs finer (0.3% fewer
bits on the train volumes). Their hidden sums can pass 2**24 but stay far inside int32, and
their last layer's stay below 2**24 (:attr:`IntMLP.integer_exact`): the compiled kernels run
them on their integer layers only, torch in float64; both equal the int64 reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models import kernels

WEIGHT_MAX = 127
ACT_MAX = 1023
INPUT_MAX = 1024
EXACT_LIMIT = 2 ** 24
INT32_LIMIT = 2 ** 31     # sums of the compiled kernels' integer layers (int32)
WIDE_WEIGHT_MAX = 511     # 10-bit weights: the shipped default network since 2026-12-03, adapted ones
EXACT_LIMITS = {"float32": 2 ** 24, "float64": 2 ** 53}
_CFG_VERSION = 1


@dataclass
class IntLayer:
    weight: np.ndarray   # int64 (out, in)
    bias: np.ndarray     # int64 (out,)
    shift: np.ndarray | None  # int64 (out,) for hidden layers: h = clip(acc >> shift, 0, ACT_MAX)


class IntMLP:
    """A ReLU (or power-of-two LeakyReLU) MLP in exact integer arithmetic; the last layer
    returns raw accumulators.

    Parameters
    ----------
    layers : the integer layers
    activation : ``"relu"`` (default) or ``"leaky"`` (slope ``2**-leaky_shift`` below zero)
    leaky_shift : int, for ``"leaky"``
    exact : ``"float32"`` (default; partial sums < 2**24) or ``"float64"`` (< 2**53): the float
        type of the fast path, in which every partial sum must be an exactly representable integer
    act_max, input_max, weight_max : bounds of hidden activations, inputs (inputs are clipped to
        +-input_max) and weights (int8 range by default, at most int16)
    """

    def __init__(self, layers: list[IntLayer], activation: str = "relu", leaky_shift: int = 0,
                 exact: str = "float32", act_max: int = ACT_MAX, input_max: int = INPUT_MAX,
                 weight_max: int = WEIGHT_MAX):
        if activation not in ("relu", "leaky") or exact not in EXACT_LIMITS:
            raise ValueError(f"unknown activation {activation!r} or exact type {exact!r}")
        if not 0 < weight_max <= 32767 or (activation == "leaky") != (leaky_shift > 0):
            raise ValueError("weight_max must fit int16; leaky_shift > 0 exactly for 'leaky'")
        self.layers = layers
        self.activation, self.leaky_shift, self.exact = activation, int(leaky_shift), exact
        self.act_max, self.input_max, self.weight_max = int(act_max), int(input_max), int(weight_max)
        self._check_exact()
        self.integer_exact = self._integer_exact()   # see _integer_exact
        self._torch = None
        self._kernel = None

    def __getstate__(self):
        # caches are rebuilt on first use: a pickled network (sent to a worker) stays small
        return {**self.__dict__, "_torch": None, "_kernel": None}

    @property
    def is_default(self) -> bool:
        """Built with the original settings (stored without a configuration array)."""
        return (self.activation, self.exact, self.act_max, self.input_max, self.weight_max) == \
            ("relu", "float32", ACT_MAX, INPUT_MAX, WEIGHT_MAX)

    def _integer_exact(self) -> bool:
        """Whether the compiled kernels' integer layers run this network exactly: ReLU with the
        default activation and input bounds, weights up to int16, hidden sums within int32 and
        the last layer's within 2**24 (its float32 accumulators stay exact). Every network with
        the default settings is one (its sums stay below 2**24); others need not be exact in
        float32."""
        if (self.activation, self.act_max, self.input_max) != ("relu", ACT_MAX, INPUT_MAX):
            return False
        for i, (layer, worst) in enumerate(self._worst_sums()):
            last = i == len(self.layers) - 1
            if np.abs(layer.weight).max(initial=0) > 32767 or np.abs(layer.bias).max() >= \
                    EXACT_LIMIT or worst.max() >= (EXACT_LIMIT if last else INT32_LIMIT):
                return False
        return True

    def _worst_sums(self):
        """Each layer with the largest magnitude its rows' sums can reach (inputs within
        +-input_max, activations within the activation's range)."""
        bound = self.input_max
        for layer in self.layers:
            yield layer, np.abs(layer.weight).sum(axis=1) * bound + np.abs(layer.bias)
            bound = self.act_max if self.activation == "relu" else self.act_max + 1

    @property
    def act_min(self) -> int:
        return 0 if self.activation == "relu" else -self.act_max - 1

    def _check_exact(self) -> None:
        limit = EXACT_LIMITS[self.exact]
        for layer, worst in self._worst_sums():
            if worst.max() >= limit:
                raise ValueError(f"integer network could exceed 2**{limit.bit_length() - 1}: "
                                 f"not exact in {self.exact}")
            if np.abs(layer.weight).max() > self.weight_max:
                raise ValueError("weights outside int8 range" if self.weight_max == WEIGHT_MAX
                                 else f"weights outside +-{self.weight_max}")

    # ------------------------------------------------------------------ inference
    def _requantise(self, acc: np.ndarray, shift: np.ndarray) -> np.ndarray:
        if self.activation == "relu":
            return np.clip(acc >> shift, 0, self.act_max)
        h = np.where(acc >= 0, acc >> shift, acc >> (shift + self.leaky_shift))
        return np.clip(h, self.act_min, self.act_max)

    def reference(self, x: np.ndarray) -> np.ndarray:
        """Plain int64 numpy evaluation (slow; the definition the fast path must equal)."""
        h = np.clip(np.asarray(x, dtype=np.int64), -self.input_max, self.input_max)
        for layer in self.layers:
            acc = h @ layer.weight.T + layer.bias
            h = acc if layer.shift is None else self._requantise(acc, layer.shift)
        return h

    def _torch_params(self, device):
        import torch
        if self._torch is None or self._torch[0] != device:
            dt = getattr(torch, self.exact)
            params = []
            for layer in self.layers:
                w = torch.tensor(layer.weight.T, dtype=dt, device=device)
                b = torch.tensor(layer.bias, dtype=dt, device=device)
                k = kn = None
                if layer.shift is not None:
                    k = torch.tensor(2.0 ** -layer.shift, dtype=dt, device=device)
                    if self.activation == "leaky":
                        kn = torch.tensor(2.0 ** -(layer.shift + self.leaky_shift), dtype=dt,
                                          device=device)
                params.append((w, b, k, kn))
            self._torch = (device, params)
        return self._torch[1]

    def __call__(self, x: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Fast exact evaluation with float32 (or float64) matmuls of integer inputs ``(n, in)``
        within +-input_max (any strides); returns int64 accumulators ``(n, out)``."""
        if self.integer_exact:
            return self.float_accumulators(x, device).astype(np.int64)
        import torch
        with torch.inference_mode():
            return self._torch_call(x, device)

    def _torch_call(self, x: np.ndarray, device: str) -> np.ndarray:
        import torch
        np_dt = np.float32 if self.exact == "float32" else np.float64
        h = torch.from_numpy(np.asarray(x, dtype=np_dt)).to(device)
        h = torch.clamp(h, -self.input_max, self.input_max)
        for w, b, k, kn in self._torch_params(device):
            h = torch.addmm(b, h, w)
            if k is None:
                continue
            if kn is None:
                h.mul_(k)
            else:  # power-of-two scalings of exact integers: exact
                h = torch.where(h >= 0, h * k, h * kn)
            h = torch.clamp_(torch.floor_(h), self.act_min, self.act_max)
        return h.cpu().numpy().astype(np.int64)

    def float_accumulators(self, x: np.ndarray, device: str = "cpu") -> np.ndarray:
        """:meth:`__call__`'s accumulators as float32 (exact integers below 2**24) for a
        network with the default settings (:attr:`is_default`) or one the integer layers run
        (:attr:`integer_exact`): by the compiled kernel on the CPU when it takes the network,
        else by torch, with the same values."""
        if not self.integer_exact:
            raise ValueError("float32 accumulators are exact only for networks with the "
                             "default settings or the integer layers' bounds")
        if device == "cpu":
            acc = kernels.mlp(self.kernel_network(), x)
            if acc is not None:
                return acc
        if not self.is_default:     # its sums may pass 2**24: float64, exact below 2**53
            import torch
            with torch.inference_mode():
                return self._torch_call(x, device).astype(np.float32)
        return self._torch_accumulators(x, device)

    def _torch_accumulators(self, x: np.ndarray, device: str) -> np.ndarray:
        # weights and bias pre-scaled by 2**-k: every partial sum is an integer below
        # 2**24 times a power of two, so addmm returns acc * 2**-k exactly
        import torch
        with torch.inference_mode():
            h = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(device)
            for w, b, k, _ in self._torch_params(device):
                if k is None:
                    h = torch.addmm(b, h, w)
                else:
                    h = torch.clamp_(torch.floor_(torch.addmm(b * k, h, w * k)), 0, ACT_MAX)
            return h.cpu().numpy()

    def kernel_network(self) -> "kernels.Network | None":
        """The float32 weights of :meth:`float_accumulators`, as the compiled kernels take
        them (None for networks they cannot run exactly, see :attr:`integer_exact`)."""
        if self._kernel is None and self.integer_exact:
            # hidden layers pre-scaled by 2**-shift, as in float_accumulators' torch path
            scale = [2.0 ** -layer.shift if layer.shift is not None else np.ones(len(layer.bias))
                     for layer in self.layers]
            self._kernel = kernels.Network(
                [layer.weight * k[:, None] for layer, k in zip(self.layers, scale)],
                [layer.bias * k for layer, k in zip(self.layers, scale)], self.is_default)
        return self._kernel

    # ------------------------------------------------------------------ persistence
    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        out = {}
        if not self.is_default:
            out[f"{prefix}cfg"] = np.array(
                [_CFG_VERSION, self.activation == "leaky", self.leaky_shift,
                 32 if self.exact == "float32" else 64, self.act_max, self.input_max,
                 self.weight_max], dtype=np.int64)
        for i, layer in enumerate(self.layers):
            small = np.abs(layer.weight).max(initial=0) <= WEIGHT_MAX
            out[f"{prefix}w{i}"] = layer.weight.astype(np.int8 if small else np.int16)
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
        cfg = arrays.get(f"{prefix}cfg")
        if cfg is None:
            return cls(layers)
        version, leaky, leaky_shift, bits, act_max, input_max, weight_max = (int(v) for v in cfg)
        if version != _CFG_VERSION:
            raise ValueError(f"integer network configuration version {version} is unknown")
        return cls(layers, "leaky" if leaky else "relu", leaky_shift,
                   "float32" if bits == 32 else "float64", act_max, input_max, weight_max)


def _fit_bias(bias: np.ndarray, wq: np.ndarray, bound: int, limit: int = EXACT_LIMIT
              ) -> np.ndarray:
    """Clip biases so that no partial sum can reach ``limit`` and no bias 2**24 (only a
    barely trained network, whose weights are tiny next to its biases, ever needs it)."""
    room = np.clip(limit - 1 - np.abs(wq).sum(axis=1) * bound, 0, EXACT_LIMIT - 1)
    return np.clip(bias, -room, room)


def _exact_matmul(w: np.ndarray, h: np.ndarray, dtype=np.float64) -> np.ndarray:
    """``w @ h`` of integer-valued arrays in ``dtype``, by torch: exact in any summation order
    where every partial sum is an integer below the dtype's 2**24 or 2**53 (the caller's
    check), and on the caller's torch threads, where numpy's BLAS starts threads of its own
    that the encoder's two concurrent quantisations fight over (0.45 against 0.6-0.8 s for the
    pair)."""
    import torch
    return (torch.from_numpy(np.ascontiguousarray(w, dtype))
            @ torch.from_numpy(np.asarray(h, dtype))).numpy()


def _exact_dtype(wq: np.ndarray, bound: int, bias: np.ndarray):
    """float32 where a layer's sums (weights ``wq`` on inputs within +-``bound``, plus
    ``bias``) stay below 2**24, so float32 holds them exactly (always so for the shipped
    network: the integer network is built to that limit); float64 otherwise."""
    worst = np.abs(wq).sum(axis=1) * bound + np.abs(bias)
    return np.float32 if worst.max(initial=0) < EXACT_LIMITS["float32"] else np.float64


def row_quantile(a: np.ndarray, q: float) -> np.ndarray:
    """``np.quantile(a, q, axis=1)`` (its default, linear method) of a C-contiguous float
    array, to the bit, reordering ``a``'s rows in place. numpy's own copies the array first
    (100 MB per layer here); this one allocates nothing large, which is what counts where the
    encoder quantises two adapted networks at once on freshly touched memory (0.74-1.1 s ->
    0.41-0.6 s per quantisation inside an adaptation)."""
    n = a.shape[1]
    virtual = np.float64((n - 1) * q)
    below = int(np.floor(virtual))
    if virtual >= n - 1:
        return a.max(axis=1).astype(np.float64)
    low, high = (v.astype(np.float64) for v in _order_statistics(a, below))
    gamma = virtual - below
    diff = high - low
    return high - diff * (1 - gamma) if gamma >= 0.5 else low + diff * gamma


def _order_statistics(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k``-th and ``k + 1``-th smallest values (``k + 1 < a.shape[1]``). Near a
    row's top (the quantiser's 0.9999) only the values at or above a threshold taken from a
    strided sample are partitioned: a fifth of the time of partitioning whole rows."""
    n = a.shape[1]
    top = n - k                       # values of rank k and above
    stride = max(1, n // max(256, 32 * top))
    sample = a[:, ::stride]
    pick = 2 * -(-top // stride) + 4  # the sample's pick-th largest: some 2 * top values above
    if 8 * top >= n or pick > sample.shape[1]:
        a.partition([k, k + 1], axis=1)
        return a[:, k].copy(), a[:, k + 1].copy()
    m = sample.shape[1]
    threshold = np.partition(sample, m - pick, axis=1)[:, m - pick]
    low, high = np.empty(len(a), a.dtype), np.empty(len(a), a.dtype)
    for r, row in enumerate(a):
        above = row[row >= threshold[r]]
        at = len(above) - top          # rank k among the values above the threshold
        if at < 0:                     # too few above it (values crowded into the sample)
            row.partition([k, k + 1])
            above, at = row, k
        else:
            above.partition([at, at + 1])
        low[r], high[r] = above[at], above[at + 1]
    return low, high


def quantize_mlp(weights: list[np.ndarray], biases: list[np.ndarray], calib: np.ndarray,
                 input_scale: float = 1.0, weight_max: int = WEIGHT_MAX):
    """Quantise a float ReLU MLP (``weights[i]`` is (out, in)) that takes ``calib * input_scale``.

    Per-output-channel weight scales, weights within +-``weight_max`` (WEIGHT_MAX: the
    shipped networks, exact in float32; wider ones (511: 10 bits) give :attr:`IntMLP.integer_exact`
    networks, exact in float64 and in the kernels' integer layers); hidden activations get a
    per-channel power-of-two shift chosen on the calibration inputs (integers within
    +-INPUT_MAX). Returns the :class:`IntMLP` and the float scale of each output channel (real
    output = acc * scale).
    """
    wide = weight_max != WEIGHT_MAX
    in_scale = np.full(weights[0].shape[1], float(input_scale))  # real input = h_int * in_scale
    # activations are kept transposed, (channels, samples), in float32 or float64
    # (_exact_dtype): every value and partial sum is an integer the type holds exactly, so BLAS
    # matmuls are exact, and each channel's row is contiguous for its quantile (numpy's int64
    # matmul has no BLAS: 4.4 s -> 0.8-1.2 s per call; float32 halves the memory traffic)
    calib = np.asarray(calib)
    h = np.clip(calib.astype(np.result_type(calib.dtype, np.float32), copy=False).T,
                -INPUT_MAX, INPUT_MAX)
    bound = INPUT_MAX
    layers = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        w_eff = w.astype(np.float64) * in_scale[None, :]
        alpha = np.maximum(np.abs(w_eff).max(axis=1), 1e-12) / weight_max
        wq = np.round(w_eff / alpha[:, None]).astype(np.int64)
        last = i == len(weights) - 1
        if last:
            bq = _fit_bias(np.round(b / alpha).astype(np.int64), wq, bound)
            layers.append(IntLayer(wq, bq, None))
            return IntMLP(layers, exact="float64" if wide else "float32",
                          weight_max=weight_max), alpha
        raw_bias = np.round(b / alpha)
        dtype = _exact_dtype(wq, bound, raw_bias)
        prod = _exact_matmul(wq, h, dtype)
        acc = prod + raw_bias.astype(dtype)[:, None]
        top = np.maximum(row_quantile(np.maximum(acc, 0, out=acc), 0.9999), 1.0)
        del acc
        shift = np.maximum(np.ceil(np.log2(top / ACT_MAX)), 0).astype(np.int64)
        half = np.where(shift > 0, 1 << np.maximum(shift - 1, 0), 0)
        bq = _fit_bias(np.round(b / alpha).astype(np.int64) + half, wq, bound,
                       INT32_LIMIT if wide else EXACT_LIMIT)  # + half: a rounding shift
        layer = IntLayer(wq, bq, shift)
        layers.append(layer)
        prod += bq[:, None]
        prod *= (2.0 ** -shift)[:, None]          # >> shift, exactly (power-of-two scaling)
        h = np.clip(np.floor(prod, out=prod), 0, ACT_MAX, out=prod)
        bound = ACT_MAX
        in_scale = alpha * (2.0 ** shift)
    raise AssertionError("unreachable")


def quantize_wide_mlp(weights: list[np.ndarray], biases: list[np.ndarray], calib: np.ndarray,
                      input_scale: float, input_max: int, weight_bits, act_max: int = 32767,
                      leaky_shift: int = 0, exact: str = "float64", quantile: float = 0.9999):
    """Quantise a float ReLU / LeakyReLU MLP for the float64 exact path.

    ``weights[i]`` is (out, in); the float network takes ``x * input_scale`` for integer inputs
    ``x`` within +-input_max (``calib`` is a sample of them), and its LeakyReLU slope must be
    ``2**-leaky_shift`` (0: ReLU). ``weight_bits`` gives each layer's weight width (8..16 bits,
    an int or one per layer). Per-output-channel weight scales; each hidden channel gets the
    power-of-two shift that keeps the ``quantile`` of its |activation| on the calibration inputs
    within ``act_max``. Returns the :class:`IntMLP` and the float scale of each output channel
    (real output = acc * scale).
    """
    n = len(weights)
    bits = [weight_bits] * n if np.isscalar(weight_bits) else list(weight_bits)
    wmax_all = max((1 << (b - 1)) - 1 for b in bits)
    in_scale = np.full(weights[0].shape[1], float(input_scale))
    h = np.clip(calib.astype(np.int64), -input_max, input_max)
    act = "leaky" if leaky_shift else "relu"
    layers = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        wmax = (1 << (bits[i] - 1)) - 1
        w_eff = w.astype(np.float64) * in_scale[None, :]
        alpha = np.maximum(np.abs(w_eff).max(axis=1), 1e-30) / wmax
        wq = np.round(w_eff / alpha[:, None]).astype(np.int64)
        bq = np.round(b / alpha).astype(np.int64)
        if i == n - 1:
            layers.append(IntLayer(wq, bq, None))
            net = IntMLP(layers, act, leaky_shift, exact, act_max, input_max, wmax_all)
            return net, alpha
        # float64 matmul of integers: exact while partial sums stay below 2**53 (what the
        # finished network is checked for), and far faster than numpy's int64 matmul
        acc = (h.astype(np.float64) @ wq.T.astype(np.float64)).astype(np.int64) + bq
        mag = np.where(acc >= 0, acc, -acc / 2.0 ** leaky_shift if leaky_shift else 0)
        top = np.maximum(np.quantile(mag, quantile, axis=0), 1.0)
        shift = np.maximum(np.ceil(np.log2(top / act_max)), 0).astype(np.int64)
        half = np.where(shift > 0, 1 << np.maximum(shift - 1, 0), 0)
        layer = IntLayer(wq, bq + half, shift)  # floor(acc/2**k) becomes rounding (acc >= 0)
        layers.append(layer)
        probe = IntMLP([layer], act, leaky_shift, exact, act_max, input_max, wmax_all)
        h = probe._requantise(acc - bq + layer.bias, shift)
        in_scale = alpha * (2.0 ** shift)
    raise AssertionError("unreachable")
