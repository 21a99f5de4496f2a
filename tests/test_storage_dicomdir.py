"""storage.dicomdir: the records of a file-set linked by their offsets, read back by pydicom's
FileSet and, when installed, checked by dicom3tools' dciodvfy."""

import pytest
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from node_helpers import iod_errors, make_series, needs_dciodvfy
from storage.dicomdir import Directory


def _instances():
    """Two patients; the first with two studies (two series in one), the second in UTF-8."""
    a = make_series(3, 4, 4, patient_id="P1", seed=1)
    b = make_series(2, 4, 4, patient_id="P1", modality="MR", seed=2,
                    study_uid=a[0].StudyInstanceUID)
    c = make_series(2, 4, 4, patient_id="P1", seed=3, transfer_syntax=JPEGLSLossless)
    d = make_series(2, 4, 4, patient_id="P2", patient_name="Ærø^Åse", seed=4)
    for ds in d:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return a + b + c + d


def _written(directory: Directory, tmp_path, file_ids):
    """The DICOMDIR in ``tmp_path``, beside empty files at its file IDs (pydicom's FileSet
    leaves out a record whose file is missing)."""
    for file_id in file_ids:
        (tmp_path / file_id).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file_id).touch()
    path = tmp_path / "DICOMDIR"
    path.write_bytes(directory.encode("TESTSET"))
    return path


@needs_dciodvfy
def test_records_link_patients_studies_series_and_instances(tmp_path):
    directory, ids = Directory(), {}
    instances = _instances()
    for ds in instances:
        ids[ds.SOPInstanceUID] = directory.add(ds)
    assert len(directory) == len(instances)
    assert ids[instances[0].SOPInstanceUID] == "PT000000/ST000000/SE000000/IM000000"
    assert ids[instances[3].SOPInstanceUID] == "PT000000/ST000000/SE000001/IM000000"
    assert ids[instances[5].SOPInstanceUID] == "PT000000/ST000001/SE000000/IM000000"
    assert ids[instances[8].SOPInstanceUID] == "PT000001/ST000000/SE000000/IM000001"
    path = _written(directory, tmp_path, ids.values())
    fs = FileSet(path)
    assert fs.ID == "TESTSET" and len(fs) == len(instances)
    for ds in instances:
        (found,) = fs.find(SOPInstanceUID=ds.SOPInstanceUID)
        assert found.FileID.replace("\\", "/") == ids[ds.SOPInstanceUID]
        assert (found.PatientID, found.StudyInstanceUID, found.SeriesInstanceUID) == \
            (ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
        assert found.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert found.ReferencedSOPClassUIDInFile == ds.SOPClassUID
    assert str(fs.find(PatientID="P2")[0].PatientName) == "Ærø^Åse"
    assert {i.TransferSyntaxUID for i in fs} == {ExplicitVRLittleEndian, JPEGLSLossless}
    iods, errors = iod_errors(path)
    assert iods == ("BasicDirectory",) and not errors, errors


def test_what_cannot_be_recorded_adds_nothing(tmp_path):
    directory = Directory()
    first = make_series(1, 4, 4, seed=5)[0]
    file_id = directory.add(first)
    with pytest.raises(ValueError, match="already in the file-set"):
        directory.add(first)
    undated = make_series(1, 4, 4, patient_id="P9", seed=6)[0]
    del undated.StudyDate                 # a STUDY record needs one: no PATIENT record either
    with pytest.raises(ValueError, match="no STUDY record"):
        directory.add(undated)
    palette = make_series(1, 4, 4, seed=7)[0]
    palette.SOPClassUID = "1.2.840.10008.5.1.4.39.1"      # Color Palette Storage
    with pytest.raises(ValueError, match="stands alone"):
        directory.add(palette)
    fs = FileSet(_written(directory, tmp_path, [file_id]))
    assert [i.SOPInstanceUID for i in fs] == [first.SOPInstanceUID]
    assert {i.PatientID for i in fs} == {"PAT1"}
