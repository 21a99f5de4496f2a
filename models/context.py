"""Causal neighbourhoods: which already-decoded voxels a predictor may look at, where they lie
at the volume's borders, and the wavefront order in which a decoder can produce them.

Offsets are ``(dz, dy, dx)`` relative to the target voxel. A causal offset points to an earlier
slice, an earlier row of the current slice, or an earlier column of the current row. Every
voxel at ``t = x + a*y + b*z`` only needs voxels with a smaller ``t`` (the wavefront), so all
voxels of one ``t`` can be predicted together.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


def is_causal(offset: tuple[int, int, int]) -> bool:
    """True when the voxel at ``offset`` is decoded before the target voxel."""
    dz, dy, dx = offset
    return dz < 0 or (dz == 0 and (dy < 0 or (dy == 0 and dx < 0)))


def wavefront_slopes(offsets) -> tuple[int, int]:
    """Smallest integers ``(a, b)`` with ``dx + a*dy + b*dz < 0`` for every causal offset."""
    a = 1
    for dz, dy, dx in offsets:
        if dz == 0 and dy < 0:
            a = max(a, dx // -dy + 1)
    b = 1
    for dz, dy, dx in offsets:
        if dz < 0:
            b = max(b, (dx + a * dy) // -dz + 1)
    return a, b


@dataclass(frozen=True)
class Neighbourhood:
    """A set of causal offsets and the padding a volume needs so that all of them can be read."""

    offsets: tuple[tuple[int, int, int], ...]

    def __post_init__(self):
        bad = [o for o in self.offsets if not is_causal(o)]
        if bad:
            raise ValueError(f"non-causal offsets {bad}")

    @property
    def size(self) -> int:
        return len(self.offsets)

    @cached_property
    def pad(self) -> tuple[int, int, int, int]:
        """``(z_before, y_before, x_before, x_after)`` padding; nothing after in z or y."""
        o = np.array(self.offsets)
        return (int(max(0, -o[:, 0].min())), int(max(0, -o[:, 1].min())),
                int(max(0, -o[:, 2].min())), int(max(0, o[:, 2].max())))

    @cached_property
    def slopes(self) -> tuple[int, int]:
        return wavefront_slopes(self.offsets)

    def padded_shape(self, zs: int, ny: int, nx: int) -> tuple[int, int, int]:
        pz, py, px0, px1 = self.pad
        return (zs + pz, ny + py, nx + px0 + px1)

    def flat_offsets(self, ny: int, nx: int) -> np.ndarray:
        """Offsets in a C-ordered padded slab buffer, for gathering by flat index."""
        _, pyy, pxx = self.padded_shape(0, ny, nx)
        o = np.array(self.offsets, dtype=np.int64)
        return o[:, 0] * pyy * pxx + o[:, 1] * pxx + o[:, 2]

    def validity(self, z: int, tiles: "Tiling") -> np.ndarray:
        """Boolean ``(K, pixels)``: whether each neighbour of each pixel of slab slice ``z``
        lies inside the slab and inside the pixel's tile."""
        out = np.zeros((len(self.offsets), len(tiles.y)), dtype=bool)
        room = tiles.width - tiles.x     # columns from the pixel to its tile's right edge
        for k, (dz, dy, dx) in enumerate(self.offsets):   # a row at a time: no (K, pixels) temporaries
            if z + dz >= 0:
                np.greater_equal(tiles.y, -dy, out=out[k])
                out[k] &= tiles.x >= -dx
                out[k] &= room > dx
        return out


@dataclass(frozen=True)
class SliceSchedule:
    """The wavefront order of one ``ny x nx`` slice cut into independent tiles: ``perm`` lists
    pixel indices sorted by local time ``tau = x + a*y`` (tile-local coordinates), then tile,
    then row; ``bounds[tau]:bounds[tau+1]`` are the pixels of time ``tau``. A slice's symbols
    are coded in this order, and all tiles advance together."""

    perm: np.ndarray
    bounds: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.bounds) - 1


@dataclass(frozen=True)
class Tiling:
    """Tile-local coordinates of every pixel of a slice cut into ``th x tw`` tiles."""

    y: np.ndarray       # local row
    x: np.ndarray       # local column
    width: np.ndarray   # width of the pixel's tile
    tile: np.ndarray    # tile number


def tiling(ny: int, nx: int, th: int, tw: int) -> Tiling:
    """Cut a slice into tiles of at most ``th`` rows and ``tw`` columns."""
    y, x = np.divmod(np.arange(ny * nx, dtype=np.int64), nx)
    ty, tx = y // th, x // tw
    width = np.minimum(tw, nx - tx * tw)
    return Tiling(y - ty * th, x - tx * tw, width, ty * (-(-nx // tw)) + tx)


def slice_schedule(tiles: Tiling, a: int) -> SliceSchedule:
    """Wavefront order of a tiled slice for slope ``a``."""
    tau = tiles.x + a * tiles.y
    perm = np.lexsort((tiles.y, tiles.tile, tau))
    counts = np.bincount(tau, minlength=int(tau.max()) + 1)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return SliceSchedule(perm=perm, bounds=bounds)
