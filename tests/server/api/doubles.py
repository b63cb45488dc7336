"""Small in-memory doubles of the engine and the adapter catalog that honor the API layer's contracts.

They let the servicers, the gate, health, drain and metrics be tested in-process in seconds; the
end-to-end tests (test_e2e_*.py) run the real server with the real engine and store.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from adapterserve.server.adapters.types import AdapterInfo
from adapterserve.server.api.contracts import AdapterRecord, StoredFile, UploadResult
from adapterserve.server.api.metrics import RuntimeSnapshot, TierStats
from adapterserve.server.api.runtime import Runtime, StartedRuntime
from adapterserve.server.engine.types import FinishReason, GenerationRequest, TokenEvent
from adapterserve.server.errors import (
    AdapterValidationError,
    AlreadyExistsError,
    NotFoundError,
    QueueFullError,
)
from adapterserve.server.settings import ServerSettings
from adapterserve.server.store.upload import UploadRequest
from adapterserve.v1 import generation_pb2


@dataclass
class FakeHandle:
    """Emits one token per step: ids 10, 11, ...; text "t10 t11 ..."; finishes with LENGTH."""

    request: GenerationRequest
    engine: FakeEngine
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        if not self.done:
            self.cancelled = True
            self.done = True
            self.engine.cancelled.append(self.request.request_id)
            self.engine.running.discard(self.request.request_id)

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        req = self.request
        prompt_tokens = len(req.prompt_ids)
        n = req.sampling.max_new_tokens
        try:
            for i in range(n):
                await asyncio.sleep(self.engine.step_s)
                if self.cancelled:
                    return
                if req.adapter == "oom":
                    self.done = True
                    yield TokenEvent(
                        (), "", FinishReason.ERROR, prompt_tokens, i, error=self.engine.oom_error
                    )
                    return
                if req.adapter == "boom":
                    self.done = True
                    yield TokenEvent(
                        (), "", FinishReason.ERROR, prompt_tokens, i, error=RuntimeError("secret detail")
                    )
                    return
                token = 10 + i
                last = i == n - 1
                self.done = last
                yield TokenEvent(
                    (token,),
                    f"t{token} ",
                    FinishReason.LENGTH if last else None,
                    prompt_tokens if last else 0,
                    i + 1 if last else 0,
                )
        finally:
            self.engine.running.discard(req.request_id)


@dataclass
class FakeEngine:
    """Knows the adapters of its catalog; refuses past `max_queue` running requests."""

    catalog: FakeCatalog
    step_s: float = 0.01
    max_queue: int = 1000
    oom_error: BaseException = field(default_factory=lambda: _torch_oom("CUDA out of memory (fake)"))
    running: set[str] = field(default_factory=set)
    cancelled: list[str] = field(default_factory=list)
    submitted: list[GenerationRequest] = field(default_factory=list)

    async def submit(self, request: GenerationRequest) -> FakeHandle:
        if (
            request.adapter
            and request.adapter not in {"oom", "boom"}
            and request.adapter not in self.catalog.records
        ):
            raise NotFoundError(f"adapter {request.adapter!r} not found")
        if len(self.running) >= self.max_queue:
            raise QueueFullError(f"the engine queue is full ({self.max_queue} requests waiting)")
        self.submitted.append(request)
        self.running.add(request.request_id)
        return FakeHandle(request, self)

    async def submit_batch(self, requests: list[GenerationRequest]) -> list[FakeHandle]:
        """All or none, as the engine's: every request checked, then all queued."""
        for request in requests:
            if request.adapter and request.adapter not in self.catalog.records:
                raise NotFoundError(f"adapter {request.adapter!r} not found")
        if len(self.running) + len(requests) > self.max_queue:
            raise QueueFullError(f"the engine queue has no room for {len(requests)} requests")
        return [await self.submit(request) for request in requests]

    def snapshot(self) -> RuntimeSnapshot:
        return RuntimeSnapshot(
            queue_depth=0,
            running_requests=len(self.running),
            slots_in_use=1,
            slots_total=4,
            tiers={"host": TierStats(hits=3, misses=1, evictions=0, bytes=1234, entries=1)},
        )


