"""Group a series' staged instances into stacks the volume codec can take.

Single-frame instances stack when they share a pixel format and orientation (the ``stack_format``
recorded at ingest); they are sorted along the slice normal (position), falling back to
InstanceNumber when a geometry is missing. A multi-frame instance is a volume by itself, and
the multi-frame instances of a series whose frames share a format stack one after another in
InstanceNumber order (an fMRI series of one instance per time point: one volume the encoder
adapts to, instead of many too small to), up to the voxels of ``max_slices`` 512 x 512 slices.
What does not stack (no native pixel data, RGB, a lone image) is returned as singles for the
general codec.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from storage.instance_facts import MULTIFRAME

SLICE_VOXELS = 512 * 512   # max_slices of these bound a stack of multi-frame instances


@dataclass
class Stack:
    """Instances whose pixel words, concatenated in order, form one (z, y, x) volume."""

    members: list

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


def _frame_voxels(fmt: str) -> int:
    rows, columns = fmt.split("|")[1].split("x")
    return int(rows) * int(columns)


def assemble(instances: list, max_slices: int = 256) -> tuple[list[Stack], list]:
    """Split instances (objects with ``stack_format``, ``frames``, ``position``,
    ``instance_number``, ``sop_uid``) into stacks and singles.

    Parameters
    ----------
    instances : list
        Staged instance rows of one series.
    max_slices : int
        Largest stack of single-frame instances; longer runs are cut into several stacks.
        Multi-frame instances stack up to the voxels of this many 512 x 512 slices.

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
            volumes[inst.stack_format].append(inst)
        elif inst.stack_format:
            groups[inst.stack_format].append(inst)
        else:
            singles.append(inst)
    for fmt in sorted(volumes):
        voxels = _frame_voxels(fmt)
        stacks.extend(_runs(_by_number(volumes[fmt]), max_slices * SLICE_VOXELS,
                            lambda inst: inst.frames * voxels))
    for fmt in sorted(groups):
        members = groups[fmt]
        if len(members) < 2:
            singles.extend(members)
            continue
        stacks.extend(_runs(_order(members), max_slices, lambda inst: 1))
    for stack in [s for s in stacks if s.slices < 2]:
        stacks.remove(stack)
        singles.extend(stack.members)
    return stacks, singles
