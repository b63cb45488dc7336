"""One real `adapterserve serve` subprocess with HTTP on, shared by the HTTP API tests."""

from __future__ import annotations

import pytest

from tests.helpers.server_process import start_server

GENERATE_TOKEN = "http-generate-token"
SERVED_NAME = "tiny-base"
DEMO_ADAPTERS = {"demo-lora": "lora", "demo-ia3": "ia3", "demo-prompt": "prompt", "demo-prefix": "prefix"}


@pytest.fixture(scope="module")
def http_server(tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("http-store") / "store"
    server = start_server(
        tiny_model_dir,
        store,
        extra_args=("--http-port", "0", "--served-model-name", SERVED_NAME, "--demo-adapters"),
        env={"ADAPTERSERVE_GENERATE_TOKEN": GENERATE_TOKEN},
    )
    yield server
    assert server.stop() == 0
