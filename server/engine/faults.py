"""A test hook that simulates a device out-of-memory error for one request, to prove it fails alone.

Off unless the server process starts with ADAPTERSERVE_FAULT_INJECTION=1 (tests only; never set it in
production). When on, the first forward pass that includes a request whose request_id starts with
`fault-oom-` raises torch's OutOfMemoryError, exactly as a real one would surface from a kernel; the
engine's guard then fails that forward's requests with RESOURCE_EXHAUSTED and keeps serving.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Any

import torch

ENV = "ADAPTERSERVE_FAULT_INJECTION"
OOM_PREFIX = "fault-oom-"
ENABLED = os.environ.get(ENV, "") == "1"

_fired: set[str] = set()
_lock = threading.Lock()


def inject(seqs: Iterable[Any]) -> None:
    """(Engine thread, before a forward) raise the simulated OOM for a marked request, once per id."""
    if not ENABLED:
        return
    for seq in seqs:
        request_id = seq.request.request_id
        if request_id.startswith(OOM_PREFIX):
            with _lock:
                if request_id in _fired:
                    continue
                _fired.add(request_id)
            raise torch.OutOfMemoryError(f"simulated out of memory for {request_id} ({ENV}=1)")
