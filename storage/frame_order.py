"""Position-major order of a stack of time points.

A stack of ``t`` multi-frame instances of ``z`` frames each (an fMRI series: one instance per
time point) is indexed in instance order: instance ``i``'s frames are slices ``i*z`` to
``(i+1)*z`` of the stack (``Instance.frame_start``). Coded in that order, the slice before each
is its spatial neighbour; coded position-major, it is the same position one time point
earlier, which differs from it by little more than noise: the test fMRI codes 19% smaller so.
The blob holds the stack position-major when its row's ``interleave`` is ``t`` > 1; these
functions turn one order into the other. One multi-frame instance may hold a whole 4D series
(as an enhanced MR fMRI, perfusion or cine can come, :func:`frame_cycle`): time-major, it is
such a stack by itself; position-major, it keeps its order. Position-major order is taken
only where it pays (:func:`position_major_pays`): frames of another contrast at the same
places (a field map's magnitude and phase, echoes, b-values) are better coded a volume after
the other, as single-frame images of them are too (:func:`repetition_major`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def position_major(volume: np.ndarray, time_points: int) -> np.ndarray:
    """The slices of ``volume`` (instance order, ``time_points`` instances of equal frames)
    in position-major order: position 0 of every time point, then position 1, ..."""
    if time_points <= 1:
        return volume
    t, rest = time_points, volume.shape[1:]
    return np.ascontiguousarray(volume.reshape(t, -1, *rest).swapaxes(0, 1).reshape(-1, *rest))


def instance_major(volume: np.ndarray, time_points: int) -> np.ndarray:
    """The inverse of :func:`position_major`: a decoded position-major stack in instance
    order, each instance's frames consecutive again (the same transposition, its two factors
    swapped: the positions become the "time points")."""
    if time_points <= 1:
        return volume
    return position_major(volume, len(volume) // time_points)


def point_group(time_points: int, slab: int) -> int | None:
    """The most slices a stream group may hold (models.encode_volume's ``max_group``) in a
    stack of ``time_points`` coded with slabs of ``slab``: a slab per position is read a time
    point at a time (a retrieval's first instance is decoded first), and decoding one decodes
    its whole group in every slab, so a group holds at most a quarter of the time points.
    None (any) for other stacks."""
    return max(1, time_points // 4) if time_points > 1 and slab == time_points else None


class FrameCycle(NamedTuple):
    """How a multi-frame instance's frames repeat their places: ``time_points`` volumes of
    the same places (1: none), time-major (each volume's frames together) or position-major
    (each place's frames together)."""

    time_points: int = 1
    time_major: bool = True


def frame_cycle(frame_keys: list | None) -> FrameCycle:
    """The :class:`FrameCycle` of frames at places ``frame_keys`` (their positions and
    orientations, storage.instance_facts.frame_places; None: unknown, no cycle)."""
    frame_keys = frame_keys or []
    t = cycle_time_points(frame_keys)
    if t > 1:
        return FrameCycle(t, True)
    t = run_time_points(frame_keys)
    return FrameCycle(t, False) if t > 1 else FrameCycle()


def run_time_points(frame_keys: list) -> int:
    """``t`` when frames come in runs of ``t`` >= 2 at one place, each of ``p`` >= 2 places
    once (position-major), else 1."""
    n, t = len(frame_keys), 1
    while t < n and frame_keys[t] == frame_keys[0]:
        t += 1
    if t < 2 or t == n or n % t or len(set(frame_keys[::t])) != n // t:
        return 1
    return t if all(frame_keys[f] == frame_keys[f - f % t] for f in range(n)) else 1


def cycle_time_points(frame_keys: list) -> int:
    """How many time points a multi-frame instance's frames hold in time-major order: ``t``
    when its ``t * p`` frames run through the same ``p`` >= 2 distinct places ``t`` >= 2 times
    (``frame_keys[f]`` the place of frame ``f``: its position and orientation), else 1 (one
    volume, frames already position-major, or no regular cycle)."""
    n = len(frame_keys)
    first = {}
    for f, key in enumerate(frame_keys):
        if key in first:
            break
        first[key] = f
    p = len(first)
    if p < 2 or p == n or n % p:
        return 1
    return n // p if all(frame_keys[f] == frame_keys[f % p] for f in range(p, n)) else 1


def position_major_pays(volume: np.ndarray, time_points: int,
                        order: np.ndarray | None = None) -> bool:
    """Whether coding ``volume`` (instance order, ``time_points`` of equal frames) position-major
    promises fewer bits: the mean absolute difference between consecutive slices, which the
    predictor's previous-slice context feeds on, must fall by a fifth (on a 4 x 4 subsample).
    An fMRI's time points at one position differ by little more than noise (the test fMRI:
    6.3 against 46.6 for its spatial neighbours); frames of another contrast at the same place
    (a field map's magnitude and phase frames: 1552 against 56) do not. ``order``: the slices
    of ``volume`` that make the instance order (:func:`repetition_major`)."""
    if time_points <= 1 or len(volume) < 2:
        return False
    sample = volume[:, ::4, ::4]
    sample = (sample if order is None else sample[order]).astype(np.int64)
    here = _step_difference(sample)
    there = _step_difference(position_major(sample, time_points))
    return there <= 0.8 * here


def _step_difference(volume: np.ndarray) -> float:
    return float(np.abs(np.diff(volume, axis=0)).mean())


def repetition_major(count: int, repetitions: int) -> np.ndarray:
    """Indices putting ``count`` images held position-major (each position's ``repetitions``
    images together) a repetition after the other: the first image of every position, then
    the second, ... (the order of :func:`instance_major`)."""
    return np.arange(count).reshape(count // repetitions, repetitions).T.ravel()


class CodingOrder(NamedTuple):
    """The order a stack is coded in: ``order`` the slices of the stack in coding order (None:
    as they are), then position-major over ``interleave`` time points (1: not), in slabs of
    ``slab`` slices (0: the coder's default); ``why`` says which, for the log."""

    order: np.ndarray | None
    interleave: int
    slab: int
    why: str

    def encode_options(self, default_slab: int) -> dict:
        """models.encode_volume's ``slab`` and ``max_group`` for the stack so ordered."""
        slab = self.slab or default_slab
        return {"slab": slab, "max_group": point_group(self.interleave, slab)}


def coding_order(volume: np.ndarray, repetitions: int = 1, interleave: int = 1, slab: int = 0,
                 volume_slab=lambda images: 0) -> CodingOrder:
    """How to code a 4D stack (:func:`position_major_pays` decides): ``volume`` single frames
    held position-major, each position's ``repetitions`` images together (a slab each:
    ``slab``), or ``interleave`` time points of equal frames in instance order (to code
    position-major, a slab per position: ``slab``). Where the images of one position differ
    more than neighbouring positions do, a volume after the other instead, a slab of
    ``volume_slab(images)`` each."""
    if repetitions > 1:
        order = repetition_major(len(volume), repetitions)
        if not position_major_pays(volume, repetitions, order):
            return CodingOrder(order, 1, volume_slab(len(volume) // repetitions),
                               "a repetition after the other")
    if interleave > 1:
        if not position_major_pays(volume, interleave):
            return CodingOrder(None, 1, volume_slab(len(volume) // interleave), "in their order")
        return CodingOrder(None, interleave, slab, "position-major")
    return CodingOrder(None, 1, slab, "")
