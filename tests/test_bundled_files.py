"""Every DICOM file pydicom ships for its own tests (odd syntaxes, big endian, colour, RLE,
JPEG, JPEG 2000, RT objects, private sequences, truncated and damaged files) goes through the
archive: stored and given back byte for byte before and after compaction, or refused with a
clear error that says why. Files that share a SOP Instance UID go to separate archives."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pydicom.data

from storage.archive import Archive
from storage.errors import UnparseableDatasetError
from storage.part10 import split_file
from storage.scrub import scrub

TESTDATA = Path(pydicom.data.__file__).parent / "test_files"
#: why a bundled file may be refused: what it lacks or where it is cut short
REFUSALS = re.compile(r"lacks (SOPClassUID|SOPInstanceUID|StudyInstanceUID|SeriesInstanceUID)"
                      r"|declares \d+ bytes, has \d+|not a DICOM Part 10 file"
                      r"|File Meta has no Transfer Syntax UID")


def _groups() -> tuple[list[list[tuple[str, str, bytes]]], dict[str, str]]:
    """The bundled files that split into a transfer syntax and a dataset, in groups without a
    repeated SOP Instance UID; and the others, with why."""
    groups: list[tuple[set, list]] = []
    refused = {}
    for path in sorted(TESTDATA.glob("*.dcm")):
        try:
            syntax, data = split_file(path.read_bytes())
        except UnparseableDatasetError as exc:
            refused[path.name] = str(exc)
            continue
        uid = pydicom.dcmread(path, stop_before_pixels=True, force=True).get("SOPInstanceUID",
                                                                            "")
        group = next((g for g in groups if uid not in g[0]), None)
        if group is None:
            group = (set(), [])
            groups.append(group)
        group[0].add(uid)
        group[1].append((path.name, syntax, data))
    return [items for _, items in groups], refused


def test_every_bundled_file_comes_back_exactly_or_is_refused_saying_why(tmp_path):
    groups, refused = _groups()
    kept = {}
    for k, items in enumerate(groups):
        arch = Archive(tmp_path / f"archive{k}")
        try:
            sent = {}
            for name, syntax, data in items:
                try:
                    result = arch.store(data, syntax)
                except UnparseableDatasetError as exc:
                    refused[name] = str(exc)
                    continue
                assert result.outcome == "stored", (name, result.outcome)
                sent[result.sop_uid] = (name, data)
            before = {name for uid, (name, data) in sent.items()
                      if arch.retrieve(uid).data != data}
            arch.compact(stable_age=0)
            after = {name for uid, (name, data) in sent.items()
                     if arch.retrieve(uid).data != data}
            assert (before, after) == (set(), set())
            assert scrub(arch).ok and arch.stats()["pending_instances"] == 0
            kept.update({name: uid for uid, (name, _) in sent.items()})
        finally:
            arch.close()
    assert {name: why for name, why in refused.items() if not REFUSALS.search(why)} == {}
    assert len(kept) >= 60 and {"CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_rle.dcm",
                                "MR_small_jp2klossless.dcm", "rtdose.dcm"} <= set(kept)
    assert {"MR_truncated.dcm", "no_meta.dcm"} <= set(refused)
