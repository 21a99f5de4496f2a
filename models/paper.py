"""The seed paper's two predictors as codec models: ``paper-cube`` and ``paper-pyramid``.

Both feed the raw neighbour intensities of a large causal neighbourhood, normalised to [-1, 1],
to an MLP 1024-512-256-128-1 with LeakyReLU, and predict the voxel's value; the residual
``value - prediction`` is entropy coded. Here the trained float network is quantised to an exact
integer network (models.intnet, float64 path: LeakyReLU slope 2**-7, int16 weights, activations
within +-2**15), so encoder and decoder agree bit for bit.

- ``paper-cube`` (model 1): the 11x11x11 cube around the voxel, causal part: the five previous
  slices in full 11x11 windows (605) and the known half of the current slice's 11x11 window
  (5 rows above: 55, and 5 voxels to the left: 5): 665 neighbours.
- ``paper-pyramid`` (model 2): 13x13 known half on the current slice (84), 9x9 on z-1 (81),
  5x5 on z-2 (25), 1x1 on z-3 (1): 191 neighbours.

Normalisation and padding: the paper normalises each volume by its own minimum and maximum and
pads it with its minimum. A codec model sees only the dtype range, so the normalisation constants
are the model's own (``center``/``half``, from the training volume's minimum and maximum:
``(v - center) / half`` is within [-1, 1] on that volume), and every neighbour outside the
slab/tile (``valid`` False) is replaced by ``pad``, the training volume's minimum (the paper's
"volume minimum" padding, made a constant so that garbage never reaches the network).

Residual coding: the paper codes the residuals of its single prediction with one arithmetic
coder distribution. ``j_mode`` 0 (what the shipped models use) is exactly that: one coding table
(index ``j_const``) fitted on the training volume's residuals. ``j_mode`` 1 picks the table from
the local activity instead (floor(4 log2 s) + ``j_offset``, ``s`` = 1 + the sum of absolute
differences of the nearest causal neighbours) — an ablation that shows what a per-voxel scale adds.
"""

from __future__ import annotations

import numpy as np

from models.context import Neighbourhood
from models.entropy import CodingTables
from models.features import N_SCALES, log2_quarters
from models.intnet import IntMLP
from models.registry import register_kind

#: model 1: five previous slices' full 11x11 windows + the known half of the current one
CUBE_NEIGHBOURHOOD = Neighbourhood(
    tuple((dz, dy, dx) for dz in range(-5, 0) for dy in range(-5, 6) for dx in range(-5, 6))
    + tuple((0, dy, dx) for dy in range(-5, 0) for dx in range(-5, 6))
    + tuple((0, 0, dx) for dx in range(-5, 0)))


def _window(dz: int, r: int):
    return tuple((dz, dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1))


#: model 2: 13x13 known half at z, 9x9 at z-1, 5x5 at z-2, 1x1 at z-3
PYRAMID_NEIGHBOURHOOD = Neighbourhood(
    _window(-3, 0) + _window(-2, 2) + _window(-1, 4)
    + tuple((0, dy, dx) for dy in range(-6, 0) for dx in range(-6, 7))
    + tuple((0, 0, dx) for dx in range(-6, 0)))

LEAKY_SHIFT = 7              # LeakyReLU slope 2**-7 = 0.0078 (PyTorch's default is 0.01)
PREDICT_CHUNK = 8192         # voxels per network call (bounds working memory)

# params: center, half (rounded, informative), pad, out_mult, out_shift, j_mode, j_const, j_offset
_P_CENTER, _P_HALF, _P_PAD, _P_MULT, _P_SHIFT, P_JMODE, P_JCONST, _P_JOFF = range(8)


def _activity_offsets(hood: Neighbourhood) -> list[tuple[int, int]]:
    """Pairs of neighbour rows whose absolute differences measure the local activity."""
    pos = {o: i for i, o in enumerate(hood.offsets)}
    w, n, nw, ne, ww, nn, p = ((0, 0, -1), (0, -1, 0), (0, -1, -1), (0, -1, 1), (0, 0, -2),
                               (0, -2, 0), (-1, 0, 0))
    pairs = [(w, nw), (n, nw), (n, ne), (w, ww), (n, nn), (p, w), (p, n)]
    return [(pos[a], pos[b]) for a, b in pairs]


