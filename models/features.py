"""Inputs and outputs of the production predictor, in exact integer arithmetic.

The network never sees raw intensities. Every neighbour is taken relative to a local reference
(the LOCO-I median predictor of W, N, NW) and divided by the local activity ``s`` (mean absolute
difference around the voxel), so the same weights serve 12-bit MR and 16-bit CT. The network
answers in the same units: a correction of the reference in units of ``s/64`` and a log-scale
relative to ``s``. All of this is integer numpy; the float twin used in training sees the very
same integer inputs.
"""

from __future__ import annotations

import numpy as np

from models.context import Neighbourhood

#: current slice (9), previous slice 3x3 (9), two slices back (1)
DEFAULT_NEIGHBOURHOOD = Neighbourhood((
    (0, 0, -1), (0, -1, 0), (0, -1, -1), (0, -1, 1), (0, 0, -2), (0, -2, 0),
    (0, -1, -2), (0, -2, -1), (0, -2, 1),
    (-1, 0, 0), (-1, 0, -1), (-1, 0, 1), (-1, -1, 0), (-1, 1, 0),
    (-1, -1, -1), (-1, -1, 1), (-1, 1, -1), (-1, 1, 1),
    (-2, 0, 0),
))
_W, _N, _NW, _P, _PP = 0, 1, 2, 9, 18
_CURRENT = slice(0, 9)
_PREVIOUS = slice(9, 19)

#: the default neighbourhood plus seven more voxels of the current slice, up to three rows up and
#: three columns left (the wavefront keeps its slopes: no new voxel right of N's right neighbour
#: in the row above). Further inputs only: the reference and the activities are those of the
#: default neighbourhood.
WIDE_NEIGHBOURHOOD = Neighbourhood(DEFAULT_NEIGHBOURHOOD.offsets + (
    (0, -2, 2), (0, -2, -2), (0, 0, -3), (0, -3, 0), (0, -1, -3), (0, -3, -1), (0, -3, 1),
))
NEIGHBOURHOODS = {"default": DEFAULT_NEIGHBOURHOOD, "wide": WIDE_NEIGHBOURHOOD}

INPUT_CLIP = 1023           # |network input| <= 1024
UNIT = 64                   # inputs and the mean output are in units of s / UNIT
SCALE_STEPS = 4             # scale index steps per octave
SCALE_ZERO = 8              # index of scale 1.0 (index 0 is scale 1/4)
N_SCALES = SCALE_ZERO + SCALE_STEPS * 18

# floor(4 * log2(s)) exactly: smallest integer s with s**4 >= 2**k, for every k
_LOG2Q_THRESHOLDS = np.array(
    [next(s for s in range(int(2 ** (k / 4)) - 1, int(2 ** (k / 4)) + 3) if s ** 4 >= 2 ** k)
     for k in range(1, 4 * 24)], dtype=np.int64)


_LOG2Q_TABLE_SIZE = 1 << 20  # covers every activity sum the features can produce
_LOG2Q_TABLE = np.searchsorted(_LOG2Q_THRESHOLDS, np.arange(_LOG2Q_TABLE_SIZE + 1),
                               side="right").astype(np.int16)


def log2_quarters(s: np.ndarray) -> np.ndarray:
    """``floor(4 * log2(s))`` for positive integers, exactly (no floating point)."""
    s = np.asarray(s)
    if s.size and s.max() > _LOG2Q_TABLE_SIZE:
        return np.searchsorted(_LOG2Q_THRESHOLDS, s, side="right").astype(np.int64)
    return _LOG2Q_TABLE[s].astype(np.int64)


def n_features(hood: Neighbourhood) -> int:
    """Network inputs for a neighbourhood: one per neighbour, then five context inputs."""
    return hood.size + 5


