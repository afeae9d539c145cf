"""Server transport credentials from certificate paths: TLS, or mTLS when a client CA is configured.

Certificates come only from settings (flags / environment), read once at start-up; no request
field can name a file.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc

from reranker.config import ServerSettings


class TransportConfigError(ValueError):
    """A TLS setting points at a file that cannot be used; the message names the setting."""


def _read_pem(path: str, setting: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TransportConfigError(f"{setting}: cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TransportConfigError(f"{setting}: {path!r} is not a PEM file")
    return data


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials for the listening port, or None for plaintext (the loopback default)."""
    if not settings.tls_cert_path:
        return None
    cert = _read_pem(settings.tls_cert_path, "tls_cert_path")
    key = _read_pem(settings.tls_key_path, "tls_key_path")
    client_ca = _read_pem(settings.tls_client_ca_path, "tls_client_ca_path") if settings.tls_client_ca_path else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def is_loopback(address: str) -> bool:
    """True when `host:port` binds only the loopback interface (127.0.0.0/8, ::1, localhost)."""
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
