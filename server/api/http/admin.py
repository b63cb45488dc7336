"""The HTTP admin route for in-place weight updates (the gRPC Admin service's UpdateAdapter over HTTP).

    POST /v1/adapters/{name}/weights[?persist=true]   body: a safetensors file (the adapter's state dict)

The body is checked as an uploaded safetensors file is (caps, pickle refusal, the library's format checks)
and parsed in memory; the tensors then go through the same catalog call as the gRPC stream's. The admin
token is the gRPC Admin service's, in `Authorization: Bearer <token>`.
"""

from __future__ import annotations

from typing import Any

from adapterserve.server.adapters.safetensors_check import load_safetensors_checked
from adapterserve.server.api.auth import ADMIN_PREFIX, AuthPolicy, decide
from adapterserve.server.api.http.errors import OpenAIError, to_openai_error
from adapterserve.server.api.lifecycle import Lifecycle
from adapterserve.server.api.runtime import RuntimeRef
from adapterserve.server.settings import LimitSettings

UPDATE_METHOD = ADMIN_PREFIX + "UpdateAdapter"


def admin_refusal(policy: AuthPolicy, authorization: str | None) -> OpenAIError | None:
    """The 401/403 for an HTTP admin call, with the same tokens and rules as the gRPC Admin service's."""
    metadata = () if authorization is None else (("authorization", authorization),)
    refusal = decide(policy, UPDATE_METHOD, metadata)
    if refusal is None:
        return None
    code, message = refusal
    message = message.replace(
        "metadata 'authorization: Bearer <token>'", "the header 'Authorization: Bearer <token>'"
    )
    return OpenAIError.of_code(code.name, message, code="invalid_api_key")


class AdminHttp:
    """What the admin HTTP routes do, apart from the web framework."""

    def __init__(self, runtime: RuntimeRef, limits: LimitSettings, lifecycle: Lifecycle) -> None:
        self._runtime, self._limits, self._lifecycle = runtime, limits, lifecycle

    def _too_large(self) -> OpenAIError:
        message = f"update: more than the limit max_upload_bytes={self._limits.max_upload_bytes} bytes"
        return OpenAIError(413, message, "invalid_request_error", grpc_code="RESOURCE_EXHAUSTED")

    def check_length(self, content_length: str | None) -> None:
        """Refuse a body announced as larger than max_upload_bytes before it is read (413)."""
        if content_length is not None and content_length.isdigit():
            if int(content_length) > self._limits.max_upload_bytes:
                raise self._too_large()

    async def update_weights(self, name: str, body: bytes, *, persist: bool) -> dict[str, Any]:
        """Replace `name`'s weights with the tensors of the safetensors `body`; the JSON reply."""
        if len(body) > self._limits.max_upload_bytes:
            raise self._too_large()
        try:
            async with self._lifecycle.call():
                tensors = load_safetensors_checked(body, where="the request body")
                outcome = await self._runtime.get().catalog.update(name, tensors, persist=persist)
        except Exception as exc:
            raise to_openai_error(exc, "update_adapter") from None
        return {
            "object": "adapter.update",
            "name": outcome.name,
            "version": outcome.version,
            "previous_version": outcome.previous_version,
            "persisted_version": outcome.persisted_version,
            "persisted": outcome.persisted,
            "resident": outcome.resident,
            "received_bytes": len(body),
        }
