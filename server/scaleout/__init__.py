"""Scale-out on Ray Serve: N engine replicas behind one OpenAI-compatible HTTP endpoint, with
adapter-affinity routing (Ray Serve model multiplexing keyed by adapter name). Needs the `[ray]` extra.

    serve run adapterserve.server.scaleout:build_app num_replicas=2 store=/shared/adapters-store

settings.py  ScaleOutSettings: replicas, adapters per replica, the ServerSettings each replica gets
replica.py   EngineReplica: one engine (its own continuous batcher) + OpenAIService, per replica
router.py    Router: the HTTP ingress; reads `model`, routes with multiplexed_model_id=adapter
app.py       build_app(args): the Ray Serve application (`serve run` target)

Importing this package does not import Ray; `build_app` does.
"""

from __future__ import annotations

from typing import Any


def build_app(args: dict[str, Any]) -> Any:
    """The `serve run` application builder (see app.py)."""
    from adapterserve.server.scaleout.app import build_app as build

    return build(args)


__all__ = ["build_app"]
