"""Assemble the grpc.aio server: servicers, health, reflection, the gate interceptor, message limits."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from adapterserve.server.api.auth import AuthPolicy
from adapterserve.server.api.grpc.admin import AdminServicer
from adapterserve.server.api.grpc.gate import GateInterceptor
from adapterserve.server.api.grpc.generation import GenerationServicer
from adapterserve.server.api.lifecycle import Lifecycle
from adapterserve.server.api.metrics import ServerMetrics
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.settings import LimitSettings
from adapterserve.v1 import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
API_SERVICES = (GENERATION_SERVICE, ADMIN_SERVICE)


def grpc_options(limits: LimitSettings) -> list[tuple[str, int]]:
    """Channel arguments that enforce the message-size limit both ways."""
    return [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


@dataclass
class GrpcServer:
    """The assembled server and its health servicer (whose status the app flips)."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", *API_SERVICES):
            await self.health.set(service, status)

    async def enter_draining(self) -> None:
        """Every health status becomes NOT_SERVING and stays so."""
        await self.health.enter_graceful_shutdown()


def build_grpc_server(
    runtime: RuntimeRef,
    limits: LimitSettings,
    policy: AuthPolicy,
    metrics: ServerMetrics,
    lifecycle: Lifecycle,
) -> GrpcServer:
    """A grpc.aio server with Generation, Admin, Health and reflection; not bound or started yet."""
    gate = GateInterceptor(
        policy, lifecycle, on_refused=lambda method, code: metrics.record_refused(method, code.name)
    )
    server = grpc.aio.server(interceptors=[gate], options=grpc_options(limits))
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationServicer(runtime, limits, metrics, lifecycle), server
    )
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(runtime, limits, metrics, lifecycle), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*API_SERVICES, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    return GrpcServer(server=server, health=health)
