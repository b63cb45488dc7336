"""Certificates a test makes: a throw-away CA, a server certificate for loopback, a client certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_ca: Pem  # a CA the server does not trust
    other_client: Pem  # signed by other_ca


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(dir_: Path, stem: str, cert, key) -> Pem:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = dir_ / f"{stem}.crt", dir_ / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return Pem(cert_path, key_path)


def _cert(subject: str, key, issuer_name, issuer_key, *, ca: bool, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def make_pki(dir_: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate it signed, plus a
    second CA with its own client certificate (which the server must refuse)."""
    dir_.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix in ("", "other_"):
        ca_key = _key()
        ca_cert = _cert(f"adapterserve test {prefix}ca", ca_key, None, None, ca=True)
        out[prefix + "ca"] = _write(dir_, prefix + "ca", ca_cert, ca_key)
        client_key = _key()
        out[prefix + "client"] = _write(
            dir_,
            prefix + "client",
            _cert("test client", client_key, ca_cert.subject, ca_key, ca=False),
            client_key,
        )
        if not prefix:
            server_key = _key()
            out["server"] = _write(
                dir_,
                "server",
                _cert("localhost", server_key, ca_cert.subject, ca_key, ca=False, server=True),
                server_key,
            )
    return Pki(**out)
