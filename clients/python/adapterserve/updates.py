"""In-place adapter updates from the SDK: a state dict of tensors into UpdateAdapter messages.

Tensors may be torch tensors or numpy arrays (anything with `dtype`, `shape` and the buffer protocol
once made contiguous); torch is imported only when a torch tensor is given, so the SDK stays torch-free.
Each tensor is sent as little-endian bytes in chunks of at most `chunk_bytes`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from adapterserve.errors import InvalidArgument
from adapterserve.models import UpdateResult
from adapterserve.names import check_adapter_name
from adapterserve.v1 import admin_pb2

# safetensors dtype names the server accepts, by numpy dtype string and torch dtype name.
_NUMPY_DTYPES = {"<f8": "F64", "<f4": "F32", "<f2": "F16"}
_TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
DEFAULT_CHUNK_BYTES = 1 << 20


def tensor_bytes(name: str, value: Any) -> tuple[str, tuple[int, ...], bytes]:
    """(safetensors dtype, shape, little-endian bytes) of one tensor; InvalidArgument for other dtypes."""
    module = type(value).__module__
    if module.startswith("torch"):
        import torch

        dtype = _TORCH_DTYPES.get(str(value.dtype).removeprefix("torch."))
        if dtype is None:
            raise InvalidArgument(f"tensor {name!r}: dtype {value.dtype} is not a float dtype")
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        return dtype, tuple(value.shape), flat.view(torch.uint8).numpy().tobytes()
    import numpy as np

    array = np.asarray(value)
    little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    dtype = _NUMPY_DTYPES.get(little.str)
    if dtype is None:
        raise InvalidArgument(f"tensor {name!r}: dtype {array.dtype} is not a float dtype")
    return dtype, tuple(array.shape), np.ascontiguousarray(array, dtype=little).tobytes()


EncodedTensors = list[tuple[str, str, tuple[int, ...], bytes]]  # (name, dtype, shape, bytes)


def encode_tensors(tensors: Mapping[str, Any]) -> EncodedTensors:
    """Every tensor as bytes, checked before the first message leaves (InvalidArgument)."""
    return [(key, *tensor_bytes(key, value)) for key, value in tensors.items()]


def update_messages(
    name: str, encoded: EncodedTensors, *, persist: bool = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[admin_pb2.UpdateAdapterRequest]:
    """The UpdateAdapter stream: a header, then each tensor's chunks (dtype and shape on its first)."""
    check_adapter_name(name)
    if chunk_bytes < 1:
        raise InvalidArgument("chunk_bytes must be positive")
    yield admin_pb2.UpdateAdapterRequest(header=admin_pb2.UpdateHeader(name=name, persist=persist))
    for key, dtype, shape, data in encoded:
        first = True
        for start in range(0, max(len(data), 1), chunk_bytes):
            chunk = admin_pb2.TensorChunk(name=key, data=data[start : start + chunk_bytes])
            if first:
                chunk.dtype, first = dtype, False
                chunk.shape.extend(shape)
            yield admin_pb2.UpdateAdapterRequest(tensor=chunk)


def update_result_from_proto(message: admin_pb2.UpdateAdapterResponse) -> UpdateResult:
    return UpdateResult(
        name=message.name,
        version=message.version,
        previous_version=message.previous_version,
        persisted_version=message.persisted_version,
        persisted=message.persisted,
        resident=message.resident,
        received_bytes=message.received_bytes,
    )
