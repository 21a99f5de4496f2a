"""IHE IOCM rejection notes (storage.rejection, the C-STORE handler): a Key Object Selection
titled "Rejected for Quality Reasons" from an AE title of ``rejection_notes_from`` deletes the
instances it names (a compacted stack keeps the others, byte for byte), stays stored itself,
passes over what it names wrongly, and does nothing from anyone else."""

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.sop_class import CTImageStorage

from node_helpers import dataset_bytes, make_series
from scu_helpers import find, store_bytes
from storage import deletion, rejection

KOS = rejection.KEY_OBJECT_SELECTION


def note(references, patient_id="PAT1", code=("113001", "DCM", "Rejected for Quality Reasons"),
         study_uid=None):
    """A Key Object Selection Document titled ``code`` naming (study, series, SOP) refs."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = KOS, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = patient_id, "Doe^Jane", "KO"
    ds.StudyInstanceUID = study_uid or references[0][0]
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 99, 1
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code
    ds.ConceptNameCodeSequence = [title]
    by_study = {}
    for study, series, sop in references:
        by_study.setdefault(study, {}).setdefault(series, []).append(sop)
    evidence = []
    for study, series_refs in by_study.items():
        item = Dataset()
        item.StudyInstanceUID = study
        item.ReferencedSeriesSequence = []
        for series, sops in series_refs.items():
            s = Dataset()
            s.SeriesInstanceUID = series
            s.ReferencedSOPSequence = []
            for sop in sops:
                r = Dataset()
                r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID = CTImageStorage, sop
                s.ReferencedSOPSequence.append(r)
            item.ReferencedSeriesSequence.append(s)
        evidence.append(item)
    ds.CurrentRequestedProcedureEvidenceSequence = evidence
    return ds


def _send(node, datasets, tmp_path, sop_class=CTImageStorage):
    items = [(sop_class, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in datasets]
    return store_bytes(node.port, items, tmp_path)


@pytest.fixture
def rejecting_node(tmp_path):
    from service.ae import Node
    from service.config import load_settings
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             stable_age=3600.0, rejection_notes_from="CT1,TESTSCU")
    running = Node(settings, compaction=False).start()
    yield running
    running.stop()


def test_a_rejection_note_deletes_what_it_names_and_stays(rejecting_node, tmp_path, caplog):
    node = rejecting_node
    series = sorted(make_series(4, 16, 16, seed=3), key=lambda ds: ds.InstanceNumber)
    sent = {ds.SOPInstanceUID: dataset_bytes(ds) for ds in series}
    assert _send(node, series, tmp_path) == [0, 0, 0, 0]
    assert node.archive.compact_series(series[0].SeriesInstanceUID)
    study, uid = series[0].StudyInstanceUID, series[0].SeriesInstanceUID
    refs = [(study, uid, series[1].SOPInstanceUID), (study, uid, series[2].SOPInstanceUID),
            (study, generate_uid(), series[3].SOPInstanceUID),      # the wrong series
            (study, uid, generate_uid())]                            # not held
    kos = note(refs)
    with caplog.at_level("WARNING"):
        assert _send(node, [kos], tmp_path, KOS) == [0]
    status, matches = find(node.port, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study,
                                       "SOPInstanceUID": "", "SOPClassUID": ""})
    assert status == 0 and sorted(str(m.SOPInstanceUID) for m in matches) == sorted(
        [series[0].SOPInstanceUID, series[3].SOPInstanceUID, kos.SOPInstanceUID])
    for ds in (series[0], series[3]):      # the stack's others, staged again, as received
        assert node.archive.retrieve(ds.SOPInstanceUID).data == sent[ds.SOPInstanceUID][1]
    (row,) = deletion.history(node.archive.index)
    assert (row["level"], row["uid"], row["instances"]) == ("instances", kos.SOPInstanceUID, 2)
    assert row["reason"].startswith("Rejected for Quality Reasons: rejection note " +
                                    kos.SOPInstanceUID + " from TESTSCU@127.0.0.1")
    passed = [r.getMessage() for r in caplog.records if "passed over" in r.getMessage()]
    assert any(f"{series[3].SOPInstanceUID}: held in study" in m for m in passed)
    assert any("not held" in m for m in passed)
    # a mistaken note can be undone: the rejected instances wait in the recycle bin
    (entry,) = node.archive.recycle.entries()
    assert (entry.level, entry.uid) == ("instances", kos.SOPInstanceUID)
    assert node.archive.restore_deleted(entry.name)["restored"] == 2
    for ds in series[1:3]:
        assert node.archive.retrieve(ds.SOPInstanceUID).data == sent[ds.SOPInstanceUID][1]


def test_a_rejection_note_from_anyone_else_or_for_another_patient_deletes_nothing(
        rejecting_node, tmp_path, caplog):
    from service.ae import Node
    from service.config import load_settings
    node = rejecting_node
    series = make_series(2, 8, 8, seed=4)
    assert _send(node, series, tmp_path) == [0, 0]
    refs = [(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in series]
    assert _send(node, [note(refs, patient_id="SOMEONE_ELSE")], tmp_path, KOS) == [0]
    assert len(find(node.port, {"QueryRetrieveLevel": "IMAGE", "PatientID": "PAT1",
                                "SOPInstanceUID": ""})[1]) == 3
    # a node that takes rejection notes from no one stores them as any instance
    settings = load_settings(data_dir=str(tmp_path / "other"), host="127.0.0.1", port=0)
    other = Node(settings, compaction=False).start()
    try:
        assert _send(other, series, tmp_path) == [0, 0]
        with caplog.at_level("WARNING"):
            assert _send(other, [note(refs)], tmp_path, KOS) == [0]
        assert len(find(other.port, {"QueryRetrieveLevel": "IMAGE", "PatientID": "PAT1",
                                     "SOPInstanceUID": ""})[1]) == 3
        assert any("not in rejection_notes_from" in r.getMessage() for r in caplog.records)
        # until the settings, read again (SIGHUP), name the sender
        other.reload(load_settings(data_dir=str(tmp_path / "other"), host="127.0.0.1", port=0,
                                   rejection_notes_from="TESTSCU"))
        assert _send(other, [note(refs[:1])], tmp_path, KOS) == [0]
        held = {str(m.SOPInstanceUID) for m in find(other.port, {
            "QueryRetrieveLevel": "IMAGE", "PatientID": "PAT1", "SOPInstanceUID": ""})[1]}
        assert refs[0][2] not in held and refs[1][2] in held
    finally:
        other.stop()


def test_only_the_rejecting_titles_are_rejection_notes():
    refs = [("1.2.3", "1.2.3.4", "1.2.3.4.5")]
    for code, meaning in rejection.TITLES.items():
        read = rejection.read_note(*reversed(dataset_bytes(note(refs, code=(*code, meaning)))))
        assert read.title == meaning and read.references == refs and read.patient_id == "PAT1"
    of_interest = note(refs, code=("113000", "DCM", "Of Interest"))
    assert rejection.read_note(*reversed(dataset_bytes(of_interest))) is None
    (ct,) = make_series(1, 8, 8)
    assert rejection.read_note(*reversed(dataset_bytes(ct))) is None


def test_a_rejection_note_by_stow_rs_is_applied_for_the_web_users_named(tmp_path):
    """STOW-RS: a note from a web user that ``rejection_notes_from`` names as ``@NAME`` deletes
    what it names; from another writer (the shared token) it is only stored, unless ``@*``."""
    import urllib.request
    from node_helpers import file_bytes
    from service.ae import Node
    from service.config import load_settings
    from service.web_auth import token_digest
    from service.web_server import start_admin
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             http_port=0, stable_age=3600.0, http_token="shared",
                             http_users={"qa": f"admin:{token_digest('qa-token')}"},
                             rejection_notes_from="CT1,@qa")
    node = Node(settings, compaction=False).start()
    site = start_admin(node)

    def stow(ds, token):
        boundary = "n0te"
        body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + \
            file_bytes(ds) + f"\r\n--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            f"{site.url}/dicom-web/studies", data=body, method="POST", headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": f'multipart/related; type="application/dicom"; '
                                f'boundary={boundary}'})
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status

    def held():
        return {str(m.SOPInstanceUID) for m in find(node.port, {
            "QueryRetrieveLevel": "IMAGE", "PatientID": "PAT1", "SOPInstanceUID": ""})[1]}
    try:
        series = make_series(3, 8, 8, seed=6)
        assert _send(node, series, tmp_path) == [0, 0, 0]
        refs = [(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in series]
        for ds in series:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assert stow(note(refs[:1]), "shared") == 200                 # stored, not applied
        assert refs[0][2] in held()
        assert stow(note(refs[1:2]), "qa-token") == 200              # @qa: applied
        assert refs[1][2] not in held() and refs[0][2] in held()
        node.reload(load_settings(data_dir=node.settings.data_dir, http_token="shared",
                                  rejection_notes_from="@*"))
        assert stow(note(refs[:1]), "shared") == 200                 # anyone who may write
        assert refs[0][2] not in held() and refs[2][2] in held()
    finally:
        site.stop()
        node.stop()
