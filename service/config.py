"""Node settings: embedded defaults, overridden by a TOML file, overridden by command-line flags.

Every setting has a default and one line of documentation in :data:`SETTING_DOCS`; the table in
``docs/configuration.md`` lists them all (a test keeps the three in step).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from service import hl7_message
from service.hl7_prefetch import parse_targets
from service.web_auth import parse_users
from storage import retention as retention_rules
from storage.forwarding import parse_rule

SETTING_DOCS = {
    "data_dir": "Folder of the blob store and, by default, of the SQLite index.",
    "database_url": "SQLAlchemy URL of the index; empty means sqlite:///<data_dir>/index.sqlite.",
    "ae_title": "Application Entity title of the node.",
    "host": "Address the DICOM listener binds to.",
    "port": "TCP port of the DICOM listener.",
    "stable_age": "Seconds without a new instance before a series is compacted.",
    "compaction_interval": "Seconds between two looks of the compaction worker for stable series.",
    "duplicate_policy": "keep_first, replace or reject an instance whose SOP Instance UID is stored.",
    "max_storage_bytes": "Refuse new instances (0xA700) beyond this many stored bytes; 0: no limit.",
    "max_stack_slices": "Largest number of slices coded together as one blob.",
    "cache_bytes": "Memory budget of the decoded-slab cache used by C-GET and C-MOVE (at least "
                   "32 MiB).",
    "codec_model": "Name of the codec model compaction uses.",
    "codec_slab": "Slices per independently decodable slab of a coded stack: 4 halves the decode "
                  "before an instance can be sent, for about 1% more bytes.",
    "codec_adapt": "Fine-tune the codec model on each large stack and store it in the blob: about "
                   "2.5% fewer bytes, compaction about 2.6x slower (under a burst, see "
                   "codec_fast_backlog; false: never).",
    "codec_fast_backlog": "While this many more series wait for compaction, it codes without "
                          "adaptation (about 3x faster) to keep up, and codes those stacks "
                          "again with it once nothing is staged; 0: always adapt.",
    "scrub_every_days": "Days between two rounds of the running node's integrity patrol, which "
                        "reads every stored file back and checks its SHA-256 (the first "
                        "round 10 minutes after start; 0: never).",
    "scrub_read_mb_per_s": "Most megabytes a second the patrol reads, so that it does not "
                           "slow ingest and retrievals (0: no limit).",
    "access_trail_days": "Days the access trail (who read which study) keeps a row after its "
                         "last read; older rows are removed once a day (0: kept for ever).",
    "deleted_keep_days": "Days deleted instances (voxarc delete, retention rules, rejection "
                         "notes) stay restorable in the recycle bin, as received, before the "
                         "running node removes them for good (voxarc deleted; 0: deletions "
                         "are for good at once).",
    "retention": "Rules the running node deletes by once a day, through the recycle bin: NAME = "
                 "\"LEVEL: Keyword=pattern; ...\" (LEVEL patient, study or series, study when "
                 "left out; C-FIND keys of the level or above; a date key may hold ages: "
                 "StudyDate=-10y is on or before the day ten years ago; a record lacking a "
                 "key's value is never selected); voxarc retention shows what they select.",
    "retention_hour": "Local hour (0-23) in which the running node applies the retention rules, "
                      "once a day; -1: never by itself (voxarc retention --run does).",
    "retention_grace_days": "Days after its last instance arrived during which a record is "
                            "held back from the retention rules (an old prior pulled in or "
                            "restored this week is not deleted the night it came).",
    "destinations": "C-MOVE destinations and storage commitment reports: "
                    "NAME = \"AET@HOST:PORT\" (flag: --destination, repeatable).",
    "forward": "Send each stable series to destinations as it comes: NAME = \"Keyword=pattern; "
               "...\" (a destination of destinations; C-FIND keys of the series, its study or "
               "patient, or SourceAETitle, the sender's; Priors=N sends the patient's N latest "
               "earlier studies along; a date key may hold ages, StudyDate=7d- for the last "
               "week's studies; \"\": every series) (flag: --forward NAME=RULE, "
               "repeatable).",
    "http_host": "Address the admin web page binds to (localhost only by default).",
    "http_port": "TCP port of the admin web page, JSON API and /metrics (0: a free port).",
    "http_token": "Token the admin web page requires (Bearer header or ?token=); empty: none.",
    "http_users": "Named users of the admin page and DICOMweb: NAME = \"ROLE:SHA256\" (viewer: "
                  "reads only; admin: also sends, uploads, STOW-RS; the SHA-256 of their token, "
                  "from voxarc web-user); their names go into the access trail.",
    "http_public_url": "URL clients reach the admin server at (https://pacs.example.org/voxarc, "
                       "say), for the URLs in DICOMweb answers when a proxy rewrites the Host "
                       "header or a client leaves its port out; empty: from each request.",
    "http_cors_origins": "Web origins (comma-separated, or *) whose pages may call the API and "
                         "DICOMweb from a browser (a viewer served elsewhere); empty: none.",
    "peers": "Calling AE titles allowed to associate: AET = \"store,query,retrieve\" (any subset); "
             "others are rejected; empty: anyone may do everything.",
    "require_called_ae_title": "Reject associations whose called AE title is not ae_title.",
    "max_pdu_size": "Largest PDU the node accepts, in bytes (0: no limit).",
    "max_associations": "Most associations served at once; more are rejected (busy).",
    "max_find_results": "A C-FIND matching more than this many records is refused with 0xA700 "
                        "before any is sent, so that the caller narrows it (0: no limit).",
    "max_dataset_bytes": "Largest dataset C-STORE accepts, in bytes; larger ones get 0xA700 "
                         "(0: no limit).",
    "tls_certificate": "PEM certificate of the DICOM listener; with tls_private_key: TLS only.",
    "tls_private_key": "PEM private key of tls_certificate.",
    "tls_ca_certificates": "PEM authorities client certificates must chain to (mutual TLS); "
                           "empty: no client certificate asked.",
    "rejection_notes_from": "Calling AE titles whose IHE IOCM rejection notes (a Key Object "
                            "Selection titled Rejected for Quality Reasons, ...) delete the "
                            "instances they name: \"CT1,WS2\", or * for any; @NAME for a web "
                            "user's notes sent by STOW-RS, @* for anyone who may write there; "
                            "empty: none (the notes are stored as any instance).",
    "audit_syslog": "IHE ATNA audit record repository the node sends DICOM audit messages to "
                    "(stores, queries, retrievals, exports, deletions, corrections, start and "
                    "stop): udp://HOST[:514], tcp://HOST[:514] or tls://HOST[:6514]; empty: "
                    "none.",
    "audit_syslog_ca": "PEM authorities the audit repository's TLS certificate must chain to "
                       "(empty: the system's); the node presents tls_certificate when set.",
    "audit_source_id": "Audit Source ID of the node's audit messages (empty: AE@host name).",
    "deidentify_key_file": "Secret of the admin page's de-identified downloads (made when "
                           "missing): the same patient gets the same pseudonym in each; empty: "
                           "a new secret per download.",
    "hl7_port": "TCP port of the HL7 v2 listener (MLLP) for the hospital's ADT feed: patient "
                "updates (A08, A31) and merges (A40, A34, A47) correct the archive as they "
                "come (0: no listener).",
    "hl7_tls": "Serve hl7_port over TLS with the DICOM listener's tls_certificate and "
               "tls_private_key (client certificates checked against tls_ca_certificates "
               "when set).",
    "hl7_resend": "Queue each series an HL7 update or merge corrected to every destination "
                  "that had it, as voxarc correct --resend does.",
    "hl7_senders": "Sending applications (MSH-3) whose ADT messages are applied: \"HIS,ADT\"; "
                   "others are rejected (AR); empty: any.",
    "hl7_charset": "Character set of ADT messages whose MSH-18 is empty, as MSH-18 names it "
                   "(8859/1, UNICODE UTF-8, ...); empty: ASCII, as HL7 has it (a message with "
                   "other bytes is rejected, AR).",
    "hl7_prefetch": "Destinations that get a patient's latest studies when the RIS orders an "
                    "exam (ORM^O01, OMI^O23, OMG^O19 on hl7_port): \"reading=2, er=1\"; "
                    "empty: orders are not taken.",
    "hl7_patient_id_authority": "Assigning authority (CX.4) of the identifier in PID-3 and "
                                "MRG-1 that is the DICOM Patient ID; empty: the first "
                                "identifier.",
}
MIN_CACHE_BYTES = 32 << 20
_DESTINATION = re.compile(r"^(?P<name>[^=]+)=(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d+)$")


@dataclass(frozen=True)
class Destination:
    """A C-MOVE destination known by its AE title."""

    name: str
    ae_title: str
    host: str
    port: int


@dataclass
class Settings:
    """Every setting of a node (see :data:`SETTING_DOCS`)."""

    data_dir: str = "voxarc-data"
    database_url: str = ""
    ae_title: str = "VOXARC"
    host: str = "0.0.0.0"
    port: int = 11112
    stable_age: float = 60.0
    compaction_interval: float = 5.0
    duplicate_policy: str = "keep_first"
    max_storage_bytes: int = 0
    max_stack_slices: int = 256
    cache_bytes: int = 256 << 20
    codec_model: str = "default"
    codec_slab: int = 8
    codec_adapt: bool = True
    codec_fast_backlog: int = 3
    scrub_every_days: float = 7.0
    scrub_read_mb_per_s: float = 50.0
    access_trail_days: float = 0.0
    deleted_keep_days: float = 7.0
    retention: dict = field(default_factory=dict)
    retention_hour: int = 2
    retention_grace_days: float = 30.0
    destinations: dict = field(default_factory=dict)
    forward: dict = field(default_factory=dict)
    http_host: str = "127.0.0.1"
    http_port: int = 8042
    http_token: str = ""
    http_users: dict = field(default_factory=dict)
    http_public_url: str = ""
    http_cors_origins: str = ""
    peers: dict = field(default_factory=dict)
    require_called_ae_title: bool = True
    max_pdu_size: int = 4 << 20
    max_associations: int = 16
    max_find_results: int = 0
    max_dataset_bytes: int = 2 << 30
    tls_certificate: str = ""
    tls_private_key: str = ""
    tls_ca_certificates: str = ""
    rejection_notes_from: str = ""
    audit_syslog: str = ""
    audit_syslog_ca: str = ""
    audit_source_id: str = ""
    deidentify_key_file: str = ""
    hl7_port: int = 0
    hl7_tls: bool = False
    hl7_resend: bool = False
    hl7_senders: str = ""
    hl7_charset: str = ""
    hl7_prefetch: str = ""
    hl7_patient_id_authority: str = ""

    def destination(self, ae_title: str) -> Destination | None:
        """Return the destination whose AE title (or name) is ``ae_title``, or None."""
        for name, text in self.destinations.items():
            dest = parse_destination(f"{name}={text}")
            if ae_title.strip() in (dest.ae_title, dest.name):
                return dest
        return None


def parse_destination(text: str) -> Destination:
    """Parse ``NAME=AET@HOST:PORT``; raise ValueError when malformed."""
    match = _DESTINATION.match(text.strip())
    if not match:
        raise ValueError(f"destination {text!r} is not NAME=AET@HOST:PORT")
    return Destination(match["name"].strip(), match["aet"].strip(), match["host"],
                       int(match["port"]))


def _coerce(name: str, value):
    default = getattr(Settings(), name)
    if name == "destinations":
        if not isinstance(value, dict):
            raise ValueError("destinations must be a table of NAME = \"AET@HOST:PORT\"")
        for key, text in value.items():
            parse_destination(f"{key}={text}")
        return dict(value)
    if name == "forward":
        if not isinstance(value, dict):
            raise ValueError("forward must be a table of NAME = \"Keyword=pattern; ...\"")
        for key, text in value.items():
            parse_rule(str(text))
        return {str(k): str(v) for k, v in value.items()}
    if name == "retention":
        if not isinstance(value, dict):
            raise ValueError("retention must be a table of NAME = \"LEVEL: Keyword=pattern; "
                             "...\"")
        for key, text in value.items():
            retention_rules.parse_rule(str(key), str(text))
        return {str(k): str(v) for k, v in value.items()}
    if name == "http_users":
        if not isinstance(value, dict):
            raise ValueError("http_users must be a table of NAME = \"ROLE:SHA256\"")
        parse_users(value)
        return {str(k): str(v) for k, v in value.items()}
    if name == "peers":
        if not isinstance(value, dict):
            raise ValueError("peers must be a table of AET = \"store,query,retrieve\"")
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(default, bool):
        return _boolean(name, value)
    value = type(default)(value)
    if name == "http_public_url":
        return _public_url(str(value))
    if name == "rejection_notes_from":
        titles = [t.strip() for t in value.split(",") if t.strip()]
        if any(not (0 < len(t) <= 16 or (t.startswith("@") and len(t) > 1)) for t in titles):
            raise ValueError(f"rejection_notes_from must list AE titles of 1 to 16 characters "
                             f"(or *), or @NAME of web users (or @*), not {value!r}")
        return ",".join(titles)
    if name == "audit_syslog" and value and \
            not re.match(r"^(udp|tcp|tls)://[^/:]+(:\d+)?/?$", value):
        raise ValueError(f"audit_syslog must be udp://HOST[:PORT], tcp://HOST[:PORT] or "
                         f"tls://HOST[:PORT], not {value!r}")
    if name == "cache_bytes" and value < MIN_CACHE_BYTES:
        raise ValueError(f"cache_bytes must be at least {MIN_CACHE_BYTES} (32 MiB), not "
                         f"{value}: retrievals decode through the cache, and a slab that does "
                         "not fit in it is decoded again for each of its instances")
    if name == "hl7_charset" and value.strip().upper() not in hl7_message.CHARSETS:
        raise ValueError(f"hl7_charset must be one of {', '.join(sorted(hl7_message.CHARSETS)[1:])} "
                         f"or empty, not {value!r}")
    if name == "hl7_port" and not 0 <= value <= 65535:
        raise ValueError(f"hl7_port must be a TCP port (0: no listener), not {value}")
    if name == "retention_hour" and not -1 <= value <= 23:
        raise ValueError(f"retention_hour must be an hour 0 to 23, or -1 (never), not {value}")
    if (name.startswith("scrub_") or name in ("deleted_keep_days", "retention_grace_days")) \
            and value < 0:
        raise ValueError(f"{name} must be 0 or more, not {value}")
    return value


def _public_url(value: str) -> str:
    """An ``http_public_url``: empty, or an http(s) URL without query or fragment."""
    value = value.strip()
    if value and (not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", value)):
        raise ValueError(f"http_public_url {value!r} is not an http:// or https:// URL "
                         "without query or fragment")
    return value.rstrip("/")


_BOOLEANS = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}


def _boolean(name: str, value) -> bool:
    """A yes/no setting: a TOML boolean, or true/false, yes/no, on/off, 1/0 (bool("false")
    would be True)."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in _BOOLEANS:
        raise ValueError(f"{name} must be true or false, not {value!r}")
    return _BOOLEANS[word]


