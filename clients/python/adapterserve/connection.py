"""What `Client` and `AsyncClient` share: target and token defaults, channel options, call metadata."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from adapterserve.retry import RetryPolicy

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "ADAPTERSERVE_TARGET"
ADMIN_TOKEN_ENV = "ADAPTERSERVE_ADMIN_TOKEN"
TOKEN_ENV = "ADAPTERSERVE_TOKEN"
DEFAULT_TIMEOUT_S = 120.0
MAX_MESSAGE_BYTES = 64 << 20

# Reconnect quickly after the server comes (back) up: gRPC's default first backoff is 1 s growing to
# 120 s, during which calls fail fast with UNAVAILABLE even though the server is already listening.
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),  # retries are ours (see retry.py), not the channel's
)

Tls = bool | grpc.ChannelCredentials | None


def resolve_target(target: str | None, environ: Mapping[str, str] | None = None) -> str:
    """`target`, else $ADAPTERSERVE_TARGET, else 127.0.0.1:50051."""
    env = os.environ if environ is None else environ
    return target or env.get(TARGET_ENV) or DEFAULT_TARGET


@dataclass(frozen=True)
class Connection:
    """Where and how to connect. Tokens are sent as `authorization: Bearer <token>` metadata."""

    target: str
    admin_token: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    timeout: float | None = DEFAULT_TIMEOUT_S
    tls: Tls = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    options: Sequence[tuple[str, Any]] = ()

    def channel_options(self) -> list[tuple[str, Any]]:
        """Our defaults, overridden by the caller's options of the same name."""
        merged = dict(_CHANNEL_OPTIONS)
        merged.update(dict(self.options))
        return list(merged.items())

    def credentials(self) -> grpc.ChannelCredentials | None:
        """None for a plaintext channel; system roots for `tls=True`; the given credentials otherwise."""
        if self.tls is None or self.tls is False:
            return None
        if self.tls is True:
            return grpc.ssl_channel_credentials()
        return self.tls

    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.admin_token}"),) if self.admin_token else ()

    def generation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
