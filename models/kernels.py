"""The compiled kernels (``models/_kernels.c``), loaded with ctypes when they were built.

They compute what :func:`models.features.default_features` and
:func:`models.features.flat_contexts` compute, bit for bit, in one pass and without the flat
contexts' network inputs (:func:`features`, and :func:`run_features` for the sheared
decoder's buffer); :func:`mlp` runs the exact integer network on them, and :func:`outputs`
computes the predictions and table rows. When the optional extension was not built (no C
compiler at install time), is a build of another version, or ``VOXARC_KERNELS=numpy`` is set,
:func:`available` is False and the callers use the numpy (and torch) path, with the same
results.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from models.features import _LOG2Q_TABLE, N_SCALES, SCALE_ZERO

log = logging.getLogger(__name__)

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I32 = ctypes.c_int32
_NETWORK_ARGS = [_I32, _P, _P, _P, _P, _I32, _P]  # layers, sizes, weights, biases, ints, vector, acc
ABI = 19  # the entry points and signatures of models/_kernels.c this module calls
MLP_WIDTH = 256   # the widest network layer the kernels take (MLP_WIDTH in _kernels.c)


@lru_cache(maxsize=1)
def _library():
    spec = importlib.util.find_spec("models._kernels")
    if spec is None or not spec.origin:
        log.info("compiled kernels not built: features and network computed in numpy and torch")
        return None
    lib = ctypes.CDLL(spec.origin)
    abi = getattr(lib, "voxarc_abi", None)
    if abi is not None:
        abi.restype = _I64
    if abi is None or abi() != ABI:
        log.warning("compiled kernel %s is of another voxarc version (rebuild it: pip install "
                    "-e .): features and network computed in numpy and torch", spec.origin)
        return None
    fn = lib.voxarc_features
    fn.restype = _I64
    fn.argtypes = [_P, _I64, _P, _I64, _I64, _I32, _I32, _P, _P, _I64, _P, _P, _P, _P, _P] \
        + _NETWORK_ARGS
    fn = lib.voxarc_outputs
    fn.restype = None
    fn.argtypes = [_P, _I64, _P, _P, _P, _P, _P, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64,
                   _P, _P]
    fn = lib.voxarc_features_runs
    fn.restype = _I64
    fn.argtypes = [_P, _P, _P, _P, _P, _P, _I64, _P, _I32, _I32, _P, _P, _I64, _P, _P, _P,
                   _P, _P] + _NETWORK_ARGS
    fn = lib.voxarc_mlp
    fn.restype = _I64
    fn.argtypes = [_P, _I64, _I64, _I64] + _NETWORK_ARGS
    fn = lib.voxarc_layers
    fn.restype = _I64
    fn.argtypes = [_I32, _I32]
    fn = lib.voxarc_token_rows
    fn.restype = _I64
    fn.argtypes = [_P, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _I32, _I64, _I64, _I64, _I64,
                   _P, _P]
    fn = lib.voxarc_bounded_rows
    fn.restype = _I64
    fn.argtypes = [_P, _P, _I64, _I64, _I64, _P, _P, _P, _I64, _I64, _I64, _P]
    fn = lib.voxarc_tail_rows
    fn.restype = _I64
    fn.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _P]
    fn = lib.voxarc_stage_tokens
    fn.restype = _I64
    fn.argtypes = [_P, _I64, _P, _I64, _I64, _I64, _P]
    fn = lib.voxarc_join
    fn.restype = _I64
    fn.argtypes = [_P, _P, _I64, _P, _I64, _P, _I64, _P, _I64, _I64, _P]
    fn = lib.voxarc_slice_symbols
    fn.restype = _I64
    fn.argtypes = [_P, _P, _P, _P, _P, _I64, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64,
                   _I64, _P, _I64, _P, _P, _I64, _P, _P, _P]
    fn = lib.voxarc_step_tail
    fn.restype = _I64
    fn.argtypes = [_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                   _P, _I64, _P, _P]
    fn = lib.voxarc_step_tokens
    fn.restype = _I64
    fn.argtypes = [_P, _I64, _P, _I64, _P, _I64, _I64, _P, _I64, _P, _P, _P, _P]
    fn = lib.voxarc_step_join
    fn.restype = _I64
    fn.argtypes = [_P, _P, _I64, _P, _I64, _P, _I64, _P, _I64, _I64, _P, _I64, _I64, _P]
    fn = lib.voxarc_step_predict
    fn.restype = _I64
    fn.argtypes = [_P, _P, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P]
    fn = lib.voxarc_laplace_bits
    fn.restype = ctypes.c_double
    fn.argtypes = [_P, _P, _P, _P, _P, _I64, ctypes.c_float, ctypes.c_float, _P]
    fn = lib.voxarc_laplace_bits_planar
    fn.restype = ctypes.c_double
    fn.argtypes = [_P, _P, _P, _P, _P, _P, _I64, ctypes.c_float, ctypes.c_float, _P, _P, _I32]
    fn = lib.voxarc_train_step
    fn.restype = ctypes.c_double
    fn.argtypes = [_P, _I64, _I64, _P, _P, _P, _P, _I32, _P, _P, _P, _P, _P, ctypes.c_float,
                   ctypes.c_float, _I32, _P]
    fn = lib.voxarc_train_workspace
    fn.restype = _I64
    fn.argtypes = [_I32, _P]
    fn = lib.voxarc_adam
    fn.restype = None
    fn.argtypes = [_P, _P, _P, _P, _P, _I32, ctypes.c_float, ctypes.c_float, ctypes.c_float,
                   ctypes.c_float, _I64]
    return lib


def _addresses(arrays: list[np.ndarray]) -> np.ndarray:
    """The arrays' data addresses, as the kernels take a list of arrays (the caller keeps the
    arrays alive)."""
    return np.array([a.ctypes.data for a in arrays], np.uint64)


def _switched_off() -> bool:
    return os.environ.get("VOXARC_KERNELS", "auto") == "numpy"


AVX2 = 2    # ``vector`` value of :func:`mlp` for the AVX2+FMA layers even where AVX-512 is
AVX512 = 3  # ... for the AVX-512 float layers even where VNNI is
AVX2_INT = 4  # ... for the AVX2 integer layers (VPMADDWD) even where AVX-512 is
PLAIN_INT = 5  # ... for the plain C integer layers (any CPU)
_VECTORS = {"avx2": AVX2, "avx512": AVX512, "avx2-int": AVX2_INT}


def _vector() -> int:
    """The network layers the kernels use: the widest the CPU has (1), or with
    ``VOXARC_KERNELS=avx2`` or ``avx512`` the float layers of that width, with ``avx2-int``
    the AVX2 integer layers (to compare; the results are the same)."""
    return _VECTORS.get(os.environ.get("VOXARC_KERNELS", "auto"), 1)


def available() -> bool:
    """Whether the compiled kernel is used (built, and not switched off)."""
    return not _switched_off() and _library() is not None


def status() -> str:
    """``"compiled"`` when the kernels run, else why not (for benchmark reports)."""
    if _switched_off():
        return "off (VOXARC_KERNELS=numpy)"
    return "compiled" if _library() is not None else "not built, or built for another version"


_LAYER_NAMES = {0: "plain C", 2: "AVX2", 3: "AVX-512", 4: "AVX-512 VNNI", 5: "AVX2 integer",
                6: "plain C integer"}


def describe() -> str:
    """One line on how the codec computes here, for logs: the compiled kernels and their
    network layers, or why the numpy and torch path (several times slower) runs instead."""
    if available():
        return f"compiled kernels, network layers {layers()}"
    return f"kernels {status()}: features and network in numpy and torch"


def layers(integer: bool = True) -> str:
    """Which network layers the kernels run on this CPU (for reports and tests): for a network
    with an integer form (every default network) unless ``integer`` is False; "none" without
    the kernels."""
    if not available():
        return "none"
    return _LAYER_NAMES[_library().voxarc_layers(_vector(), int(integer))]


@dataclass
class Features:
    """Features of ``n`` voxels; the ``kept`` ones are all voxels, or with ``compact`` the
    non-flat ones.

    ref : int64 (n,)        the reference of every voxel
    busy : int64 (kept,)    indices of the kept voxels (None: all voxels, in order)
    s, lq, ref_busy : int64 (kept,)   activity, floor(4 log2 s) and reference of the kept ones
    x : float32 (kept, F)   network inputs of the kept voxels (a column-major view)
    acc : float32 (kept, out)   the network's accumulators, when it ran in the same pass
    """

    ref: np.ndarray
    busy: np.ndarray | None
    s: np.ndarray
    lq: np.ndarray
    ref_busy: np.ndarray
    x: np.ndarray
    acc: np.ndarray | None = None


def _rows(a: np.ndarray, dtype) -> tuple[np.ndarray, int]:
    """``a`` as a (K, n) array whose rows are contiguous, and its row stride in elements."""
    a = np.asarray(a)
    if a.dtype != dtype or a.strides[1] != a.itemsize or a.strides[0] % a.itemsize:
        a = np.ascontiguousarray(a, dtype=dtype)
    return a, a.strides[0] // a.itemsize


def features(values: np.ndarray, valid: np.ndarray, compact: bool,
             net: "Network | None" = None) -> Features | None:
    """Features of ``(K, n)`` neighbour values and validity (None: no compiled kernel), and
    with ``net``, the network's accumulators of the kept voxels, computed in the same pass."""
    if not available():
        return None
    k, n = values.shape
    values, vstride = _rows(values, np.int32)
    valid, ostride = _rows(valid, np.bool_)
    return _call(_library().voxarc_features, (values.ctypes.data, vstride, valid.ctypes.data,
                                              ostride, n, k, int(bool(compact))), n, k, net)


