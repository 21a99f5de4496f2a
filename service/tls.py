"""TLS for the DICOM listener (DICOM PS3.15 secure transport) from certificate paths in the
settings.

With ``tls_certificate`` and ``tls_private_key`` set the listener speaks TLS only. With
``tls_ca_certificates`` also set, peers must present a certificate signed by one of those
authorities (mutual TLS, as DCMTK's ``+tls`` does); without it any TLS client is accepted and
the AE title rules of :mod:`service.access` still apply.
"""

from __future__ import annotations

import ssl


def server_context(certificate: str, private_key: str, ca_certificates: str = ""):
    """Return an SSL context for the listener, or None when no certificate is configured.

    Parameters
    ----------
    certificate, private_key : str
        PEM files of the node's certificate (chain) and its key; both empty: no TLS.
    ca_certificates : str
        PEM file of the authorities client certificates must chain to; empty: no client check.

    Raises
    ------
    ValueError
        When only one of certificate and private key is given.
    """
    if not certificate and not private_key:
        return None
    if not certificate or not private_key:
        raise ValueError("TLS needs both tls_certificate and tls_private_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if ca_certificates:
        context.load_verify_locations(ca_certificates)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
