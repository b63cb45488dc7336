"""Status codes map to the SDK's exception classes and keep the server's message."""

from __future__ import annotations

import grpc
import pytest

import adapterserve
from adapterserve.errors import AdapterServeError, error_class_for, from_rpc_error


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    "code, cls",
    [
        (grpc.StatusCode.NOT_FOUND, adapterserve.NotFound),
        (grpc.StatusCode.INVALID_ARGUMENT, adapterserve.InvalidArgument),
        (grpc.StatusCode.UNAUTHENTICATED, adapterserve.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, adapterserve.PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, adapterserve.ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, adapterserve.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, adapterserve.DeadlineExceeded),
        (grpc.StatusCode.ALREADY_EXISTS, adapterserve.AlreadyExists),
        (grpc.StatusCode.INTERNAL, adapterserve.Internal),
        (grpc.StatusCode.FAILED_PRECONDITION, adapterserve.FailedPrecondition),
        (grpc.StatusCode.CANCELLED, adapterserve.Cancelled),
        (grpc.StatusCode.UNIMPLEMENTED, adapterserve.Unimplemented),
    ],
)
def test_each_status_code_maps_to_its_class(code, cls):
    err = from_rpc_error(_FakeRpcError(code, "adapter 'x': no such adapter"))
    assert type(err) is cls
    assert isinstance(err, AdapterServeError)
    assert err.code == code.name
    assert err.message == "adapter 'x': no such adapter"
    assert str(err) == f"{code.name}: adapter 'x': no such adapter"


def test_unknown_code_is_unknown_error():
    assert error_class_for("SOMETHING_NEW") is adapterserve.UnknownError


def test_local_refusal_is_an_invalid_argument():
    err = adapterserve.AdapterRefused("holds pickle files")
    assert isinstance(err, adapterserve.InvalidArgument)
    assert err.code == "INVALID_ARGUMENT"
