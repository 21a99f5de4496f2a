"""The conformance statement: written from the running code, current in docs/, and every claim
it makes about contexts, syntaxes and C-FIND keys holds against a running node."""

import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.presentation import build_context
from pydicom.uid import ExplicitVRLittleEndian

from admin_helpers import admin_site, http_token  # noqa: F401
from node_helpers import dataset_bytes, file_bytes, make_series, node  # noqa: F401
from scu_helpers import find, store_bytes
from service.cli import main
from service.config import load_settings
from service.conformance import statement
from storage import part10

DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _section(text: str, title: str) -> str:
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def _uids(text: str) -> list[str]:
    return re.findall(r"`(1\.2\.840\.10008\.[0-9.]+)`", text)


def _find_rows(text: str) -> list[tuple[str, str, str]]:
    """(level, keyword, matching) of the C-FIND key table."""
    rows = re.findall(r"^\| (PATIENT|STUDY|SERIES|IMAGE) \| (\w+) \| \([0-9A-F,]+\) \| \w+ \| "
                      r"(.+) \|$", _section(text, "## 6."), re.M)
    assert rows, "no C-FIND key table"
    return rows


def _associate(port: int, contexts):
    ae = AE(ae_title="CONFSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, contexts=contexts, ae_title="VOXARC")
    assert assoc.is_established
    return assoc


def test_the_committed_statement_is_the_one_the_defaults_give():
    assert DOC.read_text(encoding="utf-8") == statement(load_settings()), \
        "docs/conformance.md is stale: run `voxarc conformance --out docs/conformance.md`"


def test_every_storage_class_listed_is_accepted_and_the_node_says_who_it_is(node):
    classes = _uids(_section(statement(node.settings), "## Appendix A"))
    assert len(classes) > 100 and CT in classes
    for start in range(0, len(classes), 100):         # at most 128 contexts an association
        assoc = _associate(node.port, [build_context(uid, [ExplicitVRLittleEndian])
                                       for uid in classes[start:start + 100]])
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        implementation = assoc.acceptor.implementation_class_uid
        assoc.release()
        assert accepted == set(classes[start:start + 100])
        assert implementation == part10.IMPLEMENTATION_CLASS_UID


def test_every_transfer_syntax_listed_is_accepted_as_proposed(node):
    syntaxes = _uids(_section(statement(node.settings), "## 4."))
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.90"} <= set(syntaxes)
    assoc = _associate(node.port, [build_context(CT, [ts]) for ts in syntaxes])
    accepted = sorted(str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts)
    assoc.release()
    assert accepted == sorted(syntaxes)


@pytest.fixture
def stored(node, tmp_path):
    """One CT series whose every listed C-FIND key holds a value."""
    series = make_series(3, 8, 8, patient_id="PAT9", patient_name="Roe^Ann", study_date="20240317")
    for ds in series:
        ds.PatientBirthDate, ds.StudyTime, ds.ReferringPhysicianName = "19700101", "101500", "Doc^Who"
        ds.SeriesDescription, ds.SeriesDate, ds.SeriesTime = "axial", "20240317", "101733"
        ds.BodyPartExamined, ds.ProtocolName, ds.PatientAge = "CHEST", "Thorax 1.0", "054Y"
        ds.NumberOfFrames = 1
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert store_bytes(node.port, items, tmp_path) == [0] * len(series)
    return series[0]


def _miss(keyword: str, value: str) -> str:
    """A value of the key's form that ``value`` does not match."""
    if keyword.endswith("UID"):
        return "1.2.3.4.5"
    if keyword in ("PatientBirthDate", "StudyDate", "SeriesDate"):
        return "19000101-19000102"
    if keyword in ("StudyTime", "SeriesTime"):
        return "000000-000001"
    return "9" if value.isdigit() else "NOPE"


def test_every_find_key_listed_comes_back_and_filters_as_claimed(node, stored):
    rows = _find_rows(statement(node.settings))
    for level, keyword, matching in rows:
        query = {"QueryRetrieveLevel": level, "StudyInstanceUID": stored.StudyInstanceUID,
                 keyword: ""}
        status, matches = find(node.port, query, patient_root=level == "PATIENT")
        assert status == 0 and matches, (level, keyword)
        value = str(matches[0].get(keyword, ""))
        assert keyword in matches[0] and value, f"{level} {keyword} came back empty"
        if "computed" in matching:
            continue
        assert find(node.port, query | {keyword: value}, level == "PATIENT")[1], keyword
        assert not find(node.port, query | {keyword: _miss(keyword, value)},
                        level == "PATIENT")[1], f"{keyword} does not filter"
        if "wildcard" in matching:
            assert find(node.port, query | {keyword: value[:1] + "*"}, level == "PATIENT")[1]
        if "case-insensitive" in matching:
            assert find(node.port, query | {keyword: value.upper()}, level == "PATIENT")[1]


def test_the_statement_follows_the_settings(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('ae_title = "ARCH1"\nport = 104\nduplicate_policy = "reject"\n'
                      'max_find_results = 500\npeers = { CT1 = "store", VIEW = "query,retrieve" }\n'
                      'destinations = { VIEWER = "VIEW@10.0.0.5:4006" }\n'
                      'http_token = "s3cret"\nhttp_port = 8080\n')
    out = tmp_path / "conformance.md"
    assert main(["conformance", "--config", str(config), "--out", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "`ARCH1`" in text and "| TCP port | 104 " in text
    assert "| Calling AE titles (what each may do) | `CT1` (store), `VIEW` (query, retrieve) |" \
        in text
    assert "| VIEWER | `VIEW` | 10.0.0.5:4006 |" in text and "No C-MOVE destination" not in text
    assert "refused (0xC220)" in text and "more than 500 matches are refused" in text
    assert "embedded defaults" not in text and "s3cret" not in text
    assert "`http://127.0.0.1:8080`; every request needs a token" in text


def _request(url: str, data: bytes | None = None, ctype: str = "") -> tuple[int, str]:
    """(status, Content-Type of the answer) of a GET, or of a POST of ``data``."""
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status, response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", "")


def _stow_body(ds) -> tuple[bytes, str]:
    boundary = "conformance-boundary"
    body = (b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
            + file_bytes(ds) + b"\r\n--" + boundary.encode() + b"--\r\n")
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_every_dicomweb_route_listed_answers_as_claimed(admin_site, tmp_path):
    node, admin = admin_site
    series = make_series(2, 16, 16, seed=11)
    items = [(ds.SOPClassUID, ds.SOPInstanceUID, *dataset_bytes(ds)) for ds in series]
    assert store_bytes(node.port, items, tmp_path) == [0, 0]
    ds = series[0]
    ids = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID,
           "sop": ds.SOPInstanceUID, "frames": "1", "frame": "1", "path": "7FE00010"}
    rows = re.findall(r"^\| (GET|POST) \| `(/[^`]*)` \| [^|]+ \| (.+) \|$",
                      _section(statement(node.settings), "## 10."), re.M)
    assert len(rows) >= 20
    for n, (method, path, answers) in enumerate(rows):
        url = admin.url + path.format(**ids)
        if method == "POST":
            new = make_series(1, 8, 8, study_uid=ds.StudyInstanceUID, seed=20 + n)[0]
            status, ctype = _request(url, *_stow_body(new))
            assert status == 200 and ctype.startswith("application/dicom+json"), (path, status)
            continue
        if path == "/wado":
            url += (f"?requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID="
                    f"{ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
                    "&contentType=application/dicom")
        status, ctype = _request(url)
        claimed = re.search(r"`([a-z]+/[a-z+-]+)", answers).group(1)
        assert status == 200 and ctype.startswith(claimed), (path, status, ctype, claimed)
