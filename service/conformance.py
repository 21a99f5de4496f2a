"""`voxarc conformance`: the node's DICOM Conformance Statement, from what it actually runs.

A PACS administrator asks for a device's conformance statement (PS3.2) before connecting it.
This one is written from the same objects the node runs on: the application entity's presentation
contexts and roles (:func:`service.ae.build_ae`), the C-FIND keys the index keeps and computes
(:mod:`storage.query`), the retrieve rules (:mod:`service.identifiers`), the status codes
(:mod:`service.statuses`) and the node's settings (AE title, port, PDU size, access rules,
destinations, TLS). So it cannot drift from the code; ``docs/conformance.md`` is its output for
the embedded defaults, and a test keeps the two equal.
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.uid import UID
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from service import dicomweb, dicomweb_store, statuses
from service.access import PERMISSIONS, AccessPolicy
from service.ae import QUERY_RETRIEVE, build_ae
from service.config import Settings, add_node_options, parse_destination, settings_from_args
from service.identifiers import UNIQUE_KEYS
from storage import media
from storage.query import ATTRIBUTES, COMPUTED, LEVELS

log = logging.getLogger(__name__)

_RANGE_VRS = ("DA", "TM", "DT")
_WILDCARD_VRS = ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT")   # PS3.4 C.2.2.2.4
# (service, status constant, meaning): what a peer may see beyond success and pending
_STATUSES = (
    ("C-STORE", statuses.OUT_OF_RESOURCES, "Refused: out of resources (disk full, write error, "
     "a size limit, or a commit whose outcome is unknown: send again)"),
    ("C-STORE", statuses.DATASET_MISMATCH, "Error: the dataset is not the instance the request "
     "names; nothing stored"),
    ("C-STORE", statuses.CANNOT_PARSE, "Error: cannot understand the dataset"),
    ("C-STORE", statuses.DUPLICATE_REFUSED, "Error: SOP Instance UID already stored and the "
     "duplicate policy is `reject`"),
    ("C-STORE", statuses.CLASS_MISMATCH_WARNING, "Warning: stored, but its SOP Class is not the "
     "request's"),
    ("C-FIND", statuses.IDENTIFIER_MISMATCH, "Error: no or an unknown Query/Retrieve Level, an "
     "unreadable identifier"),
    ("C-FIND", statuses.FIND_OUT_OF_RESOURCES, "Refused: more matches than `max_find_results`"),
    ("C-GET, C-MOVE", statuses.IDENTIFIER_MISMATCH, "Error: the level's unique key missing, a "
     "wildcard in a unique key, or a key below the level"),
    ("C-GET, C-MOVE", statuses.SUBOPERATIONS_FAILED, "Warning: some sub-operations failed"),
    ("C-GET, C-MOVE", 0xA702, "Refused: every sub-operation failed"),
    ("C-MOVE", statuses.UNKNOWN_DESTINATION, "Refused: move destination unknown"),
    ("any", statuses.UNABLE_TO_PROCESS, "Error: unable to process (logged with its cause)"),
)


def register(subparsers) -> None:
    """Add ``conformance`` to the ``voxarc`` parser."""
    p = subparsers.add_parser("conformance",
                              help="print the node's DICOM Conformance Statement (Markdown)")
    add_node_options(p)
    p.add_argument("--out", help="write it to this file instead")
    p.set_defaults(func=conformance)


def conformance(args) -> int:
    """Write the statement of the node the arguments configure."""
    text = statement(settings_from_args(args))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        log.info("conformance statement written to %s", args.out)
    else:
        print(text, end="")
    return 0


def statement(settings: Settings) -> str:
    """The DICOM Conformance Statement (Markdown) of a node with ``settings``."""
    ae = build_ae(settings)
    contexts = {str(cx.abstract_syntax): cx for cx in ae.supported_contexts}
    storage = sorted((uid for uid, cx in contexts.items() if cx.scp_role),
                     key=lambda uid: UID(uid).name)
    parts = [_header(settings, ae), _services(contexts, storage), _association(settings, ae),
             _syntaxes(contexts, storage), _store(settings), _find(settings),
             _retrieve(settings), _commitment(), _status_table(), _dicomweb(settings),
             _media(), _audit(settings), _hl7(settings), _appendix(storage)]
    return "\n".join(parts)


def _table(head: tuple, rows) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _header(settings: Settings, ae) -> str:
    return (
        "# DICOM Conformance Statement: voxarc\n\n"
        "Written by `voxarc conformance` from the node's own presentation contexts, query keys "
        "and settings" + (" (here: the embedded defaults)" if settings == Settings() else "")
        + ". voxarc is a storage node: it stores what modalities send, answers queries and "
        "gives every instance back as it was received, its image series kept losslessly "
        "compressed.\n\n## 1. Implementation\n\n"
        + _table(("item", "value"), [
            ("Implementation Class UID", f"`{ae.implementation_class_uid}`"),
            ("Implementation Version Name", f"`{ae.implementation_version_name}`"),
            ("DICOM libraries", f"pynetdicom {version('pynetdicom')}, pydicom {version('pydicom')}"),
            ("AE title", f"`{settings.ae_title}`"),
            ("TCP port", f"{settings.port} (listening on {settings.host})"),
        ]))


def _services(contexts: dict, storage: list[str]) -> str:
    for sop in (Verification, StorageCommitmentPushModel):
        assert str(sop) in contexts, f"{sop.name} is not offered"
    rows = [(Verification.name, "-", "yes")]
    rows.append((f"{len(storage)} Storage SOP Classes (Appendix A)",
                 "yes (C-GET, C-MOVE sub-operations; forwarding)",
                 "yes (C-STORE; C-GET sub-operations of `voxarc pull`)"))
    pulled = {"1.2.840.10008.5.1.4.1.2.2.1": "yes (`voxarc pull`)",
              "1.2.840.10008.5.1.4.1.2.2.2": "yes (`voxarc pull --move`)",
              "1.2.840.10008.5.1.4.1.2.2.3": "yes (`voxarc pull`)"}
    rows += [(UID(sop).name, pulled.get(sop, "-"), "yes") for sop in map(str, QUERY_RETRIEVE)]
    rows.append((StorageCommitmentPushModel.name,
                 "N-EVENT-REPORT (on an association it opens)", "yes (N-ACTION)"))
    return "## 2. Network services\n\n" + _table(("SOP Class", "SCU", "SCP"), rows)


def _association(settings: Settings, ae) -> str:
    peers = AccessPolicy.from_settings(settings.peers).peers
    calling = ", ".join(f"`{aet}` ({', '.join(p for p in PERMISSIONS if p in peers[aet])})"
                        for aet in sorted(peers))
    tls = ("TLS 1.2 or later only" + (", clients must present a certificate of the configured "
                                      "authorities" if settings.tls_ca_certificates else "")
           if settings.tls_certificate else "none (plain TCP)")
    rows = [
        ("Called AE title", f"must be `{settings.ae_title}`" if settings.require_called_ae_title
         else "any"),
        ("Calling AE titles (what each may do)", calling or "any (everything)"),
        ("Maximum PDU size received", f"{settings.max_pdu_size} bytes"),
        ("Simultaneous associations", str(settings.max_associations)),
        ("Timeouts (ACSE, DIMSE, network)",
         f"{ae.acse_timeout} s, {ae.dimse_timeout} s, {ae.network_timeout} s"),
        ("Time to reach a C-MOVE destination", f"{ae.connection_timeout:g} s"),
        ("Asynchronous operations", "not supported (one operation at a time per association)"),
        ("Extended negotiation", "SCP/SCU role selection for the Storage SOP Classes "
                                 "(C-GET); relational queries, combined date-time matching "
                                 "and fuzzy semantic matching of person names (C-FIND); "
                                 "relational retrieval (C-GET, C-MOVE)"),
        ("Secure transport", tls),
    ]
    return ("## 3. Association policies\n\nvoxarc accepts associations; it opens them only "
            "to send a C-MOVE's instances to a configured destination, a storage commitment "
            "result to the AE that asked for it, each stable series a forwarding rule matches "
            "to its destination (C-STORE, the contexts as for C-MOVE), and when an "
            "administrator runs `voxarc pull` "
            "(Study Root C-FIND at STUDY and IMAGE level, then C-GET of each study or of the "
            "instances it lacks, or with `--move` a C-MOVE of them to the node itself; for "
            "C-GET each storage SOP class proposed in the uncompressed syntaxes "
            "and in each common compressed syntax on contexts of their own, with the SCP role, "
            "so that the source can send what it holds as it holds it).\n\n" + _table(("policy", "value"), rows))


def _syntaxes(contexts: dict, storage: list[str]) -> str:
    stored = [str(ts) for ts in contexts[storage[0]].transfer_syntax]
    other = [str(ts) for ts in contexts[str(Verification)].transfer_syntax]
    rows = [(UID(ts).name, f"`{ts}`") for ts in stored]
    return (
        "## 4. Transfer syntaxes\n\nFor every Storage SOP Class, in both roles, each of these "
        "is accepted; an instance is stored and given back in the syntax it arrived in, byte "
        "for byte. A receiver that takes only uncompressed syntaxes gets it converted, "
        "losslessly, to Explicit or Implicit VR Little Endian (lossy syntaxes are never "
        "decompressed). When one context proposes several, the first in this order is "
        "accepted for storing to voxarc; for retrieving, the syntax the archive holds most "
        "instances of that class in.\n\n" + _table(("Transfer Syntax", "UID"), rows)
        + "\nVerification, Query/Retrieve and Storage Commitment: "
        + ", ".join(UID(ts).name for ts in other) + ".\n")


def _store(settings: Settings) -> str:
    duplicates = {"keep_first": "the first instance is kept, a later one with the same SOP "
                                "Instance UID is acknowledged and logged (as Orthanc does)",
                  "replace": "a later instance with the same SOP Instance UID replaces it",
                  "reject": "a later instance with the same SOP Instance UID is refused "
                            f"(0x{statuses.DUPLICATE_REFUSED:04X})"}
    policy = duplicates[settings.duplicate_policy]
    limit = (f"{settings.max_storage_bytes} bytes" if settings.max_storage_bytes
             else "the disk")
    return (
        "## 5. Storage SCP (C-STORE)\n\n"
        "- Every dataset is kept as received: every element, in its transfer syntax. Success "
        "is answered only once it is durable (its bytes synced to disk, its index row "
        "committed).\n"
        "- Level 2 (full) storage: image series are compressed losslessly once stable "
        f"({settings.stable_age:g} s without a new instance), and every instance is rebuilt "
        "byte for byte and checked against the SHA-256 recorded when it arrived before it is "
        "sent.\n"
        f"- Duplicates: {policy}.\n"
        f"- Size limits: a dataset of at most {settings.max_dataset_bytes} bytes; the archive "
        f"up to {limit}.\n"
        "- IHE IOCM rejection notes (a Key Object Selection Document titled (113001, DCM) "
        "Rejected for Quality Reasons, (113037, DCM) Rejected for Patient Safety Reasons, "
        "(113038, DCM) Incorrect Modality Worklist Entry or (113039, DCM) Data Retention Policy "
        "Expired) are stored; "
        + (f"from {_rejecters(settings.rejection_notes_from)} the instances they name are "
           "then deleted (only those held in the study and series the note names, of the "
           "patient it names), the note kept and sent on to the destinations that had their "
           "series" + (f"; the deleted instances stay restorable for {settings.deleted_keep_days:g} "
                       "days" if settings.deleted_keep_days > 0 else "") + ".\n"
           if settings.rejection_notes_from else
           "none is applied as configured (`rejection_notes_from` is empty).\n"))


def _rejecters(setting: str) -> str:
    titles = [t.strip() for t in setting.split(",") if t.strip()]
    return "any calling AE title" if "*" in titles else \
        "calling AE titles " + ", ".join(f"`{t}`" for t in titles)


def _find(settings: Settings) -> str:
    rows = []
    for level in LEVELS:
        for keyword, (lv, _) in ATTRIBUTES.items():
            if lv == level:
                rows.append(_key_row(level, keyword))
        for keyword, lv in COMPUTED.items():
            if lv == level:
                rows.append((level, keyword, _tag(keyword), dictionary_VR(keyword),
                             "returned (computed)"))
    for keyword, value in (("RetrieveAETitle", settings.ae_title),
                           ("InstanceAvailability", "ONLINE")):
        rows.append(("any", keyword, _tag(keyword), dictionary_VR(keyword),
                     f"`{value}` for every record; single value, universal, wildcard"))
    limit = (f"more than {settings.max_find_results} matches are refused (0x"
             f"{statuses.FIND_OUT_OF_RESOURCES:04X}), never cut" if settings.max_find_results
             else "no limit on the number of matches")
    return (
        "## 6. Query SCP (C-FIND)\n\nPatient Root and Study Root, levels PATIENT, STUDY, "
        "SERIES and IMAGE. A response carries every key asked for: those below with their "
        "values (a match at a level also carries the keys of the levels above it), any other "
        "key empty. Keys not in this table do not filter. Sequences, private keys and "
        "repeating groups in an identifier are ignored.\n\n"
        "Matching: an empty key is universal; single value; `\\`-separated lists (UID list "
        "matching); wildcards `*` and `?` on text keys; date and time ranges `a-b`, `-b`, "
        "`a-` on DA, TM and DT keys. Case-sensitive except person names (PN). Responses are in the query's "
        "character set when it holds every value, else in UTF-8 (ISO_IR 192); "
        f"{limit}.\n\n"
        "Queries are answered relationally whether or not it is negotiated: any key at any "
        "level, with or without the unique keys of the levels above.\n\n"
        "SOP Class Extended Negotiation, accepted when proposed: relational queries; "
        "combined date-time matching, where a StudyDate range with a StudyTime (SeriesDate "
        "with SeriesTime) is one range of moments (`20060705-20060707` with `1000-1800`: from "
        "July 5, 10:00 to July 7, 18:00; without it, 10:00 to 18:00 of each day); fuzzy "
        "semantic matching of person names, where a name also matches when each word of the "
        "key begins a word of the name, in any order, ignoring case and accents (`jane d` "
        "finds `Doe^Jane`). Timezone query adjustment and the other options are declined.\n\n"
        + _table(("level", "key", "tag", "VR", "matching"), rows))


def _key_row(level: str, keyword: str) -> tuple:
    vr = dictionary_VR(keyword)
    kinds = ["single value", "universal"]
    if keyword in UNIQUE_KEYS:
        kinds.insert(0, "unique key, UID list" if vr == "UI" else "unique key")
    if vr in _WILDCARD_VRS:
        kinds.append("wildcard")
    if vr in _RANGE_VRS:
        kinds.append("range")
    if vr == "PN":
        kinds.append("case-insensitive")
    return level, keyword, _tag(keyword), vr, ", ".join(kinds)


def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _retrieve(settings: Settings) -> str:
    keys = ", ".join(f"{level}: `{key}`" for level, key in zip(LEVELS, UNIQUE_KEYS))
    destinations = [(d.name, f"`{d.ae_title}`", f"{d.host}:{d.port}") for d in (
        parse_destination(f"{name}={text}") for name, text in settings.destinations.items())]
    moves = (_table(("destination", "AE title", "address"), destinations) if destinations
             else "No C-MOVE destination is configured: every C-MOVE is refused (0x"
                  f"{statuses.UNKNOWN_DESTINATION:04X}).\n")
    return (
        "## 7. Retrieve SCP (C-GET, C-MOVE)\n\nPatient Root and Study Root, levels PATIENT, "
        f"STUDY, SERIES and IMAGE. The unique key of the level is required ({keys}), keys of "
        "the levels above narrow it, and neither wildcards nor keys of lower levels are "
        "accepted; so a retrieve is relational whether or not relational retrieval is "
        "negotiated (it is accepted when proposed). C-GET sends on the same association (the client takes the SCP role for "
        "the Storage SOP Classes); C-MOVE opens an association to the destination, which must "
        "be configured (named by its AE title or its name); one that cannot be reached in time "
        "(section 3) or refuses the association is answered 0x"
        f"{statuses.UNKNOWN_DESTINATION:04X} as well:\n\n" + moves
        + "\nEach sub-operation sends the instance as received (or converted, section 4); "
        "the final response counts completed, failed and warning sub-operations.\n")


def _commitment() -> str:
    return (
        "## 8. Storage Commitment Push Model SCP\n\nAn N-ACTION request is answered at once; "
        "the result goes as an N-EVENT-REPORT on a new association to the requesting AE, "
        "which must be a configured destination. Every instance the node holds (indexed, its "
        "bytes on disk) is committed; any other fails with 0x0112 (no such instance) or 0x0119 "
        "(another SOP class). A request from an AE title that is not a destination is refused "
        "(0x0110).\n")


def _status_table() -> str:
    rows = [(service, f"0x{code:04X}", meaning) for service, code, meaning in _STATUSES]
    return "## 9. Status codes\n\n" + _table(("service", "status", "meaning"), rows)


# route (handler) name -> (service, what it answers)
_WEB_SERVICES = {
    "endpoint": ("QIDO-RS search", "`application/dicom+json`; the keys and matching of section "
                                   "6, by keyword or tag, `limit`, `offset`, `includefield`"),
    "retrieve": ("WADO-RS", '`multipart/related; type="application/dicom"`, the instances '
                            "as received"),
    "metadata": ("WADO-RS metadata", "`application/dicom+json`; the pixel data and binary "
                                     "values over 1 kB as BulkDataURIs"),
    "bulkdata": ("WADO-RS bulk data", '`multipart/related; type="application/octet-stream"`, '
                                      "the value a BulkDataURI names; the pixel data as the "
                                      "frames resource gives all frames"),
    "frames": ("WADO-RS frames", "`multipart/related`, the frames as stored (uncompressed, or "
                                 "the compressed bitstream)"),
    "rendered": ("WADO-RS rendered", "`image/jpeg` (the default), `image/png` or `image/gif` as "
                                     "`Accept` ranks them; `viewport`, `window` (linear, "
                                     "linear-exact, sigmoid), `quality`"),
    "rendered_all": ("WADO-RS rendered", "`multipart/related` of `image/jpeg` (the "
                                         "default), `image/png` or `image/gif`: every image "
                                         "of the study or series, as its instance renders"),
    "thumbnail": ("WADO-RS thumbnail", "`image/jpeg` (the default), `image/png` or `image/gif` "
                                       "as `Accept` ranks them; `viewport`"),
    "wado_uri": ("WADO-URI", "`application/dicom` (as received), `image/jpeg` (the default), "
                             "`image/png` or `image/gif`"),
    "store": ("STOW-RS", 'takes `multipart/related; type="application/dicom"` into the C-STORE '
                         "ingest path, answers `application/dicom+json`"),
}


def _dicomweb(settings: Settings) -> str:
    routes = dicomweb.routes(None, None) + dicomweb_store.routes(None)
    rows = [(", ".join(m for m in ("GET", "POST") if m in route.methods),
             f"`{route.path.replace(':path}', '}')}`",
             *_WEB_SERVICES[route.name]) for route in routes]
    access = ("every request needs a token (`Authorization: Bearer ...` or `?token=`): "
              "the shared one or a named user's (`http_users`; viewers may only read)"
              if settings.http_token or settings.http_users
              else "no token is configured: anyone who reaches the port")
    return (
        "## 10. DICOMweb (PS3.18)\n\nOn the admin server, "
        f"`{settings.http_public_url or f'http://{settings.http_host}:{settings.http_port}'}`"
        f"; {access}.\n\n"
        + _table(("method", "path", "service", "answers"), rows)
        + "\nTransfer syntaxes of WADO-RS instances: as received when `Accept` names none (no "
        "`transfer-syntax` parameter, `*`, a wildcard, or no header). PS3.18 makes Explicit VR "
        "Little Endian the default there; voxarc keeps the received bytes instead, which the "
        "standard gives for `transfer-syntax=*`. A client that names syntaxes gets one of them: "
        "as received when named, else Explicit (or Implicit) VR Little Endian converted "
        "losslessly (section 4), else 406. QIDO-RS `fuzzymatching=true` matches person names "
        "also when each word of the query begins a word of the name, in any order, ignoring "
        "case and accents (`jane doe` and `doe^j` find `Doe^Jane`, `muller` finds "
        "`MÜLLER^HANS`). WADO-RS answers (instances, metadata, frames, bulk data, rendered, "
        "thumbnails) carry a weak `ETag` (the instances' SHA-256s, the request and the node's "
        "start) and `Cache-Control: private, no-cache`; `If-None-Match` naming it is answered "
        "304 Not Modified.\n")


def _media() -> str:
    rows = [(f"`{keyword}`", made) for keyword, made in media.INVENTED.items()]
    return (
        "## 11. Media file-sets (PS3.10)\n\n"
        "File-set Creator (FSC) only, outside the network: `voxarc export --dicomdir` and the "
        "admin page's study and patient downloads (a ZIP) write a DICOMDIR (Basic Directory, "
        "Explicit VR Little Endian, File-set ID "
        f"`{media.FILE_SET_ID}`) with PATIENT, STUDY, SERIES and instance records, and the "
        "instances as Part 10 files named by 8-character upper-case components. By default "
        "each file's dataset is the one received, in its received transfer syntax, which its "
        "record names, and no PS3.12 application profile is claimed. With `--profile "
        "STD-GEN-CD` (the download's `profile=STD-GEN-CD`) every instance in another syntax "
        "is converted to Explicit VR Little Endian, losslessly and checked element by element "
        "and pixel by pixel, as for a C-GET receiver that takes only that syntax; the "
        "file-set is then an STD-GEN-CD one unless an instance holds lossy-compressed pixels, "
        "which are written as received and reported (the file-set is then not STD-GEN-CD). "
        "A Type 1 record key that an instance lacks, holds empty or holds in a "
        "form its VR does not allow is made up in the record only:\n\n"
        + _table(("record key", "made up as"), rows)
        + "\nAn instance no record can be made for (a record type whose own Type 1 keys it "
        "lacks) is left out and reported.\n")


def _audit(settings: Settings) -> str:
    rows = [("node start, stop", "110100 Application Activity (110120, 110121)", "E"),
            ("C-STORE, STOW-RS received", "110104 DICOM Instances Transferred", "C"),
            ("`voxarc import`, a restore from the recycle bin", "110107 Import", "C"),
            ("C-FIND, QIDO-RS", "110112 Query", "E"),
            ("C-GET, C-MOVE, forwarding, sends by hand, WADO-RS and WADO-URI reads",
             "110104 DICOM Instances Transferred", "R"),
            ("downloads, `voxarc export`", "110106 Export", "R"),
            ("`voxarc delete` of a patient or study", "110105 DICOM Study Deleted", "D"),
            ("`voxarc delete` of a series or instance", "110103 DICOM Instances Accessed", "D"),
            ("`voxarc correct`, HL7 ADT updates and merges", "110103 DICOM Instances "
             "Accessed", "U"),
            ("an association refused for its calling or called AE title",
             "110113 Security Alert (110126 Node Authentication)", "E"),
            ("an operation a peer may not use (`peers`)",
             "110113 Security Alert (110132 Use of Restricted Function)", "E"),
            ("an HTTP request without the admin token", "110114 User Authentication (110122 "
             "Login), failed", "E")]
    where = (f"this node sends them to `{settings.audit_syslog}`" if settings.audit_syslog
             else "this node sends none (`audit_syslog` is not set)")
    return (
        "## 12. Security: audit trail (IHE ATNA)\n\n"
        "With `audit_syslog` set, the node is an IHE ATNA Secure Application's audit "
        "source: it sends DICOM audit messages (PS3.15 A.5) by syslog (RFC 5424, facility "
        "authpriv, MSGID `IHE+RFC-3881`) over UDP (RFC 5426), TCP or TLS (RFC 5425; it "
        f"presents its `tls_certificate` when set). As configured, {where}. Each message names "
        "the study (Study Instance UID, its number of instances) and the patient (Patient "
        "ID); notes of one actor, kind and study within 5 seconds make one message.\n\n"
        + _table(("what", "EventID", "EventActionCode"), rows))


def _hl7(settings: Settings) -> str:
    rows = [("ADT^A08, ADT^A31", "update the patient of PID-3: name (PID-5), birth date "
             "(PID-7), sex (PID-8), in the index and every stored instance"),
            ("ADT^A40, ADT^A34, ADT^A47", "merge the patient of MRG-1 into the patient of "
             "PID-3 (their studies move; the PID values apply)"),
            ("other ADT events", "acknowledged (AA), nothing changed"),
            ("ORM^O01, OMI^O23, OMG^O19 (ORC-1 NW), SIU^S12", "with `hl7_prefetch`: the "
             "patient's latest studies are queued to the named destinations; else AR"),
            ("other order controls, other SIU events", "with `hl7_prefetch`: acknowledged "
             "(AA), nothing sent; else AR"),
            ("any other message", "AR")]
    where = (f"listens on port {settings.hl7_port}" if settings.hl7_port
             else "does not listen (`hl7_port` is 0)")
    return (
        "## 13. HL7 v2 interface (IHE PIR)\n\n"
        "With `hl7_port` set, the node takes HL7 v2 messages over MLLP (TCP; TLS only with "
        "`hl7_tls`, its DICOM certificate and client check) and answers "
        "each with an original-mode acknowledgement (ACK; MSA-1 AA, AE with the reason in "
        f"MSA-3, or AR) once it is applied. As configured, it {where}. The character set is "
        "MSH-18 (ASCII, ISO 8859 parts, UTF-8; `hl7_charset` when empty), the Patient ID the "
        "first identifier of PID-3 and MRG-1 or that of the assigning authority "
        "`hl7_patient_id_authority`; `hl7_senders` limits the sending applications (MSH-3).\n\n"
        + _table(("message", "what the node does"), rows))


def _appendix(storage: list[str]) -> str:
    rows = [(UID(uid).name, f"`{uid}`") for uid in storage]
    return ("## Appendix A: Storage SOP Classes\n\nSCP and SCU, in every transfer syntax of "
            "section 4.\n\n" + _table(("SOP Class", "UID"), rows))
