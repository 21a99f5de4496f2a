"""The URL under which DICOMweb answers name their resources (Retrieve URL, BulkDataURI).

By default it is taken from each request (its Host header), which is right for a client that
reaches the node directly and for a proxy that passes the Host on. The ``http_public_url``
setting fixes it for the rest: a proxy that rewrites the Host, or a client that leaves the port
out of its Host header (dicomweb-client 0.60 does), whose URLs would otherwise point at port 80.
"""

from __future__ import annotations

from starlette.requests import Request


def dicomweb_base(request: Request, public_url: str = "") -> str:
    """The DICOMweb service URL (``.../dicom-web``) for answers to ``request``."""
    root = public_url or str(request.base_url)
    return root.rstrip("/") + "/dicom-web"

