"""`voxarc serve | import | compress [--recode] | stats`: the storage node's commands.

Each builds the same objects the tests build (:class:`service.ae.Node`, :class:`Archive`) from
the same settings: embedded defaults, ``--config`` TOML file, then flags.
"""

from __future__ import annotations

import functools
import getpass
import json
import logging
import signal
import time
import zipfile
from pathlib import Path, PurePosixPath

from service.ae import Node, open_archive
from service import patrol, retention
from service.config import add_node_options, settings_from_args
from service.progress import Progress
from service.web_server import start_admin, token_from_env
from storage import holds, reports
from storage.errors import StorageError
from storage.part10 import split_file
from storage.recode import RecodeError

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the node's sub-commands to the ``voxarc`` parser."""
    p = subparsers.add_parser("serve", help="run the DICOM storage node")
    add_node_options(p)
    p.add_argument("--port", type=int, help="TCP port (default 11112)")
    p.add_argument("--ae-title", help="AE title (default VOXARC)")
    p.add_argument("--stable-age", type=float, help="seconds before a series is compacted")
    p.add_argument("--destination", action="append", metavar="NAME=AET@HOST:PORT",
                   help="C-MOVE destination (repeatable)")
    p.add_argument("--forward", action="append", metavar="NAME=RULE",
                   help="send each stable series matching RULE (Keyword=pattern; ..., or "
                        "empty: all) to destination NAME (repeatable)")
    p.add_argument("--http-port", type=int, help="admin web page port (default 8042)")
    p.add_argument("--http-host", help="admin web page address (default 127.0.0.1)")
    p.add_argument("--http-token", help="token the admin web page requires (default none; "
                   "or set VOXARC_HTTP_TOKEN)")
    p.add_argument("--hl7-port", type=int, help="HL7 ADT listener port (default none)")
    p.set_defaults(func=serve)

    p = subparsers.add_parser("import", help="load DICOM files from folders (no network)")
    add_node_options(p)
    p.add_argument("paths", nargs="+",
                   help="files, folders (searched recursively) or ZIP files of DICOM files")
    p.set_defaults(func=import_files)

    p = subparsers.add_parser("compress", help="compress staged series")
    add_node_options(p)
    p.add_argument("--now", action="store_true",
                   help="compress everything pending regardless of stable_age, then exit")
    p.add_argument("--recode", action="store_true",
                   help="instead, code the stored stacks of older blob formats or other models "
                   "again with today's codec (each checked, swapped in only when smaller), and "
                   "lone images an older release deflated as one-slice volumes")
    p.set_defaults(func=compress)

    p = subparsers.add_parser("stats", help="print what is stored")
    add_node_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=stats)


def _serve_settings(args):
    """The settings ``serve`` runs with: the file's (or the embedded defaults), then its flags."""
    return settings_from_args(args, port=args.port, ae_title=args.ae_title,
                              stable_age=args.stable_age, destination=args.destination,
                              forward=args.forward, http_port=args.http_port,
                              http_host=args.http_host, http_token=args.http_token,
                              hl7_port=args.hl7_port)


def serve(args) -> int:
    """Run until SIGTERM or SIGINT, then stop cleanly; read the settings again on SIGHUP."""
    settings = _serve_settings(args)
    stop = _stop_signals()
    try:
        node = Node(settings).start()
    except (OSError, ValueError) as exc:
        log.error("cannot listen on port %s (DICOM) or %s (HL7): %s", settings.port,
                  settings.hl7_port or "-", exc)
        return 1
    print(f"listening on port {node.port}", flush=True)
    try:
        admin = start_admin(node)                # admin page, JSON API, /metrics (service.web)
    except (OSError, RuntimeError) as exc:
        log.error("cannot serve the admin page on %s:%s: %s", settings.http_host,
                  settings.http_port, exc)
        node.stop()
        return 1
    print(f"admin page on {admin.url}/", flush=True)
    log.info("DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at %s/dicom-web", admin.url)
    # a timed wait: a signal the kernel hands to another thread only sets a flag, and Python runs
    # the handler when the main thread next wakes (an untimed wait could sleep through SIGTERM)
    reload = _reload_signal()
    while not stop:
        time.sleep(0.5)
        if reload:
            reload.clear()
            _reload(args, node)
    log.info("signal received, stopping")
    admin.stop()
    node.stop()
    return 0


def _stop_signals() -> list[int]:
    """A list that SIGTERM and SIGINT append to from now on. The handler takes no lock: one
    that set a threading.Event could be entered again by a second signal while it held the
    Event's lock, and the node then never stopped (a burst of SIGTERM and SIGINT hung it 6 times
    in 6)."""
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