def _median3(a, b, c):
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def reference(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """LOCO-I median prediction from W, N, NW (rows of ``(K, n)`` arrays), with fallbacks at
    the slab's borders."""
    w = np.where(valid[_W], values[_W],
                 np.where(valid[_N], values[_N], np.where(valid[_P], values[_P], 0)))
    n = np.where(valid[_N], values[_N], w)
    nw = np.where(valid[_NW], values[_NW], n)
    return _median3(w, n, w + n - nw)


def default_features(values: np.ndarray, valid: np.ndarray):
    """Network inputs for neighbour values ``(K, n)`` (int32) and their validity ``(K, n)``,
    in the order of a neighbourhood that starts with :data:`DEFAULT_NEIGHBOURHOOD`'s 19
    offsets (any further neighbours are further inputs).

    All arithmetic is exact: integers below 2**24 in float32, and ``floor(a / b)`` of such
    integers is exact under IEEE division.

    Returns
    -------
    ref : int64 (n,)   the reference the prediction corrects
    s : int64 (n,)     the local activity in the current slice, 1 <= s <= 2**17
    lq : int64 (n,)    floor(4 log2 s)
    x : float32 (K + 5, n)  integer-valued network inputs within +-1024
    """
    values = values.astype(np.int32, copy=False)
    ref = reference(values, valid)
    d = values - ref[None, :]
    d *= valid
    ad = np.abs(d)
    # activity of the current slice only: earlier slices may be far off (thick or tilted
    # slices) and would blur the resolution of the inputs that matter most
    s = np.minimum((ad[_CURRENT].sum(axis=0, dtype=np.int32) >> 1) + 1, 1 << 17)
    lq = log2_quarters(s)
    lp = log2_quarters((ad[_PREVIOUS].sum(axis=0, dtype=np.int32) >> 1) + 1)
    k = d.shape[0]
    x = np.empty((k + 5, d.shape[1]), dtype=np.float32)
    xd = x[:k]
    xd[...] = d
    # d / (s / UNIT) is d * UNIT / s correctly rounded (UNIT is a power of two): one pass less
    xd /= (s.astype(np.float32) * np.float32(1 / UNIT))[None, :]
    np.floor(xd, out=xd)
    np.clip(xd, -INPUT_CLIP - 1, INPUT_CLIP, out=xd)
    x[k] = lq * 8
    x[k + 1] = valid[_P] * 256
    x[k + 2] = valid[_PP] * 256
    x[k + 3] = (~valid[_CURRENT].all(axis=0)) * 256
    x[k + 4] = lp * 8
    return ref.astype(np.int64), s.astype(np.int64), lq, x


def flat_contexts(s: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """Contexts in which every valid neighbour equals the reference: constant background
    (CT padding outside the field of view, zeroed MR background). ``s`` is the activity and
    ``inputs`` the neighbour inputs ``(n, K)`` of :func:`default_features` (``x[:K].T``):
    a neighbour input is 0 exactly when its difference to the reference is (``s == 1`` makes
    it 64 times that difference), and every difference is 0 only if ``s == 1``."""
    flat = s == 1
    idx = np.flatnonzero(flat)
    if idx.size:
        flat[idx] = ~take_rows(inputs, idx).any(axis=1)
    return flat


def take_rows(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[idx]`` for a 2-D array, gathered along the memory order when ``a`` is the transposed
    view of a row-major array (the decoder's ``x.T``): the same values, without a strided
    gather per element."""
    if a.T.flags.c_contiguous and not a.flags.c_contiguous:
        return a.T[:, idx].T
    return a[idx]


def prediction(ref, s, mean_acc, mean_mult: int, mean_shift: int, lo: int, hi: int):
    """Rounded prediction ``ref + mean * s / UNIT`` from the network's integer mean output,
    where ``mean = mean_acc * mean_mult / 2**mean_shift``, clipped to ``[lo, hi]``."""
    shift = mean_shift + 6  # UNIT == 2**6
    off = (mean_acc * mean_mult * s + (1 << (shift - 1))) >> shift
    return np.clip(ref + off, lo, hi)


def fraction_bin(s, mean_acc, mean_mult: int, mean_shift: int, bins: int) -> np.ndarray:
    """Which of ``bins`` equal parts of a unit the network's mean fell in before
    :func:`prediction` rounded it (0: just above ``pred - 1/2``): the residual's distribution
    is shifted by that fraction, which tables with a row per bin can follow."""
    shift = mean_shift + 6
    t = mean_acc * mean_mult * s + (1 << (shift - 1))
    return (t & ((1 << shift) - 1)) >> (shift - (bins.bit_length() - 1))


def scale_index(lq, scale_acc, scale_mult: int, scale_shift: int):
    """Index into the probability tables: quarter-octaves of the scale, ``lq`` plus the
    network's rounded log-scale correction."""
    j = ((scale_acc * scale_mult + (1 << (scale_shift - 1))) >> scale_shift) + lq + SCALE_ZERO
    return np.clip(j, 0, N_SCALES - 1)