def _torch_oom(message: str) -> BaseException:
    import torch

    return torch.OutOfMemoryError(message)


def _record(name: str, files: dict[str, bytes], description: str, version: int) -> AdapterRecord:
    config = json.loads(files["adapter_config.json"])
    stored = tuple(
        StoredFile(name=fname, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
        for fname, data in sorted(files.items())
    )
    digest = hashlib.sha256(b"".join(f.name.encode() + f.sha256.encode() for f in stored)).hexdigest()
    info = AdapterInfo(
        kind="lora",
        peft_type=config.get("peft_type", "LORA"),
        rank=config.get("r", 8),
        num_virtual_tokens=None,
        target_modules=tuple(config.get("target_modules", ("q_proj", "v_proj"))),
        num_parameters=100,
        nbytes=400,
    )
    return AdapterRecord(
        name=name,
        info=info,
        files=stored,
        digest="sha256:" + digest,
        base_fingerprint="sha256:fake",
        created_at=dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        description=description,
        pinned=False,
        version=version,
        cache_tier="disk",
    )


@dataclass
class FakeCatalog:
    """An in-memory store: an upload needs adapter_config.json and adapter_model.safetensors."""

    records: dict[str, AdapterRecord] = field(default_factory=dict)

    async def upload(self, request: UploadRequest, files: AsyncIterator[tuple[str, bytes]]) -> UploadResult:
        name, overwrite, description = request.name, request.overwrite, request.description
        if not name:
            raise AdapterValidationError("name: must not be empty")
        if name in self.records and not overwrite:
            raise AlreadyExistsError(f"adapter {name!r} already exists; pass overwrite to replace it")
        received: dict[str, bytearray] = {}
        total = 0
        async for fname, chunk in files:
            received.setdefault(fname, bytearray()).extend(chunk)
            total += len(chunk)
        for required in ("adapter_config.json", "adapter_model.safetensors"):
            if required not in received:
                raise AdapterValidationError(f"{required} is missing from the upload")
        previous = self.records.get(name)
        record = _record(
            name,
            {k: bytes(v) for k, v in received.items()},
            description,
            previous.version + 1 if previous else 1,
        )
        self.records[name] = record
        return UploadResult(record=record, replaced=previous is not None, received_bytes=total)

    async def delete(self, name: str) -> AdapterRecord:
        return self.records.pop(self._known(name).name)

    async def list(self) -> list[AdapterRecord]:
        return [self.records[k] for k in sorted(self.records)]

    async def get(self, name: str) -> AdapterRecord:
        return self._known(name)

    async def pin(self, name: str) -> AdapterRecord:
        return self._set_pinned(name, True)

    async def unpin(self, name: str) -> AdapterRecord:
        return self._set_pinned(name, False)

    def _known(self, name: str) -> AdapterRecord:
        try:
            return self.records[name]
        except KeyError:
            raise NotFoundError(f"adapter {name!r} not found") from None

    def _set_pinned(self, name: str, pinned: bool) -> AdapterRecord:
        from dataclasses import replace

        record = replace(self._known(name), pinned=pinned)
        self.records[name] = record
        return record


@dataclass
class FakeRuntimeFactory:
    """A RuntimeFactory building the doubles; `gate` (if set) holds startup until it is set."""

    tokenizer: object
    engine: FakeEngine | None = None
    gate: asyncio.Event | None = None
    stopped: bool = False

    async def __call__(self, settings: ServerSettings) -> StartedRuntime:
        if self.gate is not None:
            await self.gate.wait()
        catalog = FakeCatalog()
        self.engine = FakeEngine(catalog, max_queue=settings.engine.max_queue)
        info = generation_pb2.ServerInfo(
            base_model="fake", base_fingerprint="sha256:fake", model_type="llama"
        )

        async def stop() -> None:
            self.stopped = True

        runtime = Runtime(engine=self.engine, tokenizer=self.tokenizer, catalog=catalog, server_info=info)
        return StartedRuntime(runtime=runtime, snapshot=self.engine.snapshot, stop=stop)