class SettingsError(ValueError):
    """Settings that do not load: an unknown setting, a value of the wrong form, a file that
    is not TOML."""


def load_settings(config: str | Path | None = None, **overrides) -> Settings:
    """Build settings from defaults, an optional TOML file, then non-None ``overrides``.

    Raises
    ------
    SettingsError
        On an unknown setting, a value of the wrong form, or a file that is not TOML.
    """
    try:
        return _load_settings(config, **overrides)
    except SettingsError:
        raise
    except ValueError as exc:       # tomllib's errors are ValueErrors too
        raise SettingsError(str(exc)) from exc


def _load_settings(config: str | Path | None, **overrides) -> Settings:
    values: dict = {}
    if config:
        with open(config, "rb") as f:
            values.update(tomllib.load(f))
    destinations = overrides.pop("destination", None) or []
    forwards = overrides.pop("forward", None) or []
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - set(SETTING_DOCS)
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
    settings = Settings(**{k: _coerce(k, v) for k, v in values.items()})
    for text in destinations:
        dest = parse_destination(text)
        settings.destinations[dest.name] = f"{dest.ae_title}@{dest.host}:{dest.port}"
    for text in forwards:
        name, equals, rule = text.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"--forward {text!r} is not NAME=RULE")
        parse_rule(rule)
        settings.forward[name.strip()] = rule.strip()
    for what, names in (("forward", settings.forward),
                        ("hl7_prefetch", parse_targets(settings.hl7_prefetch))):
        for name in names:
            if name not in settings.destinations:
                known = ", ".join(sorted(settings.destinations)) or "none configured"
                raise ValueError(f"{what} to {name!r}: not one of the destinations ({known})")
    if settings.hl7_tls and not (settings.tls_certificate and settings.tls_private_key):
        raise ValueError("hl7_tls needs tls_certificate and tls_private_key")
    if settings.duplicate_policy not in ("keep_first", "replace", "reject"):
        raise ValueError(f"duplicate_policy {settings.duplicate_policy!r} is not one of "
                         "keep_first, replace, reject")
    return settings


def add_node_options(parser) -> None:
    """Give a sub-command the ``--config`` and ``--data-dir`` every command takes."""
    parser.add_argument("--config", help="TOML settings file (see docs/configuration.md)")
    parser.add_argument("--data-dir", help="data folder of the node")


def settings_from_args(args, **overrides) -> Settings:
    """The settings a sub-command's ``--config`` and ``--data-dir`` (then ``overrides``) name."""
    return load_settings(args.config, data_dir=args.data_dir, **overrides)


def setting_names() -> list[str]:
    """Names of all settings, in declaration order."""
    return [f.name for f in dataclasses.fields(Settings)]