def _call(fn, args, n: int, k: int, net: "Network | None") -> Features | None:
    x = np.empty((k + 5, max(n, 1)), dtype=np.float32)
    ref, busy, s, lq, ref_busy = (np.empty(n, dtype=np.int64) for _ in range(5))
    acc = None if net is None else np.empty((n, net.outputs), np.float32)
    network = (0, None, None, None, None, 0, None) if net is None else net.arguments(acc)
    kept = fn(*args, _LOG2Q_TABLE.ctypes.data, x.ctypes.data, x.shape[1], ref.ctypes.data,
              busy.ctypes.data, s.ctypes.data, lq.ctypes.data, ref_busy.ctypes.data, *network)
    if kept < 0:
        return None
    return Features(ref, busy[:kept] if kept < n else None, s[:kept], lq[:kept],
                    ref_busy[:kept], x[:, :kept].T, None if acc is None else acc[:kept])


def run_features(buf: np.ndarray, runs: "Runs", koff: np.ndarray, compact: bool,
                 net: "Network | None" = None) -> Features | None:
    """Features of voxels read in runs from the flat int32 decoder buffer ``buf`` (see
    :class:`Runs`; ``koff``: the neighbours' offsets in ``buf``), in run order; with ``net``,
    and the network's accumulators, as :func:`features`."""
    if not available():
        return None
    assert buf.dtype == np.int32 and buf.flags.c_contiguous
    koff = np.ascontiguousarray(koff, dtype=np.int64)
    n, k = int(runs.length.sum()), len(koff)
    return _call(_library().voxarc_features_runs,
                 (buf.ctypes.data, runs.origin.ctypes.data, runs.length.ctypes.data,
                  runs.valid_at.ctypes.data, runs.valid_stride.ctypes.data,
                  runs.depth.ctypes.data, len(runs.origin), koff.ctypes.data, k,
                  int(bool(compact))), n, k, net)


