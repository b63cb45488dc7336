"""In-place weight updates: newer versions of a stored adapter, held in host memory, written to disk every k.

An update replaces every tensor of a stored adapter at once. The config stays the stored one; the tensors
must carry exactly the stored names and shapes, a floating-point dtype and finite values, and the adapter's
kind then checks them against the base as it checks an upload's (`build_adapter`). No file is parsed on
the way: the tensors arrive in memory and go to the engine from there.

Each update is a new version of the name, above every version it ever had: the next request that resolves
the name gets it, while requests admitted earlier keep theirs (the engine keys device slots by (name,
version), so a request decodes every token with one version). Versions are reserved on disk in blocks
(`AdapterStore.reserve_versions`), so an update rarely touches the disk and a version is never issued
twice, not even after a restart.

`LiveAdapters` is the engine's AdapterProvider in the server: it answers with the newest updated version of
a name as long as the store still serves the upload that version was derived from (same uid); an upload or
a delete of the name supersedes it. The newest version is written to the store through the ordinary upload
path (atomic, validated, under the same version number) when an update asks for it, and after every
`persist_every` updates, so that a restart loses at most that many.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from adapterserve.server.adapters.loader import CONFIG_FILE, WEIGHTS_FILE, LoadedAdapter
from adapterserve.server.adapters.safetensors_check import check_safetensors_file
from adapterserve.server.cpu.omp_pools import run_releasing_pool
from adapterserve.server.engine.provider import ResolvedAdapter
from adapterserve.server.errors import AdapterValidationError, FailedPreconditionError, ServeError
from adapterserve.server.store.names import validate_name
from adapterserve.server.store.registry import AdapterRegistry
from adapterserve.server.store.upload import UploadRequest

log = logging.getLogger(__name__)

# Versions reserved on disk at a time: an update writes the version record once per this many updates.
RESERVE = 64

# The dtypes an update may carry (the safetensors allowlist of uploads: floating point only).
UPDATE_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in UPDATE_DTYPES.items()}

# Builds the served form of an adapter from its config bytes and tensors, validating them against the
# base (in the server: functools.partial(build_adapter, spec=base.spec, settings=settings.engine)).
AdapterBuilder = Callable[[bytes, dict[str, torch.Tensor]], LoadedAdapter]

TensorLayout = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


@dataclass(frozen=True)
class UpdateResult:
    """One applied update."""

    resolved: ResolvedAdapter  # the new version, as requests now resolve the name
    previous_version: int  # the version it replaced
    persisted_version: int  # the newest version written to the store (0: none since updates began)
    persisted: bool  # whether this update wrote it


@dataclass
class _Live:
    resolved: ResolvedAdapter
    config: bytes
    layout: TensorLayout
    description: str
    next_version: int  # the version the next update gets
    reserved: int = 0  # versions up to this one are recorded on disk
    since_persist: int = 0
    persisted_version: int = 0
    tensors: dict[str, torch.Tensor] | None = None  # the newest version's tensors, until written


def check_update_tensors(tensors: Mapping[str, torch.Tensor], layout: TensorLayout) -> None:
    """The stored adapter's tensor names and shapes, a float dtype and finite values; else
    AdapterValidationError naming the first tensor at fault."""
    missing = sorted(set(layout) - set(tensors))
    extra = sorted(set(tensors) - set(layout))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} tensor(s) the adapter does not have, e.g. {extra[0]!r}")
        raise AdapterValidationError(
            "an update carries every tensor of the stored adapter and no other: " + "; ".join(parts)
        )
    for name, tensor in tensors.items():
        _, shape = layout[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise AdapterValidationError(f"tensor {name!r}: dtype {tensor.dtype} is not a float dtype")
        if tuple(tensor.shape) != shape:
            raise AdapterValidationError(
                f"tensor {name!r}: shape {tuple(tensor.shape)} differs from the stored {shape} "
                "(an update keeps the adapter's config; upload a new adapter to change it)"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterValidationError(f"tensor {name!r}: holds NaN or infinite values")


def tensor_from_bytes(name: str, dtype: str, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    """A CPU tensor of `shape` and safetensors `dtype` from its little-endian bytes (a copy)."""
    torch_dtype = UPDATE_DTYPES.get(dtype)
    if torch_dtype is None:
        raise AdapterValidationError(
            f"tensor {name!r}: dtype {dtype!r} is not one of {', '.join(UPDATE_DTYPES)}"
        )
    if any(d < 0 for d in shape) or len(shape) > 8:
        raise AdapterValidationError(f"tensor {name!r}: shape {shape} is not a tensor shape")
    expected = math.prod(shape) * torch.tensor([], dtype=torch_dtype).element_size()
    if len(data) != expected:
        raise AdapterValidationError(
            f"tensor {name!r}: {len(data)} bytes, but {dtype} of shape {list(shape)} takes {expected}"
        )
    if not data:
        return torch.empty(shape, dtype=torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape(shape)


class LiveAdapters:
    """The AdapterProvider over the registry that serves in-place updated versions (see the module doc).

    Call from one event loop; updates of one name run one at a time."""

    def __init__(self, registry: AdapterRegistry, build: AdapterBuilder, *, persist_every: int = 16) -> None:
        self.registry = registry
        self.store = registry.store
        self._build = build
        self.persist_every = persist_every
        self._live: dict[str, _Live] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # ------------------------------------------------------------------ AdapterProvider
    async def get(self, name: str) -> ResolvedAdapter:
        """The newest version of `name`: an in-place update's, else the registry's (NotFoundError)."""
        live = self._current(name)
        if live is not None:
            return live.resolved
        return await self.registry.get(name)

    def live_version(self, name: str) -> int | None:
        """The version an update made current (None: the name serves its stored version)."""
        live = self._current(name)
        return None if live is None else live.resolved.version

    def _current(self, name: str) -> _Live | None:
        live = self._live.get(name)
        if live is None:
            return None
        stored = self.store.current(name)
        if stored is None or stored.uid != live.resolved.uid:  # uploaded again or deleted since
            del self._live[name]
            return None
        return live

    # ------------------------------------------------------------------ updates
    async def update(
        self, name: str, tensors: dict[str, torch.Tensor], *, persist: bool = False
    ) -> UpdateResult:
        """Replace the weights of stored adapter `name` (see the module doc). Raises NotFoundError,
        AdapterValidationError (INVALID_ARGUMENT) and FailedPreconditionError (a kind without tensors)."""
        validate_name(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            previous = await self.get(name)
            live = self._live.get(name)
            if live is None:
                live = await self._begin(name, previous)
            check_update_tensors(tensors, live.layout)
            adapter = await run_releasing_pool(self._build, live.config, dict(tensors))
            version = live.next_version
            if version > live.reserved:
                live.reserved = version + RESERVE - 1
                await asyncio.to_thread(self.store.reserve_versions, name, live.reserved)
            live.resolved = ResolvedAdapter(
                name=name,
                version=version,
                uid=previous.uid,
                info=adapter.info,
                adapter=adapter,
                nbytes=int(adapter.nbytes),
            )
            live.next_version = version + 1
            live.tensors = dict(tensors)
            live.since_persist += 1
            self._live[name] = live
            wrote = persist
            if persist:
                await self._persist(name, live)
            elif self.persist_every > 0 and live.since_persist >= self.persist_every:
                try:
                    await self._persist(name, live)
                    wrote = True
                except ServeError as err:  # served from memory all the same; the next update tries again
                    log.warning("adapter %r version %d not written to the store: %s", name, version, err)
            return UpdateResult(
                resolved=live.resolved,
                previous_version=previous.version,
                persisted_version=live.persisted_version,
                persisted=wrote,
            )

    async def persist(self, name: str) -> int:
        """Write the newest updated version of `name` to the store now; returns the stored version."""
        validate_name(name)
        async with self._locks.setdefault(name, asyncio.Lock()):
            live = self._current(name)
            if live is None:
                return (await self.registry.get(name)).version
            if live.tensors is not None:
                await self._persist(name, live)
            return live.persisted_version

    async def _begin(self, name: str, stored: ResolvedAdapter) -> _Live:
        """The stored adapter's config and tensor layout, read once per name (the first update)."""
        if not stored.adapter.handler.stores_weights:
            raise FailedPreconditionError(
                f"adapter {name!r} is a {stored.info.kind} adapter: it has no weights"
            )

        def read() -> tuple[bytes, TensorLayout, str]:
            with self.store.reading(name) as (path, manifest):
                config = (path / CONFIG_FILE).read_bytes()
                header = check_safetensors_file(path / WEIGHTS_FILE, max_bytes=self.store.max_adapter_bytes)
                return config, {t.name: (t.dtype, t.shape) for t in header.tensors}, manifest.description

        config, layout, description = await asyncio.to_thread(read)
        first = await asyncio.to_thread(self.store.next_version, name)
        return _Live(
            resolved=stored, config=config, layout=layout, description=description, next_version=first
        )

    async def _persist(self, name: str, live: _Live) -> None:
        from safetensors.torch import save as save_safetensors

        tensors = live.tensors
        assert tensors is not None
        data = await asyncio.to_thread(
            save_safetensors, {k: v.contiguous() for k, v in tensors.items()}, {"format": "pt"}
        )
        request = UploadRequest(
            name, overwrite=True, description=live.description, version=live.resolved.version
        )

        async def files():
            yield CONFIG_FILE, live.config
            yield WEIGHTS_FILE, data

        result = await self.registry.upload(request, files())
        # the stored upload is now this version: the live entry follows its uid
        live.resolved = replace(live.resolved, uid=result.manifest.uid)
        live.persisted_version = result.manifest.version
        live.since_persist = 0
        live.tensors = None