def _reload_signal() -> list[int]:
    """A list that SIGHUP appends to (see :func:`_stop_signals` for why a list)."""
    received: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: received.append(signum))
    return received


def _reload(args, node) -> None:
    """Read the settings file again and take what can change while running
    (:data:`service.ae.RELOADABLE`) into the node; a file that no longer loads, or that would
    open the admin page to anyone, changes nothing (logged)."""
    settings = node.settings
    try:
        fresh = _serve_settings(args)
    except (OSError, ValueError) as exc:
        log.error("SIGHUP: settings not reloaded: %s", exc)
        return
    token_from_env(fresh)
    if (settings.http_token or settings.http_users) and not (fresh.http_token or fresh.http_users):
        log.error("SIGHUP: settings not reloaded: they name no token and no user, which would "
                  "open the admin page and DICOMweb to anyone (restart the node for that)")
        return
    applied, pending = node.reload(fresh)
    log.info("SIGHUP: settings reloaded (%s)", ", ".join(applied) or "unchanged")
    if pending:
        log.warning("SIGHUP: changed in the settings file, applied at the next restart: %s",
                    ", ".join(pending))


def _files(paths: list[str]):
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            yield p
        else:
            log.warning("no such file or folder: %s", p)


def _items(paths: list[str], opened: list) -> list[tuple[str, str, object]]:
    """(name to log, file name, a function reading its bytes) of each file under ``paths``; a
    ``.zip`` file's members in its place (a study sent as a ZIP, voxarc's own download). The ZIP
    files stay open in ``opened`` for their members to be read."""
    out = []
    for path in _files(paths):
        if path.suffix.lower() == ".zip" and zipfile.is_zipfile(path):
            archive = zipfile.ZipFile(path)
            opened.append(archive)
            out += [(f"{path}!{info.filename}", PurePosixPath(info.filename).name,
                     functools.partial(archive.read, info))
                    for info in archive.infolist() if not info.is_dir()]
        else:
            out.append((str(path), path.name, path.read_bytes))
    return out


def import_files(args) -> int:
    """Stage every DICOM file under the given paths (and in the ZIP files among them) through
    the same ingest as C-STORE; a media file-set's DICOMDIR (a CD's, a USB stick's) is passed
    over: it indexes the files, which are imported themselves."""
    archive, opened = open_archive(settings_from_args(args)), []
    try:
        items = _items(args.paths, opened)
        progress, stored, failed, directories = Progress("import", len(items)), 0, 0, 0
        actor = f"cli import ({getpass.getuser()})"        # for the audit messages
        for shown, name, read in items:
            if name.upper() == "DICOMDIR":       # the name PS3.10 keeps for it
                directories += 1
                log.info("passed over %s: a media directory, not an instance", shown)
                progress.advance(note=name)
                continue
            try:
                ts, data = split_file(read())
                result = archive.store(data, ts)
                stored += result.outcome != "duplicate_ignored"
                archive.accesses.note(actor, "import", result.study_uid, instances=1,
                                      detail=" ".join(map(str, args.paths)), keep=False)
            except (StorageError, zipfile.BadZipFile, OSError) as exc:
                failed += 1
                log.warning("not imported %s: %s", shown, exc)
            progress.advance(note=name)
        log.info("imported %d of %d files in %.1f s (%d refused%s)", stored, len(items),
                 progress.finish(), failed,
                 f", {directories} DICOMDIR passed over" if directories else "")
    finally:
        for zipped in opened:
            zipped.close()
        archive.close()
    return 1 if failed and not stored else 0


def compress(args) -> int:
    """Compress staged series (all of them with --now, else those past stable_age), or with
    --recode the stored stacks again."""
    settings = settings_from_args(args)
    archive = open_archive(settings)
    if args.recode:
        return recode(archive)
    stable_age = 0.0 if args.now else settings.stable_age
    series = archive.pending_series(stable_age)
    progress, failed = Progress("compress", len(series)), 0
    for series_id in series:
        failed += not archive.compactor.compact_series(series_id)
        progress.advance(note=f"series {series_id}")
    log.info("compressed %d series in %.1f s (%d failed)", len(series) - failed,
             progress.finish(), failed)
    archive.close()
    return 1 if failed else 0


