"""What an exception means to a client, for any transport: its status code name and out-of-memory.

`ServeError` subclasses carry their code name (`grpc_code`) and a message meant for the client. A
device out-of-memory error fails only the request that hit it (RESOURCE_EXHAUSTED). Anything else is a
bug (INTERNAL). gRPC turns these into statuses (grpc/errors.py), HTTP into OpenAI's error shape
(http/errors.py); the GenerationSession records the name in its metrics.
"""

from __future__ import annotations

import sys

from adapterserve.server.errors import ServeError

OOM_MESSAGE = "device out of memory while serving this request; retry later or with fewer tokens"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's (CUDA or other accelerator) out-of-memory error, without importing torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
        if oom is not None and isinstance(exc, oom):
            return True
    return False


def status_name(exc: BaseException) -> str:
    """The gRPC status code name an exception maps to, for any transport (what metrics record)."""
    if isinstance(exc, ServeError):
        return exc.grpc_code
    if is_out_of_memory(exc):
        return "RESOURCE_EXHAUSTED"
    return "INTERNAL"
