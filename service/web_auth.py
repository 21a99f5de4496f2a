"""Access to the admin web page: an optional token, and request logging that never shows it.

With a token configured, every path but ``/healthz`` needs ``Authorization: Bearer <token>`` or
``?token=<token>``; anything else gets 401. Requests are logged by path only (no query string,
no headers), so the token never reaches the log.
"""

from __future__ import annotations

import hmac
import json
import logging
from urllib.parse import parse_qs

log = logging.getLogger(__name__)
OPEN_PATHS = ("/healthz",)


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
    """ASGI middleware: refuse HTTP requests without the token, log the others.

    Parameters
    ----------
    app : ASGI application
    token : str
        The token required; empty: no check.
    accesses : AccessLog, optional
        Told of each refusal (:mod:`service.audit_syslog` makes it a failed login).
    """

    def __init__(self, app, token: str = "", accesses=None):
        self.app, self.token, self.accesses = app, token, accesses

    def allowed(self, scope) -> bool:
        """Whether the request may go through."""
        if not self.token or scope["path"] in OPEN_PATHS:
            return True
        return hmac.compare_digest(_presented(scope).encode(), self.token.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        peer = "%s:%s" % tuple(scope.get("client") or ("?", "?"))
        if not self.allowed(scope):
            log.warning("HTTP %s %s from %s refused: no valid token", scope["method"],
                        scope["path"], peer)
            if self.accesses is not None:            # for the audit messages only
                self.accesses.note(f"http {peer.rpartition(':')[0]}", "authentication failed",
                                   detail=f"{scope['method']} {scope['path']}: no valid token",
                                   keep=False)
            return await _refuse(send)
        status = []

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, logged_send)
        log.debug("HTTP %s %s from %s: %s", scope["method"], scope["path"], peer,
                  status[0] if status else "-")


async def _refuse(send) -> None:
    body = json.dumps({"error": "a valid token is required (Bearer header or ?token=)"}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
