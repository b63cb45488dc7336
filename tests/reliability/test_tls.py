"""gRPC over TLS, and mutual TLS, with certificates the test makes; the SDK's `tls=` option against it."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest

from adapterserve import Client
from adapterserve.errors import Unavailable
from adapterserve.retry import RetryPolicy
from tests.helpers.server_process import server_command, start_server
from tests.reliability.certs import make_pki
from tests.reliability.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.timeout(240)
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def creds(pki, *, ca=None, client=None) -> grpc.ChannelCredentials:
    ca = ca or pki.ca
    kwargs = {}
    if client is not None:
        kwargs = {"private_key": client.key.read_bytes(), "certificate_chain": client.cert.read_bytes()}
    return grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes(), **kwargs)


def tls_server(tiny_model_dir, tmp_path, pki, *extra: str):
    return start_server(
        tiny_model_dir,
        tmp_path / "store",
        extra_args=("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), *extra),
        env={"ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN},
    )


def works(target: str, tls) -> bool:
    """A generation and an admin call succeed over this channel; False when the handshake fails."""
    with Client(target, tls=tls, admin_token=ADMIN_TOKEN, retry=NO_RETRY, timeout=15) as client:
        try:
            result = client.generate("The capital of France is", max_new_tokens=3)
            client.list_adapters()
        except Unavailable:
            return False
    assert result.generated_tokens >= 1
    return True


def test_tls_server_with_the_sdk_tls_option(tiny_model_dir, tmp_path, pki):
    server = tls_server(tiny_model_dir, tmp_path, pki)
    try:
        assert "gRPC transport: TLS" in server.log_text()
        assert works(server.target, creds(pki))
        assert works(server.target, creds(pki, client=pki.client))  # a client cert is optional here
        assert not works(server.target, None)  # plaintext cannot talk to it
        assert not works(server.target, creds(pki, ca=pki.other_ca))  # a server the client does not trust
        # The CLI's --tls uses the system roots; gRPC's roots variable points it at this CA.
        env = {**os.environ, "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(pki.ca.cert)}
        cli = subprocess.run(
            [sys.executable, "-m", "adapterserve", "health", "--tls", "--target", server.target],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert cli.returncode == 0 and cli.stdout.strip() == "SERVING", cli.stderr
    finally:
        assert server.stop() == 0


def test_mutual_tls_requires_a_client_certificate_the_ca_signed(tiny_model_dir, tmp_path, pki):
    server = tls_server(tiny_model_dir, tmp_path, pki, "--tls-client-ca", str(pki.ca.cert))
    try:
        assert "client certificates required" in server.log_text()
        assert works(server.target, creds(pki, client=pki.client))
        assert not works(server.target, creds(pki))  # no client certificate
        assert not works(server.target, creds(pki, client=pki.other_client))  # signed by another CA
        assert not works(server.target, None)
    finally:
        assert server.stop() == 0


def run_serve(tiny_model_dir, tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        server_command(tiny_model_dir, tmp_path / "store", extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_tls_configuration_stops_the_start_with_the_flag_named(tiny_model_dir, tmp_path, pki):
    mismatched = run_serve(
        tiny_model_dir, tmp_path, "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key)
    )
    assert mismatched.returncode == 1
    assert "--tls-key is not the private key of --tls-cert" in mismatched.stderr
    missing = run_serve(
        tiny_model_dir, tmp_path, "--tls-cert", str(tmp_path / "nope.crt"), "--tls-key", str(pki.server.key)
    )
    assert missing.returncode == 1 and "--tls-cert" in missing.stderr and "cannot be read" in missing.stderr
    half = run_serve(tiny_model_dir, tmp_path, "--tls-key", str(pki.server.key))
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr


def test_the_http_api_serves_over_the_same_tls(tiny_model_dir, tmp_path, pki):
    """--tls-cert/--tls-key cover the OpenAI-compatible HTTP listener too; --tls-client-ca requires a
    client certificate there as well."""
    import ssl

    import httpx

    server = tls_server(
        tiny_model_dir, tmp_path, pki, "--http-port", "0", "--tls-client-ca", str(pki.ca.cert)
    )
    url = f"https://{server.host}:{server.http_port}/v1/models"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        with_client_cert = ssl.create_default_context(cafile=str(pki.ca.cert))
        with_client_cert.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        with httpx.Client(verify=with_client_cert) as http:
            response = http.get(url, headers=headers, timeout=30)
        assert response.status_code == 200 and response.json()["object"] == "list"
        no_client_cert = ssl.create_default_context(cafile=str(pki.ca.cert))
        with httpx.Client(verify=no_client_cert) as http, pytest.raises(httpx.HTTPError):
            http.get(url, headers=headers, timeout=30)  # no client certificate: the handshake fails
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https://", "http://"), headers=headers, timeout=30)  # no plaintext
    finally:
        assert server.stop() == 0
