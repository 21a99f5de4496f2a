"""Access to the admin web page and DICOMweb: named users with a role, an optional shared
token, and request logging that never shows either.

``http_users`` names each user with a role and the SHA-256 of their token (``voxarc web-user``
makes both): ``viewer`` may read (GET, HEAD) everything, ``admin`` may also send studies on,
upload and store (STOW-RS). ``http_token`` is one more token with the admin role, named by no
one. With either set, every path but ``/healthz`` needs ``Authorization: Bearer <token>`` or
``?token=<token>`` (the page's own script and style excepted): no valid token gets 401, a viewer's write 403 (both told to the audit
messages). The user's name goes into the access trail with the client's address. Requests are
logged by path only (no query string, no headers), so a token never reaches the log.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs

log = logging.getLogger(__name__)
OPEN_PATHS = ("/healthz",)
# the page's script and style: no data in them, and a browser sends no token for them
OPEN_PREFIXES = ("/static/",)
ROLES = ("viewer", "admin")
READS = ("GET", "HEAD")
USER_KEY = "voxarc_user"           # the request's user, in the ASGI scope's state
ROLE_KEY = "voxarc_role"           # and their role


@dataclass(frozen=True)
class WebUser:
    """Who a token names (an empty name: the shared ``http_token``) and what they may do."""

    name: str
    role: str


def token_digest(token: str) -> str:
    """The SHA-256 (hex) of a token, as ``http_users`` keeps it."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A random token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def parse_users(table: dict) -> dict[str, WebUser]:
    """``http_users`` (NAME = "ROLE:SHA256") as {token digest: user}.

    Raises
    ------
    ValueError
        A value that is not a role and a 64-digit hex digest, or a name that is not plain.
    """
    out = {}
    for name, value in table.items():
        role, _, digest = str(value).partition(":")
        if role not in ROLES or not re.fullmatch(r"[0-9a-f]{64}", digest) or \
                not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", str(name)):
            raise ValueError(f"http_users {name!r}: write NAME = \"ROLE:SHA256\" with ROLE "
                             f"{' or '.join(ROLES)} and the token's SHA-256 in hex "
                             "(voxarc web-user makes one)")
        out[digest] = WebUser(str(name), role)
    return out


def user_of(scope) -> str:
    """The name of the request's user, or "" (no users configured, the shared token)."""
    return (scope.get("state") or {}).get(USER_KEY, "")


def role_of(scope) -> str:
    """The role of the request's user ("admin" when no one is named)."""
    return (scope.get("state") or {}).get(ROLE_KEY, "admin")


def _presented(scope) -> str:
    """The token a request presents (Bearer header first, then the query string), or ""."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return (query.get("token") or [""])[0]


class TokenAuth:
    """ASGI middleware: refuse HTTP requests without a valid token, and viewers' writes; log
    the others.

    Parameters
    ----------
    app : ASGI application
    settings : Settings
        Read for ``http_token`` and ``http_users`` at each request, so that a reload of the
        node's settings file applies at once.
    accesses : AccessLog, optional
        Told of each refusal (:mod:`service.audit_syslog` makes it a failed login or a
        security alert).
    """

    def __init__(self, app, settings, accesses=None):
        self.app, self.settings, self.accesses = app, settings, accesses
        self._parsed: tuple[dict, dict[str, WebUser]] = ({}, {})

    @property
    def users(self) -> dict[str, WebUser]:
        """``http_users`` as they stand, by token digest (parsed again only when changed)."""
        table = self.settings.http_users
        if table != self._parsed[0]:
            self._parsed = (dict(table), parse_users(table))
        return self._parsed[1]

    def identify(self, scope) -> WebUser | None:
        """Who the request's token names; None when it names no one. With neither token nor
        users configured, anyone is an unnamed admin."""
        token, users = self.settings.http_token, self.users
        if not token and not users:
            return WebUser("", "admin")
        presented = _presented(scope)
        if token and hmac.compare_digest(presented.encode(), token.encode()):
            return WebUser("", "admin")
        # the digest is no secret: a lookup by it tells an attacker nothing of a token
        return users.get(token_digest(presented)) if presented else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        peer = "%s:%s" % tuple(scope.get("client") or ("?", "?"))
        user = WebUser("", "admin") if _open(scope["path"]) else self.identify(scope)
        if user is None:
            log.warning("HTTP %s %s from %s refused: no valid token", scope["method"],
                        scope["path"], peer)
            self._note(f"http {peer.rpartition(':')[0]}", "authentication failed",
                       f"{scope['method']} {scope['path']}: no valid token")
            return await _refuse(send)
        if user.role != "admin" and scope["method"] not in READS:
            log.warning("HTTP %s %s from %s (%s) refused: the %s role only reads",
                        scope["method"], scope["path"], peer, user.name, user.role)
            self._note(f"http {user.name}@{peer.rpartition(':')[0]}", "refused",
                       f"{scope['method']} {scope['path']}: {user.role} may only read")
            return await _refuse(send, 403, f"the {user.role} role may only read")
        if user.name:
            scope.setdefault("state", {}).update({USER_KEY: user.name, ROLE_KEY: user.role})
        status = []

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, logged_send)
        log.debug("HTTP %s %s from %s: %s", scope["method"], scope["path"], peer,
                  status[0] if status else "-")

    def _note(self, actor: str, action: str, detail: str) -> None:
        if self.accesses is not None:            # for the audit messages only
            self.accesses.note(actor, action, detail=detail, keep=False)


def _open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


async def _refuse(send, status: int = 401,
                  why: str = "a valid token is required (Bearer header or ?token=)") -> None:
    body = json.dumps({"error": why}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
