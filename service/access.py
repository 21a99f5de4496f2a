"""Who may talk to the node and what each peer may do.

With ``peers`` empty (the default) any calling AE title may store, query and retrieve. With
``peers`` set, only the listed calling AE titles are accepted at association (others are rejected
by pynetdicom before any DIMSE message), and each may do only what its entry grants:
``store`` (C-STORE, storage commitment), ``query`` (C-FIND), ``retrieve`` (C-GET, C-MOVE). A
refused operation is logged and answered 0x0124 (Refused: Not Authorised); a refused C-MOVE
fails with pynetdicom's 0xC514, since a move handler cannot answer before naming a destination.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pynetdicom import evt

log = logging.getLogger(__name__)
PERMISSIONS = ("store", "query", "retrieve")
NOT_AUTHORISED = 0x0124
_NEEDS = {evt.EVT_C_STORE: "store", evt.EVT_C_FIND: "query", evt.EVT_C_GET: "retrieve",
          evt.EVT_C_MOVE: "retrieve", evt.EVT_N_ACTION: "store"}     # storage commitment


class AccessRefused(PermissionError):
    """A peer asked for an operation its entry in ``peers`` does not grant."""


def parse_permissions(text: str) -> frozenset:
    """Parse ``"store,query"`` into a set; raise ValueError on an unknown permission."""
    granted = frozenset(p.strip() for p in text.split(",") if p.strip())
    unknown = granted - set(PERMISSIONS)
    if unknown:
        raise ValueError(f"unknown permissions {sorted(unknown)}; known: {', '.join(PERMISSIONS)}")
    return granted


@dataclass
class AccessPolicy:
    """Calling AE titles and their permissions (empty: everyone may do everything).

    Parameters
    ----------
    peers : dict
        ``{calling AE title: permissions}``, permissions as parsed by :func:`parse_permissions`.
    """

    peers: dict

    @classmethod
    def from_settings(cls, peers: dict) -> "AccessPolicy":
        """Build the policy of the ``peers`` setting (``{AET: "store,query,retrieve"}``)."""
        parsed = {}
        for ae_title, text in peers.items():
            if not 0 < len(ae_title.strip()) <= 16:
                raise ValueError(f"peer AE title {ae_title!r} must have 1 to 16 characters")
            parsed[ae_title.strip()] = parse_permissions(str(text))
        return cls(parsed)

    def allows(self, ae_title: str, permission: str) -> bool:
        """Return whether ``ae_title`` may use ``permission``."""
        if not self.peers:
            return True
        return permission in self.peers.get(str(ae_title).strip(), ())

    def rejection(self, calling: str, called: str, own: str, require_called: bool) -> str:
        """Why an association request from ``calling`` to ``called`` (the node is ``own``) is
        refused for who it is, or "" (refused for another reason: the node was busy)."""
        if self.peers and str(calling).strip() not in self.peers:
            return f"calling AE title {str(calling).strip()!r} is not among the peers"
        if require_called and str(called).strip() != own.strip():
            return f"called AE title {str(called).strip()!r} is not {own.strip()!r}"
        return ""

    def calling_titles(self) -> list[str]:
        """AE titles accepted at association (empty: any)."""
        return sorted(self.peers)


def _guarded(kind, handler, permission: str, policy: AccessPolicy, on_refused=None):
    """Wrap ``handler`` so that a peer without ``permission`` gets a refusal instead
    (``on_refused(event, why)`` told of it)."""
    def refuse(event):
        caller = str(event.assoc.requestor.ae_title).strip()
        why = f"{event.event.name} refused to {caller}: no {permission!r} permission"
        log.warning("%s", why)
        if on_refused is not None:
            on_refused(event, why)
        return caller

    if kind == evt.EVT_C_STORE:
        def store(event, *args):
            if policy.allows(event.assoc.requestor.ae_title, permission):
                return handler(event, *args)
            refuse(event)
            return NOT_AUTHORISED
        return store
    if kind == evt.EVT_N_ACTION:
        def action(event, *args):
            if policy.allows(event.assoc.requestor.ae_title, permission):
                return handler(event, *args)
            refuse(event)
            return NOT_AUTHORISED, None
        return action

    def generator(event, *args):
        if policy.allows(event.assoc.requestor.ae_title, permission):
            yield from handler(event, *args)
            return
        caller = refuse(event)
        if kind == evt.EVT_C_MOVE:
            raise AccessRefused(f"{caller} may not retrieve")
        if kind == evt.EVT_C_GET:
            yield 1                       # pynetdicom wants a count first
        yield NOT_AUTHORISED, None
    return generator


def guard(bindings: list, policy: AccessPolicy, on_refused=None) -> list:
    """Return the (event, handler[, args]) bindings with permission checks on DIMSE handlers
    (``on_refused(event, why)``: told of each refusal)."""
    out = []
    for kind, handler, *args in bindings:
        permission = _NEEDS.get(kind)
        if permission is not None and policy.peers:
            handler = _guarded(kind, handler, permission, policy, on_refused)
        out.append((kind, handler, *args))
    return out