class PaperPredictor:
    """A paper model: raw normalised neighbours -> exact integer MLP -> one prediction."""

    kind = "paper"
    neighbourhood: Neighbourhood
    #: the paper codes whole volumes: long slabs keep the previous slices the models rely on
    preferred_slab = 64

    def __init__(self, name: str, net: IntMLP, params: np.ndarray, tables: CodingTables,
                 meta: dict | None = None):
        self.name = name
        self.net = net
        self.params = np.asarray(params, dtype=np.int64)
        self.tables = tables
        self.meta = meta or {}
        self.device = "cpu"
        self._pairs = np.array(_activity_offsets(self.neighbourhood))

    # ------------------------------------------------------------------ inputs and outputs
    @property
    def center(self) -> int:
        return int(self.params[_P_CENTER])

    @property
    def pad(self) -> int:
        return int(self.params[_P_PAD])

    def with_table(self, params: np.ndarray, tables: CodingTables) -> "PaperPredictor":
        """A copy with other table constants (``params`` may differ in ``j_mode``/``j_const``
        only) and tables; the same network and model id."""
        twin = type(self)(self.name, self.net, params, tables, dict(self.meta))
        twin.model_id = getattr(self, "model_id", None)
        return twin

    def inputs(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Integer network inputs ``(n, K)``: neighbour minus ``center``, ``pad`` where invalid."""
        v = np.where(valid, values, self.pad).astype(np.int64)
        return np.clip(v - self.center, -self.net.input_max, self.net.input_max).T

    def table_index(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        n = values.shape[1]
        mode, jc, joff = (int(self.params[k]) for k in (P_JMODE, P_JCONST, _P_JOFF))
        if mode == 0:
            return np.full(n, jc, dtype=np.int64)
        v = np.where(valid, values, self.pad).astype(np.int64)
        s = np.abs(v[self._pairs[:, 0]] - v[self._pairs[:, 1]]).sum(axis=0) + 1
        return np.clip(log2_quarters(s) + joff, 0, N_SCALES - 1)

    def prediction(self, acc: np.ndarray, lo, hi) -> np.ndarray:
        """``center + round(acc * out_mult / 2**out_shift)``, clipped to ``[lo, hi]``."""
        mult, shift = int(self.params[_P_MULT]), int(self.params[_P_SHIFT])
        off = (acc * mult + (1 << (shift - 1))) >> shift
        return np.clip(self.center + off, lo, hi)

    def predict(self, values: np.ndarray, valid: np.ndarray, lo: int, hi: int):
        """Rounded predictions (int64 within [lo, hi]) and table indices for ``(K, n)``
        neighbour values; invalid neighbours never influence either."""
        n = values.shape[1]
        pred = np.empty(n, dtype=np.int64)
        for a in range(0, n, PREDICT_CHUNK):
            sl = slice(a, a + PREDICT_CHUNK)
            acc = self.net(self.inputs(values[:, sl], valid[:, sl]), self.device)[:, 0]
            pred[sl] = self.prediction(acc, lo, hi)
        return pred, self.table_index(values, valid)

    # ------------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"kind": np.array(self.kind), "params": self.params,
               "token_table": self.tables.tokens, "class_table": self.tables.classes}
        out.update(self.net.to_arrays("net_"))
        return out

    @classmethod
    def from_arrays(cls, name: str, arrays, meta=None) -> "PaperPredictor":
        tables = CodingTables(arrays["token_table"], arrays["class_table"])
        return cls(name, IntMLP.from_arrays(arrays, "net_"), arrays["params"], tables, meta)


class PaperCubePredictor(PaperPredictor):
    kind = "paper-cube"
    neighbourhood = CUBE_NEIGHBOURHOOD


class PaperPyramidPredictor(PaperPredictor):
    kind = "paper-pyramid"
    neighbourhood = PYRAMID_NEIGHBOURHOOD


PREDICTORS = {cls.kind: cls for cls in (PaperCubePredictor, PaperPyramidPredictor)}
for _kind, _cls in PREDICTORS.items():
    register_kind(_kind, _cls)