@dataclass
class Runs:
    """Voxels in runs: run ``r`` holds ``length[r]`` voxels whose neighbour ``k`` lies at
    ``origin[r] + koff[k] + i`` of a buffer; their validity is byte ``k * valid_stride[r] + i``
    of the bool array at address ``valid_at[r]`` (the caller keeps it alive), and-ed with bit
    ``k`` of ``depth[r]``."""

    origin: np.ndarray        # int64
    length: np.ndarray        # int64
    valid_at: np.ndarray      # uint64 addresses
    valid_stride: np.ndarray  # int64
    depth: np.ndarray         # uint64 bit masks

    def addresses(self) -> tuple[int, ...]:
        """How many runs, and where their five arrays lie (for a caller that passes the
        same runs more than once, e.g. a remembered decoder plan)."""
        return (len(self.origin),) + tuple(a.ctypes.data for a in (
            self.origin, self.length, self.valid_at, self.valid_stride, self.depth))


def outputs(feats: Features, acc: np.ndarray, head: np.ndarray, fraction_bins: int,
            flat_row: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and table rows of every voxel from the network's float32 accumulators
    ``acc`` (kept, 2) of the kept voxels, as :meth:`models.predictor.DefaultPredictor.outputs`
    computes them (flat contexts: their reference, row ``flat_row``)."""
    n = len(feats.ref)
    acc = np.ascontiguousarray(acc, dtype=np.float32)
    head = np.ascontiguousarray(head, dtype=np.int64)
    pred, row = np.empty(n, np.int64), np.empty(n, np.int64)
    busy = None if feats.busy is None else np.ascontiguousarray(feats.busy)
    _library().voxarc_outputs(
        acc.ctypes.data, len(acc), None if busy is None else busy.ctypes.data,
        feats.ref_busy.ctypes.data, feats.s.ctypes.data, feats.lq.ctypes.data,
        feats.ref.ctypes.data, n, head.ctypes.data, fraction_bins.bit_length() - 1, SCALE_ZERO,
        N_SCALES, flat_row, lo, hi, pred.ctypes.data, row.ctypes.data)
    return pred, row


@dataclass
class Network:
    """An exact float32 network for :func:`mlp`: per layer a row-major ``(out, in)`` weight
    matrix and a bias, both pre-scaled by the layer's ``2**-shift`` for hidden layers (see
    :meth:`models.intnet.IntMLP.float_accumulators`). With ``float_exact`` False its sums
    may pass 2**24 (wider weights): only integer layers run it, exactly (the vector ones of
    the CPU, else plain C's), and without an integer form it does not :attr:`fit`."""

    weights: list[np.ndarray]
    biases: list[np.ndarray]
    float_exact: bool = True

    def __post_init__(self):
        self.weights = [np.ascontiguousarray(w, np.float32) for w in self.weights]
        self.biases = [np.ascontiguousarray(b, np.float32) for b in self.biases]
        sizes = [self.weights[0].shape[1]] + [len(w) for w in self.weights]
        self._sizes = np.array(sizes, np.int32)
        self._w = _addresses(self.weights)
        self._b = _addresses(self.biases)
        self.outputs = sizes[-1]
        self.fits = max(sizes) <= MLP_WIDTH    # the kernels take it (else they return None)
        self._ints = integer_form(self.weights, self.biases)
        self._q = None if self._ints is None else _addresses(self._ints)
        if not self.float_exact:
            self.fits = self.fits and self._ints is not None and integer_vector() is not None

    @property
    def q_address(self) -> int:
        """Address of the integer form's layer pointers for the kernels (0: none)."""
        return 0 if self._q is None else self._q.ctypes.data

    def __reduce__(self):
        # the pointer arrays are only valid in this process: a copy takes fresh ones
        return (Network, (self.weights, self.biases, self.float_exact))

    def vector(self, vector: bool | int = True) -> int:
        """The kernels' ``vector`` argument for this network: as asked (see :func:`mlp`), but
        always integer layers for a network that is not exact in float32."""
        if not self.float_exact:
            return integer_vector()
        return _vector() if vector is True else int(vector)

    def arguments(self, acc: np.ndarray, vector: bool | int = True) -> tuple:
        """The kernels' network arguments, writing the accumulators to ``acc`` (``vector``:
        see :func:`mlp`)."""
        return (len(self.weights), self._sizes.ctypes.data, self._w.ctypes.data,
                self._b.ctypes.data, self.q_address or None, self.vector(vector),
                acc.ctypes.data)


@lru_cache(maxsize=1)
def integer_vector() -> int | None:
    """The ``vector`` argument with which the kernels run integer layers on this CPU: AVX-512
    VNNI, else AVX2's, else plain C's (None: no compiled kernels)."""
    lib = _library()
    if lib is None:
        return None
    if lib.voxarc_layers(1, 1) in (4, 5):
        return 1
    return AVX2_INT if lib.voxarc_layers(AVX2_INT, 1) == 5 else PLAIN_INT


_SUM_LIMIT = 2 ** 31
_INPUT_BOUND = 1024   # inputs within +-1024 (models.intnet.INPUT_MAX), activations 0..1023


def integer_form(weights: list[np.ndarray], biases: list[np.ndarray]) -> list[np.ndarray] | None:
    """The layers as the kernels' integer layers (VNNI, AVX2) take them, or None where a layer
    has none.

    A hidden row's weights and bias are integers times ``2**-k`` (the row's shift, folded in by
    :meth:`models.intnet.IntMLP.kernel_network`); the smallest such ``k`` makes them int16
    weights and an int32 bias whose sums ``acc`` stay exact integers, and ``acc >> k`` is the
    float layers' ``floor``. Per layer one int32 array: the ``(out, ceil(in / 2))`` weight
    pairs (input ``2p`` in the low half), the biases, the shifts."""
    form = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        hidden = i < len(weights) - 1
        rows = np.concatenate([w, b[:, None]], axis=1).astype(np.float64)
        shift = np.zeros(len(b), np.int64)
        if hidden:
            for k in range(30, -1, -1):   # the smallest k at which each row is integral
                scaled = rows * 2.0 ** k
                shift = np.where((scaled == np.floor(scaled)).all(axis=1), k, shift)
        ints = rows * 2.0 ** shift[:, None]
        if not (ints == np.floor(ints)).all():
            return None
        ints = ints.astype(np.int64)
        wi, bi = ints[:, :-1], ints[:, -1]
        bound = np.abs(wi).sum(axis=1) * _INPUT_BOUND + np.abs(bi)
        if np.abs(wi).max(initial=0) > 32767 or bound.max(initial=0) >= _SUM_LIMIT:
            return None
        if wi.shape[1] % 2:
            wi = np.concatenate([wi, np.zeros((len(wi), 1), np.int64)], axis=1)
        pairs = (wi[:, 0::2] & 0xFFFF) | ((wi[:, 1::2] & 0xFFFF) << 16)
        form.append(np.concatenate([pairs.ravel(), bi & 0xFFFFFFFF, shift])
                    .astype(np.uint32).view(np.int32))
    return form


def mlp(net: Network, x: np.ndarray, vector: bool | int = True) -> np.ndarray | None:
    """The network's float32 accumulators ``(n, out)`` for inputs ``x`` ``(n, in)`` (float32
    is used in place: a column-major view as :class:`Features` gives, or voxel-major samples,
    which the kernel packs block by block), or None without the
    compiled kernel or for a network it does not take (:attr:`Network.fits`). Equal, bit for
    bit, to torch's float32 evaluation (float64 for a network not exact in float32, which only
    integer layers run). ``vector``: True the widest layers the CPU has (on the network's
    :func:`integer_form`: AVX-512 VNNI, or AVX2 integer layers where there is no AVX-512;
    else AVX-512, else AVX2+FMA; see :func:`_vector` for ``VOXARC_KERNELS``),
    :data:`AVX2_INT` the AVX2 integer layers, :data:`AVX512` or :data:`AVX2` those float
    layers even where wider ones are, False the plain C layers."""
    if not available() or not net.fits:
        return None
    cols = np.asarray(x, dtype=np.float32).T
    if cols.strides[0] % 4 or cols.strides[1] % 4 or min(cols.strides) < 0:
        cols = np.ascontiguousarray(cols)
    n = cols.shape[1]
    acc = np.empty((n, net.outputs), np.float32)
    if n and _library().voxarc_mlp(cols.ctypes.data, cols.strides[0] // 4, cols.strides[1] // 4,
                                   n, *net.arguments(acc, vector)) < 0:
        return None
    return acc


def laplace_bits(value: np.ndarray, ref: np.ndarray, s: np.ndarray, lq: np.ndarray,
                 out: np.ndarray, unit: float, scale_steps: float) -> tuple[float, np.ndarray]:
    """The sum of :func:`models.train.laplace_bits` over the samples and its gradient with
    respect to ``out`` (n, 2), in one pass (float32 inputs, C-contiguous)."""
    n = len(value)
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (value, ref, s, lq, out)]
    if arrays[4].shape != (n, 2) or any(a.shape != (n,) for a in arrays[:4]):
        raise ValueError("laplace_bits wants n values, references, activities, scales and "
                         "an (n, 2) output")
    grad = np.empty((n, 2), np.float32)
    total = _library().voxarc_laplace_bits(*(a.ctypes.data for a in arrays), n, unit,
                                           scale_steps, grad.ctypes.data)
    return total, grad


