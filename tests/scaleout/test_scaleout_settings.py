"""`serve run adapterserve.server.scaleout:build_app key=value ...`: the arguments (strings, as the
`serve` CLI passes them) become the scale-out sizes and each replica's server settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from adapterserve.server.scaleout.settings import ScaleOutSettings

ARGS = {
    "num_replicas": "3",
    "max_adapters_per_replica": "24",
    "max_ongoing_requests": "32",
    "num_gpus_per_replica": "1",
    "store": "/shared/adapters-store",
    "quantize": "nf4",
    "engine__max_batch_size": "32",
    "engine__adapter_slots": "24",
    "limits__max_new_tokens": "128",
}


def test_arguments_split_into_sizes_and_server_settings():
    settings = ScaleOutSettings.from_args(ARGS, environ={"ADAPTERSERVE_GENERATE_TOKEN": "tok"})
    assert (settings.num_replicas, settings.max_adapters_per_replica, settings.max_ongoing_requests) == (
        3,
        24,
        32,
    )
    assert settings.num_gpus_per_replica == 1.0
    server = settings.server
    assert server.store == Path("/shared/adapters-store") and server.quantize == "nf4"
    assert (server.engine.max_batch_size, server.engine.adapter_slots) == (32, 24)
    assert server.limits.max_new_tokens == 128
    assert server.generate_token == "tok"
    assert server.http_port is None  # replicas listen on nothing themselves: Ray's proxy does


@pytest.mark.parametrize(
    "bad", [{"num_replicas": "0"}, {"no_such_setting": "1"}, {"engine__max_batch_size": "x"}]
)
def test_bad_arguments_are_refused_with_the_field_named(bad):
    with pytest.raises(ValidationError) as caught:
        ScaleOutSettings.from_args(bad, environ={})
    assert next(iter(bad)).split("__")[-1] in str(caught.value)


def test_build_app_binds_router_and_replicas():
    pytest.importorskip("ray.serve")
    from adapterserve.server.scaleout import build_app

    app = build_app({"num_replicas": "2", "store": "/tmp/s"})
    assert type(app).__name__ == "Application"
