"""What a user sizes for a scale-out: replicas, adapters per replica, and each replica's server settings."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from adapterserve.server.settings import ServerSettings


class ScaleOutSettings(BaseModel):
    """`serve run adapterserve.server.scaleout:build_app key=value ...` arguments.

    Every key that is not one of these fields goes to each replica's ServerSettings (as
    `adapterserve serve` flags do, with nested ones as `engine__max_batch_size=64`), on top of the
    ADAPTERSERVE_* environment variables of the replica's process.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_replicas: int = Field(2, ge=1, description="engine replicas (each holds the base model once)")
    max_adapters_per_replica: int = Field(
        16, ge=1, description="adapters one replica keeps routed to it (Ray's multiplex LRU per replica)"
    )
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="requests one replica runs at once (its batch); past it Ray queues or routes away",
    )
    num_cpus_per_replica: float = Field(1.0, ge=0)
    num_gpus_per_replica: float = Field(0.0, ge=0)
    route_prefix: str = "/"
    server: ServerSettings = Field(default_factory=ServerSettings)

    @classmethod
    def from_args(cls, args: dict[str, Any], environ: dict[str, str] | None = None) -> ScaleOutSettings:
        """Split `serve run` arguments into scale-out fields and server settings."""
        own: dict[str, Any] = {}
        server: dict[str, Any] = {}
        for key, value in args.items():
            if key in cls.model_fields and key != "server":
                own[key] = value
                continue
            node = server
            parts = key.split("__")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return cls(server=ServerSettings.from_env(environ, **server), **own)