def laplace_bits_planar(value: np.ndarray, ref: np.ndarray, s: np.ndarray, lq: np.ndarray,
                        out0: np.ndarray, out1: np.ndarray, unit: float, scale_steps: float,
                        vector: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """:func:`laplace_bits` on the outputs' two columns apart, as the fine-tuning step
    computes it (with ``vector``, eight samples at a time where the CPU has AVX2 and FMA, by
    the kernel's own exp and log): the sum and the gradients of both columns."""
    n = len(value)
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in (value, ref, s, lq, out0, out1)]
    if any(a.shape != (n,) for a in arrays):
        raise ValueError("laplace_bits_planar wants six arrays of n samples")
    g0, g1 = np.empty(n, np.float32), np.empty(n, np.float32)
    total = _library().voxarc_laplace_bits_planar(*(a.ctypes.data for a in arrays), n, unit,
                                                  scale_steps, g0.ctypes.data, g1.ctypes.data,
                                                  int(bool(vector)))
    return total, g0, g1


def _aligned(floats: int, align: int = 64) -> np.ndarray:
    """A zeroed float32 array whose data starts on an ``align``-byte boundary (a cache line:
    the training step's vectors then never straddle two)."""
    raw = np.zeros(floats + align // 4, np.float32)
    skip = (-raw.ctypes.data % align) // 4
    return raw[skip:skip + floats]


class TrainStep:
    """The float twin's fine-tuning step in one compiled call (``voxarc_train_step``): the mean
    bits of a batch and their gradients, written into ``grads`` (arrays shaped like the
    weights and biases, in the same order; torch tensors' memory, for instance).
    ``weights`` and ``biases`` are float32 arrays the optimiser updates in place."""

    def __init__(self, weights: list[np.ndarray], biases: list[np.ndarray],
                 weight_grads: list[np.ndarray], bias_grads: list[np.ndarray]):
        arrays = [*weights, *biases, *weight_grads, *bias_grads]
        if any(a.dtype != np.float32 or not a.flags.c_contiguous for a in arrays):
            raise ValueError("the training step takes C-contiguous float32 arrays")
        self._keep = arrays
        self.layers = len(weights)
        self._sizes = np.array([weights[0].shape[1]] + [w.shape[0] for w in weights], np.int32)
        self._ptrs = [_addresses(group) for group in (weights, biases, weight_grads, bias_grads)]
        self._args = (self._sizes.ctypes.data, *(p.ctypes.data for p in self._ptrs))
        self._work = _aligned(_library().voxarc_train_workspace(self.layers,
                                                                self._sizes.ctypes.data))

    def __call__(self, x: np.ndarray, value: np.ndarray, ref: np.ndarray, s: np.ndarray,
                 lq: np.ndarray, unit: float, scale_steps: float) -> float | None:
        """Mean bits of the batch (x: (n, >= inputs) float32 rows; the others (n,) float32,
        C-contiguous), its gradients written; None where the kernel does not take the network."""
        n = len(value)
        if n == 0 or x.dtype != np.float32 or x.strides[1] != 4 or x.shape[1] < self._sizes[0] \
                or len(x) != n or any(a.dtype != np.float32 or a.shape != (n,)
                                      or not a.flags.c_contiguous for a in (value, ref, s, lq)):
            raise ValueError("the training step takes float32 rows of the inputs and n > 0 "
                             "contiguous float32 values, references, activities and scales")
        total = _library().voxarc_train_step(
            x.ctypes.data, x.strides[0] // 4, n, value.ctypes.data, ref.ctypes.data,
            s.ctypes.data, lq.ctypes.data, self.layers, *self._args, unit, scale_steps,
            _vector(), self._work.ctypes.data)
        return None if total < 0 else total / n


class AdamStep:
    """Adam's update of float32 ``params`` in place from ``grads`` in one compiled call
    (``voxarc_adam``), keeping its moments; the arrays are held, and read at every step (torch
    tensors' memory, for instance)."""

    def __init__(self, params: list[np.ndarray], grads: list[np.ndarray]):
        if len(params) != len(grads) or any(
                a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.writeable
                for a in [*params, *grads]) or any(p.shape != g.shape
                                                   for p, g in zip(params, grads)):
            raise ValueError("Adam takes writable C-contiguous float32 parameters and "
                             "gradients of their shapes")
        self.moments = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
        self._keep = [*params, *grads]
        self._ptrs = [_addresses(group) for group in (params, grads, *self.moments)]
        self._sizes = np.array([p.size for p in params], np.int64)
        self._args = (*(p.ctypes.data for p in self._ptrs), self._sizes.ctypes.data,
                      len(self._sizes))
        self.t = 0

    def __call__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.t += 1
        _library().voxarc_adam(*self._args, lr, *betas, eps, self.t)


def token_rows(table: np.ndarray, token_range: int, shifts: np.ndarray, row: np.ndarray,
               pred: np.ndarray, bounds: tuple[int, int] | None, edge: int,
               out: np.ndarray, stage: int = 0, cum: np.ndarray | None = None) -> np.ndarray:
    """The range decoder's probability rows ``table[row]`` written to ``out[:n]`` (float64,
    C-contiguous, ``table``'s width), truncated to what ``[lo, hi] = bounds`` lets a symbol
    predicted as ``pred`` take where that range ends within ``edge`` tokens (as
    :func:`models.entropy.truncate_rows`); with ``stage`` > 0 their first-stage rows instead
    (:func:`models.entropy.stage_rows`, ``out`` ``2 * stage + 2`` wide), from the table's
    prefix sums ``cum`` (:attr:`models.entropy.CodingTables.token_cum`). Returns each
    symbol's low-bit count ``shifts[row]``."""
    n = len(row)
    row = np.ascontiguousarray(row, np.int64)
    pred = np.ascontiguousarray(pred, np.int64)
    shifts = np.ascontiguousarray(shifts, np.int64)
    if not (table.flags.c_contiguous and table.dtype == np.float64 and out.flags.c_contiguous
            and out.dtype == np.float64 and out.shape[0] >= n and len(pred) == n
            and out.shape[1] == _out_width(table, stage) and len(table) <= len(shifts)
            and _fits_cum(cum, table, token_range, stage)):
        raise ValueError("token_rows: arrays of the wrong type or shape")
    sh = np.empty(n, np.int64)
    lo, hi = bounds if bounds is not None else (0, 0)
    if _library().voxarc_token_rows(table.ctypes.data, _address(cum), len(table),
                                    table.shape[1], token_range,
                                    shifts.ctypes.data, row.ctypes.data, pred.ctypes.data, n,
                                    int(bounds is not None), lo, hi, edge, stage,
                                    out.ctypes.data, sh.ctypes.data) < 0:
        raise ValueError("token_rows: a row outside the table")
    return sh


def _out_width(table: np.ndarray, stage: int) -> int:
    return 2 * stage + 2 if stage > 0 else table.shape[1]


def _fits_cum(cum: np.ndarray | None, table: np.ndarray, token_range: int, stage: int) -> bool:
    """Whether ``cum`` can be the prefix sums of ``table``'s direct tokens (none for stage 0)."""
    if cum is None:
        return stage == 0
    return (cum.dtype == np.float64 and cum.flags.c_contiguous
            and cum.shape == (len(table), 2 * token_range + 1))


def _address(a: np.ndarray | None) -> int:
    return 0 if a is None else a.ctypes.data


def bounded_rows(table: np.ndarray, token_range: int, row: np.ndarray, qmin: np.ndarray,
                 qmax: np.ndarray, edge: int, out: np.ndarray, stage: int = 0,
                 cum: np.ndarray | None = None) -> np.ndarray:
    """The range encoder's probability rows ``table[row]`` written to ``out[:n]`` (float64,
    C-contiguous, ``table``'s width), truncated to ``[qmin, qmax]`` where that range ends
    within ``edge`` tokens (as :func:`models.entropy.truncate_rows`), or with ``stage`` > 0
    their first-stage rows (as :func:`token_rows`, from ``cum``); returns ``out[:n]``."""
    n = len(row)
    row, qmin, qmax = (np.ascontiguousarray(a, np.int64) for a in (row, qmin, qmax))
    if not (table.flags.c_contiguous and table.dtype == np.float64 and out.flags.c_contiguous
            and out.dtype == np.float64 and out.shape[0] >= n and len(qmin) == len(qmax) == n
            and out.shape[1] == _out_width(table, stage)
            and _fits_cum(cum, table, token_range, stage)):
        raise ValueError("bounded_rows: arrays of the wrong type or shape")
    if _library().voxarc_bounded_rows(table.ctypes.data, _address(cum), len(table),
                                      table.shape[1],
                                      token_range, row.ctypes.data, qmin.ctypes.data,
                                      qmax.ctypes.data, n, edge, stage, out.ctypes.data) < 0:
        raise ValueError("bounded_rows: a row outside the table")
    return out[:n]


def tail_rows(table: np.ndarray, token_range: int, stage: int, row: np.ndarray,
              qmin: np.ndarray, qmax: np.ndarray, above: np.ndarray, edge: int,
              width: int) -> np.ndarray:
    """Second-stage rows (as :func:`models.entropy.tail_rows` of the rows
    :func:`bounded_rows` gives) of symbols beyond their first stage, ``above`` their side,
    ``width`` columns."""
    n = len(row)
    row, qmin, qmax = (np.ascontiguousarray(a, np.int64) for a in (row, qmin, qmax))
    above = np.ascontiguousarray(above, np.bool_)
    if not (table.flags.c_contiguous and table.dtype == np.float64
            and len(qmin) == len(qmax) == len(above) == n):
        raise ValueError("tail_rows: arrays of the wrong type or shape")
    out = np.empty((n, width))
    if _library().voxarc_tail_rows(table.ctypes.data, len(table), table.shape[1], token_range,
                                   stage, row.ctypes.data, qmin.ctypes.data, qmax.ctypes.data,
                                   above.ctypes.data, n, edge, width, out.ctypes.data) < 0:
        raise ValueError("tail_rows: a row outside the table, or a width too small")
    return out


def stage_tokens(first: np.ndarray, second: np.ndarray, token_range: int, stage: int
                 ) -> np.ndarray | None:
    """Tokens from their two stages (as :func:`models.entropy.stage_tokens`); None when the
    symbols do not fit (a corrupt stream)."""
    first, second = (np.ascontiguousarray(a, np.int64) for a in (first, second))
    out = np.empty(len(first), np.int64)
    if _library().voxarc_stage_tokens(first.ctypes.data, len(first), second.ctypes.data,
                                      len(second), token_range, stage, out.ctypes.data) < 0:
        return None
    return out


def join(token: np.ndarray, sh: np.ndarray, low: np.ndarray, cls: np.ndarray,
         extra: np.ndarray, token_range: int) -> np.ndarray | None:
    """Residuals from decoded tokens (as :func:`models.entropy.join_residuals`); ``low``,
    ``cls`` and ``extra`` hold only the fields that were decoded, in symbol order: the low
    bits of symbols with ``sh > 0``, the classes of escape tokens, the extra bits of classes
    above 1. None when their lengths do not fit the tokens."""
    token, sh, low, cls, extra = (np.ascontiguousarray(a, np.int64)
                                  for a in (token, sh, low, cls, extra))
    n = len(token)
    if len(sh) != n:
        raise ValueError("join: tokens and shifts differ in length")
    out = np.empty(n, np.int64)
    if _library().voxarc_join(token.ctypes.data, sh.ctypes.data, n, low.ctypes.data, len(low),
                              cls.ctypes.data, len(cls), extra.ctypes.data, len(extra),
                              token_range, out.ctypes.data) < 0:
        return None
    return out


@dataclass
class SliceSymbols:
    """What a format-5 slice's three range coders code (:func:`slice_symbols`)."""
    first: np.ndarray       # int32 (n,): each token's first-stage symbol
    tail: np.ndarray        # int32: the tail stream's symbols ...
    tail_rows: np.ndarray   # ... and their probability rows
    uniform: np.ndarray     # int32: the uniform stream's values ...
    sizes: np.ndarray       # ... and their alphabet sizes


def slice_symbols(r: np.ndarray, row: np.ndarray, sh: np.ndarray, pred: np.ndarray,
                  step: np.ndarray, table: np.ndarray, classes: np.ndarray, token_range: int,
                  stage: int, bounds: tuple[int, int], edge: int) -> SliceSymbols:
    """The symbols of a slice's residuals ``r`` (wavefront order, ``step`` non-decreasing) at
    table rows ``row`` with low-bit counts ``sh`` and predictions ``pred`` within ``bounds``,
    as models.entropy's split_residuals, stage_symbols, tail_rows and step interleaving give
    them: the tail stream per step the second stages, then the escapes' classes (rows
    ``classes``); the uniform stream per step the low bits, then the extra bits."""
    arrays = [np.ascontiguousarray(a, np.int64) for a in (r, row, sh, pred, step)]
    n = len(arrays[0])
    if not (table.flags.c_contiguous and table.dtype == np.float64
            and all(len(a) == n for a in arrays)):
        raise ValueError("slice_symbols: arrays of the wrong type or shape")
    classes = np.ascontiguousarray(classes, np.float64)
    first, counts = np.empty(n, np.int32), np.zeros(2, np.int64)
    caps = (n // 8 + 64, n + 64)       # beyond the first stage: a few percent, as a rule
    for _ in range(2):
        tail, uniform, sizes = (np.empty(caps[0], np.int32), np.empty(caps[1], np.int32),
                                np.empty(caps[1], np.int32))
        rows = np.empty((caps[0], len(classes)))
        status = _library().voxarc_slice_symbols(
            *(a.ctypes.data for a in arrays), n, table.ctypes.data, len(table), table.shape[1],
            classes.ctypes.data, token_range, stage, *bounds, edge, len(classes),
            first.ctypes.data, caps[0], tail.ctypes.data, rows.ctypes.data, caps[1],
            uniform.ctypes.data, sizes.ctypes.data, counts.ctypes.data)
        if status != -2:
            break
        caps = tuple(int(c) for c in counts)
    if status < 0:
        raise ValueError("slice_symbols: a row outside the table or a field too wide")
    nt, nu = (int(c) for c in counts)
    return SliceSymbols(first, tail[:nt], rows[:nt], uniform[:nu], sizes[:nu])


class StepFields:
    """The compiled work of a two-stage (blob format 5) decoder's wavefront step between its
    range decoders' calls (models.entropy.StepDecoder.decode_fields): the second-stage rows of
    the symbols beyond their first stage, the tokens, the uniform stream's sizes, each
    segment's share of every field, and the decoded values. Its arrays are reused from step
    to step (each step's are used up before the next) and their addresses kept: a step of a
    few hundred voxels is mostly the cost of its calls."""

    def __init__(self, table: np.ndarray, token_range: int, stage: int, lo: int, hi: int,
                 edge: int, tail_width: int):
        if not (table.flags.c_contiguous and table.dtype == np.float64):
            raise ValueError("StepFields: the token table must be C-contiguous float64")
        self._lib = _library()
        self._table = table
        self._rows_args = (table.ctypes.data, len(table), table.shape[1], token_range, stage,
                           lo, hi, edge, tail_width)
        self.token_range, self.stage, self.bounds = token_range, stage, (lo, hi)
        self.tail_width = tail_width
        self.size = 0
        self._grow(1024)
        self.segments = 0
        self._grow_segments(64)

    def _grow(self, n: int) -> None:
        self.size = max(n, 2 * self.size)
        n = self.size
        self.first, self.second, self.token, self.low, self.cls, self.extra, self.out = (
            np.empty(n, np.int64) for _ in range(7))
        self.sizes = np.empty(n, np.int32)
        self.tail = np.empty((n, self.tail_width))
        self._at = {name: getattr(self, name).ctypes.data for name in (
            "first", "second", "token", "low", "cls", "extra", "out", "sizes", "tail")}

    def _grow_segments(self, k: int) -> None:
        self.segments = max(k, 2 * self.segments)
        self.ends, self.beyond, self.escapes, self.lows = (
            np.empty(self.segments + 1, np.int64) for _ in range(4))
        self._seg_at = tuple(a.ctypes.data for a in (self.ends, self.beyond, self.escapes,
                                                     self.lows))

    def reserve(self, n: int, ends: list[int]) -> None:
        """Room for a step of ``n`` symbols in the segments ending at ``ends``."""
        if n > self.size:
            self._grow(n)
        if len(ends) > self.segments:
            self._grow_segments(len(ends))
        self.ends[:len(ends)] = ends

    def tail_rows(self, n: int, nseg: int, row: int, pred: int, sh: int) -> int:
        """After the step's first stages (in ``first[:n]``): the second-stage rows of those
        beyond, in ``tail``, and each segment's first one in ``beyond``; returns how many.
        ``row``, ``pred``, ``sh``: addresses of the step's table rows, predictions and
        shifts (int64)."""
        m = self._lib.voxarc_step_tail(self._at["first"], n, row, pred, sh, *self._rows_args,
                                       self._seg_at[0], nseg, self._seg_at[1], self._at["tail"])
        if m < 0:
            raise ValueError("a first-stage symbol outside its alphabet: corrupt stream")
        return m

    def tokens(self, n: int, m: int, nseg: int, sh: int) -> tuple[int, int]:
        """The step's tokens (in ``token``) from ``first[:n]`` and ``second[:m]``; each
        segment's first escape and first low-bits symbol in ``escapes`` and ``lows``, the
        uniform stream's sizes in ``sizes``. Returns how many escapes and low bits."""
        if self._lib.voxarc_step_tokens(self._at["first"], n, self._at["second"], m, sh,
                                        self.token_range, self.stage, self._seg_at[0], nseg,
                                        self._at["token"], self._seg_at[2], self._seg_at[3],
                                        self._at["sizes"]) < 0:
            raise ValueError("a second-stage token outside its side's alphabet: corrupt stream")
        return int(self.escapes[nseg]), int(self.lows[nseg])

    def join(self, n: int, n_low: int, n_cls: int, n_extra: int, pred: int, sh: int
             ) -> np.ndarray | None:
        """The step's decoded values (a view of ``out``): predictions plus the residuals of
        ``token``, ``low``, ``cls`` and ``extra``; None when one falls outside the range (a
        corrupt stream). Raises ValueError when the fields do not fit the tokens."""
        status = self._lib.voxarc_step_join(
            self._at["token"], sh, n, self._at["low"], n_low, self._at["cls"], n_cls,
            self._at["extra"], n_extra, self.token_range, pred, *self.bounds, self._at["out"])
        if status == -1:
            raise ValueError("decoded escape fields do not match their tokens")
        return None if status == -2 else self.out[:n]


class StepKernel:
    """A sheared decoder's wavefront steps in one compiled call each: features, network,
    predictions, table rows and the range decoder's probability rows (what
    :func:`run_features`, :func:`outputs` and :func:`token_rows` give one by one), with the
    constants set up once per decoding and the outputs in arrays reused from step to step
    (each step's are used up before the next). None from :meth:`create` where the kernels
    or the network cannot run it (the caller takes the step-by-step path)."""

    def __init__(self, buf, koff, net: Network, head, lo: int, hi: int, tables, bounds,
                 token_range: int, edge: int, stage: int = 0):
        self._keep = [np.ascontiguousarray(koff, np.int64), np.ascontiguousarray(head, np.int64),
                      tables.token_rows, np.ascontiguousarray(tables.shifts, np.int64), net,
                      tables.token_cum]
        koff, head, table, shifts = self._keep[:4]
        assert buf.dtype == np.int32 and buf.flags.c_contiguous and table.flags.c_contiguous
        self._buf = buf
        self._p = np.array([buf.ctypes.data, koff.ctypes.data, _LOG2Q_TABLE.ctypes.data,
                            net._sizes.ctypes.data, net._w.ctypes.data, net._b.ctypes.data,
                            head.ctypes.data, table.ctypes.data, shifts.ctypes.data,
                            net.q_address, tables.token_cum.ctypes.data], np.uint64)
        self._q = np.array([len(koff), int(tables.flat), len(net.weights), net.vector(),
                            tables.fraction_bins.bit_length() - 1, SCALE_ZERO, N_SCALES,
                            tables.flat_index, lo,
                            hi, len(table), table.shape[1], token_range, int(bounds is not None),
                            edge, stage], np.int64)
        if bounds is not None and tuple(bounds) != (lo, hi):
            raise ValueError("the coder's bounds are the volume's range or none")
        self.width = _out_width(table, stage)
        self._pq = (self._p.ctypes.data, self._q.ctypes.data)
        self._grow(1024)

    @staticmethod
    def create(buf, koff, predictor, lo: int, hi: int, decoder, token_range: int, edge: int
               ) -> "StepKernel | None":
        """The step kernel of a decoding, or None (no compiled kernels, or a network they do
        not run: on a GPU, too wide, or not exact in float32)."""
        if not available() or not hasattr(predictor, "uses_kernels") \
                or not predictor.uses_kernels(lo, hi):    # the paper models have none
            return None
        net = predictor.kernel_network()
        if net is None:
            return None
        return StepKernel(buf, koff, net, predictor.head, lo, hi, decoder.tables,
                          decoder.bounds, token_range, edge, decoder.stage)

    def _grow(self, n: int) -> None:
        """Output arrays for steps of up to ``n`` voxels, and their addresses: ``addresses``
        are where :meth:`predict` writes the predictions, table rows and shifts (int64), for
        :class:`StepFields` to read them there."""
        self._out = (np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
                     np.empty((n, self.width)))
        self._out_at = tuple(a.ctypes.data for a in self._out)
        self.addresses = self._out_at[:3]

    def predict(self, runs: "Runs", n: int, at: tuple[int, ...] | None = None):
        """Predictions, table rows, probability rows and low-bit counts of a step's ``n``
        voxels (views of the reused arrays); ``at``: ``runs.addresses()``, when known."""
        if len(self._out[0]) < n:
            self._grow(max(n, 2 * len(self._out[0])))
        pred, row, sh, rows = self._out
        if _library().voxarc_step_predict(
                *self._pq, n, *(runs.addresses() if at is None else at), *self._out_at) < 0:
            raise MemoryError("decoder step kernel: no memory for the step's arrays "
                              "(or arguments out of range)")
        return pred[:n], row[:n], rows[:n], sh[:n]
