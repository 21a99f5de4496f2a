"""Every DICOM file pydicom ships for its own tests (odd syntaxes, big endian, colour, RLE,
JPEG, JPEG 2000, RT objects, private sequences, truncated and damaged files) goes through the
archive: stored and given back byte for byte before and after compaction, or refused with a
clear error that says why. Files that share a SOP Instance UID go to separate archives."""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pydicom.data

from admin_helpers import admin_site, http_get, http_token  # noqa: F401
from node_helpers import node  # noqa: F401
from storage.archive import Archive
from storage.errors import UnparseableDatasetError
from storage.part10 import build_file, split_file
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
    indexed_as = {name: uid for name, uid in kept.items() if uid != str(pydicom.dcmread(
        TESTDATA / name, stop_before_pixels=True, force=True).SOPInstanceUID)}
    assert indexed_as == {}         # rtdose_rle.dcm's elements, all sent as UN, were b'...'

    assert len(kept) >= 60 and {"CT_small.dcm", "MR_small_RLE.dcm", "SC_rgb_rle.dcm",
                                "MR_small_jp2klossless.dcm", "rtdose.dcm"} <= set(kept)
    assert {"MR_truncated.dcm", "no_meta.dcm"} <= set(refused)


def _sendable() -> list[tuple[str, str, str, bytes, str]]:
    """(SOP class, SOP instance UID, transfer syntax, dataset bytes, file name) of the bundled
    files a C-STORE request can name (a SOP class and instance UID in the dataset)."""
    out = []
    for path in sorted(TESTDATA.glob("*.dcm")):
        try:
            syntax, data = split_file(path.read_bytes())
        except UnparseableDatasetError:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        sop_class, sop_uid = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
        if sop_class and sop_uid:
            out.append((sop_class, sop_uid, syntax, data, path.name))
    return out


def test_every_bundled_file_over_the_network(node, tmp_path):  # noqa: F811
    """The same files pushed by C-STORE (one association, each in the syntax of its file):
    each answered 0x0000 or a failure status, never an abort; each stored one comes back
    by C-GET, byte for byte, before and after compaction (a repeated SOP Instance UID: the
    first one received, as `duplicate_policy = "keep-first"` says)."""
    from pynetdicom import _config
    from pynetdicom.presentation import build_context

    from scu_helpers import associate, get
    items = _sendable()
    pairs = sorted({(c, ts) for c, _, ts, _, _ in items})
    _config.STORE_SEND_CHUNKED_DATASET = True      # each file's dataset bytes unchanged
    assoc = associate(node.port, [build_context(c, [ts]) for c, ts in pairs])
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    statuses, first = {}, {}
    for n, (sop_class, sop_uid, syntax, data, name) in enumerate(items):
        if (sop_class, syntax) not in accepted:
            statuses[name] = "not negotiated"
            continue
        path = tmp_path / f"send{n}.dcm"
        path.write_bytes(build_file(sop_class, sop_uid, syntax, data))
        statuses[name] = assoc.send_c_store(path).Status
        if statuses[name] == 0x0000:
            first.setdefault(sop_uid, (syntax, data))
    assert assoc.is_established
    assoc.release()
    assert {n: s for n, s in statuses.items() if s != 0x0000 and not
            (isinstance(s, int) and 0xC000 <= s <= 0xCFFF)} == {}, "aborts or odd statuses"
    assert len(first) >= 30 and statuses["MR_truncated.dcm"] != 0x0000
    study_of = {u: str(node.archive.find("IMAGE", {"SOPInstanceUID": u, "StudyInstanceUID": ""})
                       [0]["StudyInstanceUID"]) for u in first}
    storage = [(c, ts) for c, ts in pairs if (c, ts) in accepted]
    for compacted in (False, True):
        if compacted:
            node.archive.compact(stable_age=0)
            assert node.archive.stats()["pending_instances"] == 0
        received = {}
        for study in sorted(set(study_of.values())):
            final, got = get(node.port, {"QueryRetrieveLevel": "STUDY",
                                         "StudyInstanceUID": study}, storage)
            assert final.Status == 0x0000, (study, hex(final.Status))
            received.update(got)
        assert {u: received.get(u) == first[u] for u in first} == {u: True for u in first}


def test_every_bundled_file_through_dicomweb(admin_site, tmp_path):  # noqa: F811
    """WADO-RS of each stored bundled file (metadata, the instance, its first frame, rendered)
    and of its study (metadata, the file-set ZIP, the de-identified ZIP), before and after
    compaction: answered, or refused with a status and a reason; never an unhandled error
    (badVR.dcm's NumberOfFrames '1A' was one, for its frames)."""
    running, admin = admin_site
    groups, _ = _groups()
    stored = {}
    for name, syntax, data in groups[0]:          # no SOP Instance UID twice
        try:
            stored[running.archive.store(data, syntax).sop_uid] = name
        except UnparseableDatasetError:
            continue
    where = {uid: running.archive.find("IMAGE", {"SOPInstanceUID": uid, "StudyInstanceUID": "",
                                              "SeriesInstanceUID": ""})[0] for uid in stored}
    unhandled = []
    for compacted in (False, True):
        if compacted:
            running.archive.compact(stable_age=0)
        asks = []
        for uid, row in where.items():
            base = (f"/dicom-web/studies/{row['StudyInstanceUID']}/series/"
                    f"{row['SeriesInstanceUID']}/instances/{uid}")
            asks += [(stored[uid], base + "/metadata", ""),
                     (stored[uid], base, 'multipart/related; type="application/dicom"'),
                     (stored[uid], base + "/frames/1", ""),
                     (stored[uid], base + "/rendered", "image/png")]
        for study in sorted({row["StudyInstanceUID"] for row in where.values()}):
            asks += [(study, f"/dicom-web/studies/{study}/metadata", ""),
                     (study, f"/api/studies/{study}/media.zip", ""),
                     (study, f"/api/studies/{study}/deidentified.zip", "")]
        for what, path, accept in asks:
            status, body = http_get(admin.url + path, accept=accept, timeout=120)
            if status >= 500 and not body.startswith(b'{"error"'):
                unhandled.append((compacted, what, path.rsplit("/", 1)[-1], status))
    assert unhandled == [] and len(stored) >= 30
