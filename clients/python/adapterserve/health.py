"""The `grpc.health.v1.Health/Check` messages, built at import from a descriptor in a private pool.

The client-only install has no grpcio-health-checking; the two messages it needs are tiny, so they
are declared here (the same wire format as the standard health.proto). A private descriptor pool keeps
them from clashing with grpc_health's registration when both are imported in one process.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CHECK_METHOD = "/grpc.health.v1.Health/Check"

# HealthCheckResponse.ServingStatus numbers, as in grpc/health/v1/health.proto.
STATUS_NAMES: dict[int, str] = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def _build_messages() -> tuple[type, type]:
    fd = descriptor_pb2.FileDescriptorProto(
        name="adapterserve_client/grpc_health_v1.proto", package="grpc.health.v1", syntax="proto3"
    )
    request = fd.message_type.add(name="HealthCheckRequest")
    request.field.add(
        name="service",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    response = fd.message_type.add(name="HealthCheckResponse")
    enum = response.enum_type.add(name="ServingStatus")
    for number, name in STATUS_NAMES.items():
        enum.value.add(name=name, number=number)
    response.field.add(
        name="status",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_ENUM,
        type_name=".grpc.health.v1.HealthCheckResponse.ServingStatus",
        label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fd)
    req_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.health.v1.HealthCheckRequest"))
    resp_cls = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("grpc.health.v1.HealthCheckResponse")
    )
    return req_cls, resp_cls


HealthCheckRequest, HealthCheckResponse = _build_messages()


def encode_request(service: str) -> bytes:
    return HealthCheckRequest(service=service).SerializeToString()


def decode_status(data: bytes) -> str:
    """The status name of a serialized HealthCheckResponse."""
    return STATUS_NAMES.get(HealthCheckResponse.FromString(data).status, "UNKNOWN")
