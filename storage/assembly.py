"""Group a series' staged instances into stacks the volume codec can take.

Single-frame instances stack when they share a pixel format and orientation (the ``stack_format``
recorded at ingest); they are sorted along the slice normal (position), falling back to
InstanceNumber when a geometry is missing. A 4D series (each position the same number of
times: time points, diffusion directions) is cut into stacks of whole positions, each
position's images a slab of their own. A multi-frame instance is a volume by itself, and
the multi-frame instances of a series whose frames share a format stack in InstanceNumber order
(an fMRI series of one instance per time point: one volume the encoder adapts to, instead of
many too small to), up to the voxels of ``max_slices`` 512 x 512 slices. Time points of equal
frames smaller than the encoder's adaptation threshold stack position-major
(:mod:`storage.frame_order`), in groups of about GROUP_VOXELS (no fewer time points than it
adapts to): a group is decoded whole to give back its instances out of order, so groups stay
small; there too each position's time points are a slab. A multi-frame instance that holds a
whole 4D series time-major is such a stack by itself. A lone image (a radiograph, a scout, an
RT image: the only one of its format in the series) of at least LONE_MIN_VOXELS pixels is a
one-slice stack: the codec predicts it from its own rows. What does not stack (no native pixel
data, RGB, a small lone image) is returned as singles for the general codec.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from models.api import ADAPT_VOXELS
from storage.frame_order import CodingOrder, coding_order
from storage.instance_facts import MULTIFRAME

SLICE_VOXELS = 512 * 512   # max_slices of these bound a stack of multi-frame instances
MAX_TIME_POINTS = 256      # in a position-major group: one slab per position, of this many at most
# a position-major group holds about this many voxels at most (decoded whole for an instance
# out of order: about a second for 64 x 64 frames here), and as many as that allows: one
# adaptation for more voxels (the test fMRI in one group of 20 against two of 10: 2.9% fewer
# bits, half the encoding time)
GROUP_VOXELS = 1 << 22
# a 4D series' slab of one position's images holds at most this many voxels (8 slices of 512 x
# 512, the default slab's): random access to an instance never decodes more than it does today
POSITION_SLAB_VOXELS = 8 * SLICE_VOXELS
# ... and at least this many images: fewer would start more slabs than the default slab of 8
# does, each slab's first image without the one before it as context
MIN_POSITION_SLAB = 8
# a multi-frame instance of a whole 4D series is coded position-major up to this many voxels
# (decoded whole and reordered to give it back: twice its pixels in memory); larger ones keep
# their frames' order, which the coder streams piece by piece
MAX_FOUR_D_VOXELS = 1 << 26
# ... each position's time points in slabs of at most this many (a divisor of theirs): the
# coder's memory grows with a slab's slices in flight (the test fMRI joined 6 times, 120 time
# points of 33 frames of 64 x 64: slabs of 8, 20, 30, 40 and 120 time points 8.97, 8.72, 8.61,
# 8.60 and 8.55 MB, encoding and decoding peaks 30, 99, 157, 212 and 276 MB above the volume's)
FOUR_D_SLAB = 32
# a lone image of at least this many pixels is coded as a one-slice volume rather than deflated
# (measured on the train volumes: centre crops of a chest CT slice code to 0.93x zlib's bytes at
# 16 x 16, 0.75x at 32 x 32, 0.72x from 64 x 64 up; a whole slice of the train MR 0.51x; a
# 1024 x 1024 RT image 0.71x, 0.369 of its raw bytes against JPEG-LS's 0.377)
LONE_MIN_VOXELS = 32 * 32


@dataclass
class Stack:
    """Instances whose pixel words, concatenated in order, form one (z, y, x) volume."""

    members: list
    interleave: int = 1     # > 1: that many time points, coded position-major
    slab: int = 0           # slices per slab (a position's time points); 0: the coder's default
    # > 1: single frames, each position's that many images together (InstanceNumber order)
    repetitions: int = 1

    @property
    def slices(self) -> int:
        return sum(m.frames for m in self.members)


def _order(instances: list) -> list:
    if all(i.position is not None for i in instances):
        return sorted(instances, key=lambda i: (i.position, i.instance_number or 0, i.sop_uid))
    return _by_number(instances)


def _by_number(instances: list) -> list:
    return sorted(instances, key=lambda i: (i.instance_number is None, i.instance_number or 0,
                                            i.sop_uid))


def _runs(members: list, limit: int, size) -> list[Stack]:
    """Consecutive ``members`` in stacks whose ``size(member)`` adds up to at most ``limit``
    (a member larger than that alone is a stack of its own)."""
    stacks, current, total = [], [], 0
    for member in members:
        n = size(member)
        if current and total + n > limit:
            stacks.append(Stack(current))
            current, total = [], 0
        current.append(member)
        total += n
    if current:
        stacks.append(Stack(current))
    return stacks


def _time_points(members: list, frame_voxels: int, limit: int, adapt_voxels: int) -> list[Stack]:
    """Stacks of multi-frame instances of one frame format in InstanceNumber order: groups
    of time points (equal frames, each under ``adapt_voxels``) coded position-major, in
    near-equal consecutive groups of about GROUP_VOXELS at most, and of at least the fewest
    the encoder adapts to; otherwise runs of at most ``limit`` voxels in instance order."""
    point = members[0].frames * frame_voxels
    if len(members) < 2 or members[0].frames < 2 or point >= adapt_voxels \
            or any(m.frames != members[0].frames for m in members):
        return _runs(members, limit, lambda inst: inst.frames * frame_voxels)
    per = -(-adapt_voxels // point)
    by_size = -(-len(members) * point // GROUP_VOXELS)
    groups = max(1, min(by_size, len(members) // per), -(-len(members) // MAX_TIME_POINTS))
    cuts = [round(i * len(members) / groups) for i in range(groups + 1)]
    return [Stack(members[a:b], interleave=b - a, slab=b - a if b - a >= MIN_POSITION_SLAB else 0)
            for a, b in zip(cuts, cuts[1:])]


def _positions(members: list, max_slices: int, image_voxels: int) -> list[Stack]:
    """Single-frame instances in position order (:func:`_order`) in stacks of ``max_slices``;
    a 4D series, each position ``t`` >= 2 times (t <= ``max_slices``), in stacks of whole
    positions, the number nearest ``max_slices`` slices (``repetitions`` t: compaction may
    code them a repetition after the other), a slab per position (:func:`position_slab`)."""
    places = Counter(None if m.position is None else round(m.position, 3) for m in members)
    t = max(places.values())
    if None in places or len(places) < 2 or not 2 <= t <= max_slices \
            or any(n != t for n in places.values()):
        return _runs(members, max_slices, lambda inst: 1)
    per = max(1, round(max_slices / t)) * t
    return [Stack(s.members, slab=position_slab(t, image_voxels), repetitions=t)
            for s in _runs(members, per, lambda inst: 1)]


def frame_voxels(fmt: str) -> int:
    """Pixels of one frame of a ``stack_format`` (raises ValueError on the bare
    ``"multiframe"`` of rows indexed before formats were kept)."""
    rows, columns = fmt.removeprefix(MULTIFRAME + "|").split("|")[0].split("x")
    return int(rows) * int(columns)


def position_slab(t: int, frame_voxels: int) -> int:
    """A slab per position of ``t`` images where that is at least MIN_POSITION_SLAB images
    and at most POSITION_SLAB_VOXELS; else 0 (the coder's default)."""
    return t if MIN_POSITION_SLAB <= t <= MAX_TIME_POINTS \
        and t * frame_voxels <= POSITION_SLAB_VOXELS else 0


def volume_slab(images: int, frame_voxels: int, most: int = 16) -> int:
    """Slabs for volumes of ``images`` slices coded one after the other: the largest of
    ``most`` down to MIN_POSITION_SLAB slices that divides ``images`` (no slab holds two
    volumes) and holds at most POSITION_SLAB_VOXELS; else 0 (the coder's default). Larger
    slabs would save a little more and decode slower (the test field map's two 32-slice
    volumes: slabs of 8, 16 and 32 slices 142,340, 141,272 and 140,756 bytes, decoded in
    0.045, 0.048 and 0.061 s on two workers)."""
    return next((d for d in range(most, MIN_POSITION_SLAB - 1, -1)
                 if images % d == 0 and d * frame_voxels <= POSITION_SLAB_VOXELS), 0)


def stack_order(stack: Stack, volume: np.ndarray) -> CodingOrder:
    """The order to code ``stack`` in, its pixels ``volume`` in member order
    (storage.frame_order.coding_order): repetitions only of single frames, volumes coded one
    after the other in slabs of :func:`volume_slab`."""
    plane = volume.shape[1] * volume.shape[2]
    single = len(volume) == len(stack.members)
    return coding_order(volume, stack.repetitions if single else 1, stack.interleave,
                        stack.slab, lambda images: volume_slab(images, plane))


def _time_series_instance(inst, cycle, frame_voxels: int) -> Stack | None:
    """A multi-frame instance holding a 4D series (``cycle``: its
    storage.frame_order.FrameCycle) as a stack of its own: time-major frames coded
    position-major up to MAX_FOUR_D_VOXELS, position-major frames in their order; each
    position's time points in slabs of at most FOUR_D_SLAB (:func:`volume_slab`); None for
    other instances."""
    t = cycle.time_points if cycle else 1
    if t <= 1 or (cycle.time_major and inst.frames * frame_voxels > MAX_FOUR_D_VOXELS):
        return None
    return Stack([inst], interleave=t if cycle.time_major else 1,
                 slab=volume_slab(t, frame_voxels, FOUR_D_SLAB))


def assemble(instances: list, max_slices: int = 256, adapt_voxels: int = ADAPT_VOXELS,
             cycles: dict | None = None) -> tuple[list[Stack], list]:
    """Split instances (objects with ``stack_format``, ``frames``, ``position``,
    ``instance_number``, ``sop_uid``) into stacks and singles.

    Parameters
    ----------
    instances : list
        Staged instance rows of one series.
    max_slices : int
        Largest stack of single-frame instances; longer runs are cut into several stacks (a
        4D series' stacks of whole positions may exceed it by half a position's images).
        Multi-frame instances stack up to the voxels of this many 512 x 512 slices.
    adapt_voxels : int
        The codec's adaptation threshold, which sizes the position-major groups of time
        points.
    cycles : dict, optional
        ``sop_uid`` -> storage.frame_order.FrameCycle of a multi-frame instance holding a 4D
        series: a stack by itself (:func:`_time_series_instance`).

    Returns
    -------
    stacks : list of Stack
    singles : list
        Instances for the general lossless codec.
    """
    groups: dict[str, list] = defaultdict(list)
    volumes: dict[str, list] = defaultdict(list)
    stacks: list[Stack] = []
    singles: list = []
    for inst in instances:
        if inst.stack_format == MULTIFRAME:    # indexed before its frames' format was kept
            stacks.append(Stack([inst]))
        elif inst.stack_format.startswith(MULTIFRAME + "|"):
            alone = _time_series_instance(inst, (cycles or {}).get(inst.sop_uid),
                                          frame_voxels(inst.stack_format))
            if alone is not None:
                stacks.append(alone)
            else:
                volumes[inst.stack_format].append(inst)
        elif inst.stack_format:
            groups[inst.stack_format].append(inst)
        else:
            singles.append(inst)
    for fmt in sorted(volumes):
        stacks.extend(_time_points(_by_number(volumes[fmt]), frame_voxels(fmt),
                                   max_slices * SLICE_VOXELS, adapt_voxels))
    for fmt in sorted(groups):
        members = groups[fmt]
        if len(members) < 2 and frame_voxels(fmt) < LONE_MIN_VOXELS:
            singles.extend(members)
            continue
        stacks.extend(_positions(_order(members), max_slices, frame_voxels(fmt)))
    for stack in [s for s in stacks if s.slices < 2 and not _worth_coding(s)]:
        stacks.remove(stack)
        singles.extend(stack.members)
    return stacks, singles


def _worth_coding(stack: Stack) -> bool:
    """Whether a one-slice stack holds enough pixels for the volume codec (LONE_MIN_VOXELS)."""
    try:
        return frame_voxels(stack.members[0].stack_format) >= LONE_MIN_VOXELS
    except ValueError:      # "multiframe" alone: indexed before formats were kept
        return False
