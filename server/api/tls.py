"""Server TLS credentials from `TlsSettings`: certificate and key, optionally required client certificates.

Files are read once at start; a missing or unreadable file, or a key that does not match its
certificate, stops the start with a message naming the flag. Without a certificate the server
listens in plaintext (bind it to loopback, or put it behind a TLS-terminating proxy).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from adapterserve.server.errors import ServeError
from adapterserve.server.settings import TlsSettings

MAX_PEM_BYTES = 1 << 20


def _read_pem(path: Path, flag: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as err:
        raise ServeError(f"{flag} {path}: cannot be read ({err.strerror})") from None
    if len(data) > MAX_PEM_BYTES or b"-----BEGIN " not in data:
        raise ServeError(f"{flag} {path}: not a PEM file")
    return data


def check_key_matches(cert_pem: bytes, key_pem: bytes) -> None:
    """Refuse a key that is not the certificate's (gRPC would fail only at the first handshake).
    Uses `cryptography` when it is installed; without it, the handshake is the check."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        return
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as err:
        raise ServeError(f"TLS certificate or key cannot be parsed: {err}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if cert.public_key().public_bytes(pem, spki) != key.public_key().public_bytes(pem, spki):
        raise ServeError("--tls-key is not the private key of --tls-cert")


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """The gRPC server credentials, or None for plaintext."""
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    cert = _read_pem(tls.cert_file, "--tls-cert")
    key = _read_pem(tls.key_file, "--tls-key")
    check_key_matches(cert, key)
    client_ca = _read_pem(tls.client_ca_file, "--tls-client-ca") if tls.client_ca_file is not None else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def describe(tls: TlsSettings) -> str:
    """One phrase for the start log."""
    if not tls.enabled:
        return "plaintext"
    return "TLS, client certificates required" if tls.client_ca_file is not None else "TLS"
