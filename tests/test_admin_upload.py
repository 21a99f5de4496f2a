"""The admin page's import of DICOM files (service/static/upload.js), run in headless Chromium:
files go through STOW-RS in batches and are stored byte for byte; a DICOMDIR and files that are
not DICOM are passed over; what the node refuses comes back with its reason. Skipped only when
no Chromium binary is installed (CI installs Debian's)."""

import base64
import functools
import http.server
import json
import re
import threading

import pytest

from admin_helpers import CHROMIUM, chromium
from node_helpers import file_bytes, make_series
from storage.part10 import split_file

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary installed")

HARNESS = """<!doctype html><meta charset="utf-8">
<script src="{admin}/static/upload.js"></script>
<script>
const files = {files}.map(([name, b64]) => new File(
  [Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
const progress = [];
VoxarcUpload.send(files, {{ base: "{admin}", maxBytes: {batch},
                           onProgress: (done, total) => progress.push([done, total]) }})
  .then((result) => {{ result.progress = progress; document.title = "done";
                       document.body.dataset.result = JSON.stringify(result); }})
  .catch((err) => {{ document.body.dataset.result = JSON.stringify({{ error: String(err) }}); }});
</script><body></body>"""


@pytest.fixture
def cors_site(tmp_path):
    """A node whose admin server lets pages of any origin call it (http_cors_origins = *)."""
    from service.ae import Node
    from service.config import load_settings
    from service.web_server import start_admin
    settings = load_settings(data_dir=str(tmp_path / "node"), host="127.0.0.1", port=0,
                             http_port=0, stable_age=3600.0, http_cors_origins="*")
    node = Node(settings, compaction=False).start()
    admin = start_admin(node)
    yield node, admin
    admin.stop()
    node.stop()


def _served(folder):
    """An HTTP server of ``folder`` on a free port (the harness' own origin)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_page_imports_files_through_stow_rs(cors_site, tmp_path):
    node, admin = cors_site
    series = make_series(5, 16, 16, seed=31)
    files = [(f"IM{k}", file_bytes(ds)) for k, ds in enumerate(series)]
    other_study = make_series(1, 8, 8, seed=32)[0]
    node.archive.store(*reversed(split_file(file_bytes(other_study))))
    clash = make_series(1, 8, 8, seed=33)[0]
    clash.SOPInstanceUID = other_study.SOPInstanceUID            # held already: kept first
    broken = file_bytes(make_series(1, 8, 8, seed=34)[0])[:400]   # cut off in its header
    files += [("DICOMDIR", file_bytes(series[0])), ("README.TXT", b"a viewer, not DICOM"),
              ("AGAIN", file_bytes(clash)), ("BROKEN", broken)]
    page = tmp_path / "www" / "harness.html"
    page.parent.mkdir()
    page.write_text(HARNESS.format(
        admin=admin.url, batch=3 * len(files[0][1]),
        files=json.dumps([[n, base64.b64encode(b).decode()] for n, b in files])))
    server = _served(page.parent)
    try:
        dom = chromium(f"http://127.0.0.1:{server.server_port}/harness.html",
                       tmp_path / "profile", "--dump-dom", budget_ms=20000)
    finally:
        server.shutdown()
    raw = re.search(r'data-result="([^"]*)"', dom).group(1)
    result = json.loads(raw.replace("&quot;", '"').replace("&amp;", "&"))
    assert "error" not in result, result
    assert sorted(result["skipped"]) == ["DICOMDIR", "README.TXT"]
    assert result["progress"][0] == [0, 7] and result["progress"][-1] == [7, 7]
    assert len(result["progress"]) == 4                     # three requests of at most 3 files
    assert sorted(result["stored"]) == sorted(
        [ds.SOPInstanceUID for ds in series] + [other_study.SOPInstanceUID])
    (failure,) = result["failed"]
    assert failure["reason"] == 0xC210                      # cannot be parsed
    for ds, (_, data) in zip(series, files):
        assert node.archive.retrieve(ds.SOPInstanceUID).data == split_file(data)[1]
    assert node.archive.retrieve(other_study.SOPInstanceUID).data == \
        split_file(file_bytes(other_study))[1]              # the duplicate did not replace it
