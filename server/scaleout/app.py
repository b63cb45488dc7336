"""The Ray Serve application: `serve run adapterserve.server.scaleout:build_app key=value ...`.

    Router (1 replica, HTTP ingress) --multiplexed_model_id=adapter--> EngineReplica x num_replicas

Each EngineReplica loads the base once and runs its own engine; every replica opens the same store
directory, so an adapter written there once (by `adapterserve upload` against any `adapterserve serve`
on that directory, or `AdapterStore.put_dir`) is loadable by all of them, on first use.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from adapterserve.server.scaleout.replica import LoadedAdapter, ReplicaBase
from adapterserve.server.scaleout.router import Router
from adapterserve.server.scaleout.settings import ScaleOutSettings


def replica_class(max_adapters: int) -> type[ReplicaBase]:
    """ReplicaBase with its loader multiplexed over at most `max_adapters` adapters per replica."""

    class EngineReplica(ReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def adapter(self, model_id: str) -> LoadedAdapter:
            return await self.load(model_id)

    return EngineReplica


def application(settings: ScaleOutSettings) -> Application:
    """The bound application for these settings (what `serve.run` takes)."""
    engine = serve.deployment(
        replica_class(settings.max_adapters_per_replica),
        name="EngineReplica",
        num_replicas=settings.num_replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": settings.num_cpus_per_replica,
            "num_gpus": settings.num_gpus_per_replica,
        },
        health_check_period_s=5,
    ).bind(settings.server)
    router = serve.deployment(
        Router,
        name="Router",
        num_replicas=1,
        max_ongoing_requests=settings.max_ongoing_requests * settings.num_replicas * 2,
        ray_actor_options={"num_cpus": 0},
    )
    return router.bind(engine, settings.server.generate_token)


def build_app(args: dict[str, Any]) -> Application:
    """`serve run` builder: `num_replicas=2 max_adapters_per_replica=16 store=DIR base_model=DIR ...`."""
    return application(ScaleOutSettings.from_args(args))