def recode(archive) -> int:
    """Code the archive's stored stacks again with today's codec (storage.recode), and its
    lone images deflated by an older release as one-slice volumes (storage.lone_images); 1
    when some could not be."""
    lone = archive.restage_lone_images()
    failed_lone = sum(not archive.compactor.compact_series(series_id) for series_id in lone)
    if lone:
        log.info("recode: lone images of %d series staged again and compacted (%d failed)",
                 len(lone), failed_lone)
    recoder = archive.recoder()
    blobs = recoder.volume_blobs()
    progress = Progress("recode", len(blobs))
    states, failed, before, after = {}, 0, 0, 0
    for blob_id in blobs:
        try:
            done = recoder.recode(blob_id)
        except RecodeError as exc:
            log.error("recode: %s", exc)
            failed += 1
            progress.advance(note=f"blob {blob_id} failed")
            continue
        states[done.state] = states.get(done.state, 0) + 1
        if done.state == "recoded":
            before, after = before + done.old_bytes, after + done.new_bytes
            log.info("recoded blob %d (format %d): %d -> %d bytes", blob_id, done.old_format,
                     done.old_bytes, done.new_bytes)
        progress.advance(note=f"blob {blob_id} {done.state}")
    log.info("recode: %d of %d stacks recoded (%d -> %d bytes), %d already current (or no "
             "smaller in today's format), %d kept (not smaller), %d failed, in %.1f s",
             states.get("recoded", 0), len(blobs), before, after, states.get("current", 0),
             states.get("kept", 0), failed, progress.finish())
    archive.close()
    return 1 if failed or failed_lone else 0


def _integrity(last: dict | None) -> str:
    if last is None:
        return "not read back by a running node's patrol yet"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last["finished"]))
    damaged = last["damaged_instances"]
    files = last["files"]
    return (f"{files} file{'s' * (files != 1)} read back {when}: "
            + (f"{damaged} instances DAMAGED (run voxarc verify)" if damaged else "no damage"))


def _retention(settings, last: dict | None) -> str:
    rules = f"{len(settings.retention)} rules" if settings.retention else "no rules now"
    if last is None:
        return f"{rules}, not applied yet"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(last["started"]))
    if "error" in last:
        return f"{rules}; the run of {when} failed (see the log)"
    totals = retention.run_totals(last)
    return (f"{rules}; last run {when}: {totals['deleted']} records, "
            f"{totals['deleted_instances']} instances deleted"
            + (f", {totals['failed']} FAILED (see the log)" if totals["failed"] else ""))


def _room(room: dict) -> str:
    bound = " (max_storage_bytes)" if room["bound"] == "max_storage_bytes" else ""
    pace = (f"about {room['days_left']:.0f} days at {room['stored_per_day_bytes']} bytes a day"
            if room["days_left"] is not None else "no growth")
    days = room["window_days"]
    return (f"{room['room_bytes']} bytes free{bound}; {pace} over the last "
            f"{days} day{'s' if days != 1 else ''}")


def stats(args) -> int:
    """Print counts and bytes of what is stored."""
    settings = settings_from_args(args)
    archive = open_archive(settings)
    out = archive.stats()
    out.update(reports.bits_per_voxel(archive.index))
    out["by_modality"] = reports.by_modality(archive.index)
    out["integrity"] = patrol.last_round(archive)
    out["room"] = reports.room_now(archive.index, archive.data_dir, out["stored_bytes"],
                                   settings.max_storage_bytes)
    out["holds"] = sum(h.through is None for h in holds.listing(archive.index))
    out["retention"] = retention.last_run(archive)
    archive.close()
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"instances  {out['instances']} ({out['pending_instances']} waiting for compaction)"
          f"\nseries     {out['series']}\nstudies    {out['studies']}"
          f"\nreceived   {out['original_bytes']} bytes\nstored     {out['stored_bytes']} "
          f"bytes (ratio {out['ratio']})\ncoded      {out['coded_voxels']} voxels at "
          f"{out['bits_per_voxel']} bits/voxel (received at {out['original_bits_per_voxel']})")
    if out["deferred_stacks"]:
        print(f"deferred   {out['deferred_stacks']} stacks coded without adaptation while "
              "compaction was behind (coded again when the node is idle)")
    if out["recycle_bin_bytes"]:
        print(f"recycle    {out['recycle_bin_bytes']} bytes of deleted instances kept "
              "restorable (voxarc deleted)")
    if out["holds"]:
        print(f"holds      {out['holds']} studies or patients on legal hold (voxarc hold)")
    if settings.retention or out["retention"]:
        print("retention  " + _retention(settings, out["retention"]))
    print("integrity  " + _integrity(out["integrity"]))
    print("room       " + _room(out["room"]))
    if out["by_modality"]:
        print(f"\n{'modality':<10}{'instances':>10}{'received':>14}{'stored':>14}{'ratio':>8}")
        for row in out["by_modality"]:
            print(f"{row['modality']:<10}{row['instances']:>10}{row['original_bytes']:>14}"
                  f"{row['stored_bytes']:>14}{row['ratio']:>8}")
    return 0
