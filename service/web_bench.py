"""``voxarc bench-web``: a web viewer opening a compressed series, again, and again with its
browser's cache, as OHIF loads one (the series' metadata, then each instance's first frame in
instance order, one request at a time).

Per series: a fresh node is filled by DCMTK ``storescu`` and compacted (``voxarc compress
--now``), then started anew, so that the first opening finds the slab cache cold; the series is
opened three times in a row: first (no validators), again (the same requests: a viewer without
a cache, slabs now cached in the node), and revalidated (each request names the ETag its first
answer carried, as a browser that kept the answers does: ``304 Not Modified``). Each opening's
seconds, the time to its first frame, and the bytes the node sent; medians of ``--runs``.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from service.node_bench import (describe_series, free_port, median_of, push, start_voxarc,
                                voxarc_cli, wait_for_decoders)
from service.progress import Progress

log = logging.getLogger(__name__)
OPENINGS = ("first", "again", "revalidated")


def _fetch(url: str, tag: str | None) -> tuple[int, str, int]:
    """GET ``url`` (naming ``tag`` in If-None-Match); (status, its ETag, body bytes)."""
    headers = {"Accept-Encoding": "gzip"}
    if tag:
        headers["If-None-Match"] = tag
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=300) as response:
            return response.status, response.headers.get("ETag", ""), len(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code != 304:
            raise
        return 304, exc.headers.get("ETag", ""), len(exc.read())


def _instances(base: str) -> list[str]:
    """The series' instance URLs in instance number order (QIDO-RS)."""
    with urllib.request.urlopen(f"{base}/instances?includefield=00200013", timeout=60) as r:
        records = json.loads(r.read())

    def number(rec):
        return int((rec.get("00200013", {}).get("Value") or [0])[0])
    return [rec["00081190"]["Value"][0] for rec in sorted(records, key=number)]


def open_series(base: str, tags: dict | None) -> dict:
    """One opening: metadata, then each instance's first frame; with ``tags`` (URL -> ETag)
    revalidated. Returns seconds, first frame's seconds, bytes, 304s and the tags seen."""
    start = time.perf_counter()
    urls = [f"{base}/metadata"] + [f"{u}/frames/1" for u in _instances(base)]
    sent, unchanged, seen, first = 0, 0, {}, None
    for url in urls:
        status, tag, size = _fetch(url, (tags or {}).get(url))
        sent, unchanged, seen[url] = sent + size, unchanged + (status == 304), tag
        if first is None and url.endswith("/frames/1"):
            first = time.perf_counter() - start
    return {"seconds": time.perf_counter() - start, "first_frame_s": first, "bytes": sent,
            "not_modified": unchanged, "requests": len(urls), "tags": seen}


def bench_series(folder: Path, work: Path, runs: int) -> dict:
    """Fill, compact and open one series ``runs`` times over (each on a fresh start)."""
    info = describe_series(folder)
    data_dir = work / f"web-{info.name}"
    server = start_voxarc(data_dir)
    try:
        push(server, info.files, info.syntaxes)
    finally:
        server.stop()
    voxarc_cli("compress", "--now", "--data-dir", str(data_dir))
    results = {name: [] for name in OPENINGS}
    for run in range(runs):
        http_port = free_port()
        server = start_voxarc(data_dir, http_port)
        try:
            wait_for_decoders(server)
            base = (f"http://127.0.0.1:{http_port}/dicom-web/studies/{info.study_uid}"
                    f"/series/{info.series_uid}")
            first = open_series(base, None)
            again = open_series(base, None)
            revalidated = open_series(base, first["tags"])
        finally:
            server.stop()
        for name, result in zip(OPENINGS, (first, again, revalidated)):
            result.pop("tags")
            results[name].append(result)
        log.info("%s run %d: first %.2f s, again %.2f s, revalidated %.2f s (%d of %d "
                 "unchanged)", info.name, run + 1, first["seconds"], again["seconds"],
                 revalidated["seconds"], revalidated["not_modified"], revalidated["requests"])
    shutil.rmtree(data_dir, ignore_errors=True)
    return {"series": info.name, "instances": len(info.files), "runs": results,
            **{name: {key: median_of([r[key] for r in results[name]])
                      for key in ("seconds", "first_frame_s", "bytes", "not_modified")}
               for name in OPENINGS}}


def table(rows: list[dict]) -> str:
    """The Markdown table of :func:`bench_series` results."""
    out = ["| series | instances | opening | s | first frame s | MB sent | 304s |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for row in rows:
        for name in OPENINGS:
            m = row[name]
            out.append(f"| {row['series']} | {row['instances']} | {name} | {m['seconds']:.2f} | "
                       f"{m['first_frame_s']:.3f} | {m['bytes'] / 1e6:.2f} | "
                       f"{m['not_modified']:.0f} |")
    return "\n".join(out)


def register(subparsers) -> None:
    p = subparsers.add_parser("bench-web", help="a web viewer opening a compressed series: "
                              "first, again, and revalidated from its cache (ETag, 304)")
    p.add_argument("series", nargs="+", help="folders of one DICOM series each")
    p.add_argument("--runs", type=int, default=3, help="fresh starts per series (median)")
    p.add_argument("--json", help="write the results as JSON to this file")
    p.add_argument("--work-dir", help="keep the node's folder here (default: a temp dir)")
    p.set_defaults(func=bench_web)


def bench_web(args) -> int:
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="voxarc-web-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, progress = [], Progress("bench-web", len(args.series))
    for folder in args.series:
        rows.append(bench_series(Path(folder), work, args.runs))
        progress.advance(note=Path(folder).name)
    progress.finish()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0
