"""The admin page's import of DICOM files (service/static/upload.js), run in headless Chromium:
files go through STOW-RS in batches and are stored byte for byte; a DICOMDIR and files that are
not DICOM are passed over; what the node refuses comes back with its reason. Skipped only when
no Chromium binary is installed (CI installs Debian's)."""

import base64
import http.server
import json
import threading

import pytest

from admin_helpers import CHROMIUM, chromium
from node_helpers import file_bytes, make_series
from storage.part10 import split_file

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium binary installed")

# The page holds a request to its own server open until it has posted its result: Chromium's
# virtual time stands still while a fetch is pending, so the page is not cut off while it
# waits on anything else (reading the files' slices, say).
HARNESS = """<!doctype html><meta charset="utf-8">
<script src="{admin}/static/upload.js"></script>
<script>
fetch("/hold");
const files = {files}.map(([name, b64]) => new File(
  [Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
const progress = [];
VoxarcUpload.send(files, {{ base: "{admin}", maxBytes: {batch},
                           onProgress: (done, total) => progress.push([done, total]) }})
  .then((result) => {{ result.progress = progress; return result; }})
  .catch((err) => ({{ error: String(err) }}))
  .then((result) => fetch("/result", {{ method: "POST", body: JSON.stringify(result) }}));
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


class _Harness(http.server.BaseHTTPRequestHandler):
    """Serves the page at ``/``, holds ``/hold`` until the page posts its result to
    ``/result``."""

    def do_GET(self):
        if self.path == "/hold":
            self.server.done.wait(60)
            body = b""
        else:
            body = self.server.page.encode()
        self.send_response(200 if self.path in ("/", "/hold") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.server.result = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.done.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def _run_page(page: str, profile) -> dict:
    """Open ``page`` in headless Chromium from a server of its own; return what it posted."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Harness)
    server.page, server.result, server.done = page, None, threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        chromium(f"http://127.0.0.1:{server.server_port}/", profile, "--dump-dom",
                 budget_ms=60000)
    finally:
        server.done.set()
        server.shutdown()
    assert server.result is not None, "the page posted no result"
    return server.result


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
    page = HARNESS.format(admin=admin.url, batch=3 * len(files[0][1]),
                          files=json.dumps([[n, base64.b64encode(b).decode()] for n, b in files]))
    result = _run_page(page, tmp_path / "profile")
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
