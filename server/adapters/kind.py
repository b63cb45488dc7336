"""The adapter-kind interface and its registry: every kind the engine serves is one module under
`server/adapters/kinds/` that subclasses `AdapterKind` and calls `register_kind`.

A kind declares:
- `name`: the served kind ("lora", "ia3", ...; the wire enum is ADAPTER_KIND_<NAME>);
- `configs`: peft_type -> its pydantic config model (the allowlist of fields; see config.py);
- `claims(raw)`: whether it serves this adapter_config.json (default: its peft_type is in `configs`;
  a more specific kind, such as DoRA inside peft_type LORA, claims first by a higher `priority`);
- `load(config, tensors, spec, settings)`: validate the tensors against the base and the caps, and
  return its served form (`KindWeights`);
- its hook, one of three (`hook`):
  LINEAR  - a per-row hook inside every wrapped decoder linear; slot storage per module
            (`module_slots(site)` -> ModuleSlots: allocate, write, clear, bytes, pre/post hooks);
  PREFILL - a per-row hook at prefill (virtual tokens, key/value prefix); slot storage
            (`prefill_slots(site)` -> PrefillSlots: write, clear, bytes, prefill);
  PROMPT  - rewrites a request's token ids when it is submitted (no device slot at all).

Loader, slot bank, MultiAdapterLinear and the engine only ever iterate `all_kinds()`.
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from adapterserve.server.adapters.kernels import LoraKernels
from adapterserve.server.adapters.kernels.torch_backend import TorchLoraKernels

if TYPE_CHECKING:
    from torch import nn

    from adapterserve.server.adapters.config import PeftConfigBase
    from adapterserve.server.engine.kv_cache import KVCache
    from adapterserve.server.model.spec import BaseModelSpec
    from adapterserve.server.settings import EngineSettings

ModuleKey = tuple[int, str]  # (layer index, short linear name such as "q_proj")


class HookSite(enum.StrEnum):
    LINEAR = "linear"
    PREFILL = "prefill"
    PROMPT = "prompt"


class KindWeights:
    """A kind's served form of one adapter, in host memory. Subclasses are dataclasses of tensors."""

    def tensors(self) -> list[torch.Tensor]:
        """Every served tensor (counted for the host cache's bytes)."""
        return []

    # What AdapterInfo reports; a kind overrides what applies to it.
    rank: int | None = None
    num_virtual_tokens: int | None = None
    target_modules: tuple[str, ...] = ()
    extra_tokens: int = 0  # tokens the kind adds to a request besides virtual tokens (templates)


@dataclass
class LinearKindWeights(KindWeights):
    """Per adapted linear, the kind's value for that module (what its ModuleSlots.write takes)."""

    modules: dict[ModuleKey, Any]

    @property
    def target_modules(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(sorted({short for _, short in self.modules}))


@dataclass
class LinearSite:
    """Where a linear kind's slot tensors live: one wrapped base linear (in -> out)."""

    key: ModuleKey
    in_features: int
    out_features: int
    num_slots: int  # including slot 0 ("no adapter")
    dtype: torch.dtype
    device: torch.device
    base: nn.Module | None = None  # the base linear (plain or bitsandbytes), set when the model is wrapped
    # The low-rank math of LoRA-like kinds (EngineSettings.lora_backend; see server/adapters/kernels).
    kernels: LoraKernels = field(default_factory=TorchLoraKernels)


@dataclass(frozen=True)
class BankSite:
    """What a prefill kind's storage needs to know about the bank."""

    spec: BaseModelSpec
    num_slots: int
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class RowSelection:
    """The rows of one forward: slots [B] (row -> slot) and which kinds have rows in it."""

    slots: torch.Tensor  # [B] long
    kinds: frozenset[str]
    single_slot: int | None  # every row uses this one slot (plain matmuls replace the gathers)

    def of(self, per_slot: torch.Tensor) -> torch.Tensor:
        """per_slot [num_slots, ...] -> each row's entry [B, ...] (a copy; `index_select`, which costs
        a fraction of advanced indexing `per_slot[slots]` on a CPU)."""
        return per_slot.index_select(0, self.slots)


class ModuleSlots(ABC):
    """One linear kind's slot tensors for one wrapped linear. Slot 0 and every slot of another kind
    must act as the identity (zeros for additive deltas, ones for scales)."""

    def __init__(self, site: LinearSite) -> None:
        self.site = site

    @abstractmethod
    def write(self, slot: int, value: Any) -> None: ...

    @abstractmethod
    def clear(self, slot: int) -> None: ...

    @abstractmethod
    def nbytes(self) -> int: ...

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every device tensor a hook reads (the decode graphs recapture when one is reallocated).
        Default: the tensor attributes, and those of helper objects that have `slot_tensors`."""
        out: list[torch.Tensor] = []
        for value in vars(self).values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif hasattr(value, "slot_tensors") and not isinstance(value, (LinearSite, BankSite)):
                out.extend(value.slot_tensors())
        return out

    def pre(self, x: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        """x [B, S, in] -> the base linear's input. Default: unchanged."""
        return x

    def post(self, x: torch.Tensor, y: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        """x [B, S, in] (the layer's input), y [B, S, out] (the output so far) -> output. Default: y."""
        return y


class PrefillSlots(ABC):
    """One prefill kind's per-slot device state."""

    def __init__(self, site: BankSite) -> None:
        self.site = site

    @abstractmethod
    def write(self, slot: int, weights: KindWeights) -> None: ...

    @abstractmethod
    def clear(self, slot: int) -> None: ...

    @abstractmethod
    def nbytes(self) -> int: ...

    @abstractmethod
    def prefill(self, slot: int, row: int, embeds: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, int]:
        """A request starting in cache row `row`: embeds [n, H] (its prompt) -> (prefill inputs [m, H],
        cache position of the first input)."""


class AdapterKind(ABC):
    """One way of adapting the base (see the module docstring)."""

    name: ClassVar[str]
    configs: ClassVar[dict[str, type[PeftConfigBase]]]
    hook: ClassVar[HookSite]
    priority: ClassVar[int] = 0
    stores_weights: ClassVar[bool] = True  # False: the adapter is its config alone (templates)
    # True: its virtual positions' keys/values are its own weights, written into the cache with no forward
    # (prefix tuning); every row of one adapter version shares their whole blocks (prefix_cache.py)
    kv_prefix: ClassVar[bool] = False
    summary: ClassVar[str] = ""  # one line for docs and `--help`: what it stores, how it is applied
    # The PEFT method that makes adapters of this kind (a key of peft_configs.PEFT_METHODS); None: no
    # PEFT method does (bottleneck adapters, templates).
    peft_method: ClassVar[str | None] = None

    def peft_config(self, **fields: Any) -> Any:
        """A PEFT config that makes an adapter of this kind (task_type CAUSAL_LM unless given)."""
        from adapterserve.server.adapters.peft_configs import build_peft_config

        if self.peft_method is None:
            raise ValueError(f"adapter kind {self.name!r} is not made by a PEFT method")
        return build_peft_config(self.peft_method, **fields)

    def claims(self, raw: dict[str, Any]) -> bool:
        """Whether this kind serves the (decoded, unvalidated) adapter_config.json `raw`."""
        return raw.get("peft_type") in self.configs

    @abstractmethod
    def load(
        self,
        config: PeftConfigBase,
        tensors: dict[str, torch.Tensor],
        spec: BaseModelSpec,
        settings: EngineSettings,
    ) -> KindWeights:
        """The served form, validated against the base and the caps (BaseMismatchError /
        AdapterValidationError / UnsupportedAdapterError naming what does not fit)."""

    # LINEAR kinds
    def module_slots(self, site: LinearSite) -> ModuleSlots:
        raise NotImplementedError(f"{self.name} is not a linear kind")

    # PREFILL kinds
    def prefill_slots(self, site: BankSite) -> PrefillSlots:
        raise NotImplementedError(f"{self.name} is not a prefill kind")

    # PROMPT kinds
    def rewrite_prompt(self, weights: KindWeights, prompt_ids: Sequence[int], tokenizer: Any) -> list[int]:
        raise NotImplementedError(f"{self.name} is not a prompt kind")


_KINDS: dict[str, AdapterKind] = {}
_loaded = False


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Add a kind to the registry (called once by each module under kinds/)."""
    if kind.name in _KINDS and type(_KINDS[kind.name]) is not type(kind):
        raise RuntimeError(f"adapter kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def _load_kinds() -> None:
    global _loaded
    if _loaded:
        return
    from adapterserve.server.adapters import kinds as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")
    _loaded = True


def all_kinds() -> list[AdapterKind]:
    """Every registered kind, in name order."""
    _load_kinds()
    return [_KINDS[name] for name in sorted(_KINDS)]


def kind_names() -> list[str]:
    return [k.name for k in all_kinds()]


def served_peft_types() -> list[str]:
    return sorted({t for k in all_kinds() for t in k.configs})


def kind_for_config(raw: dict[str, Any]) -> AdapterKind | None:
    """The kind that serves a decoded adapter_config.json (highest priority first), or None."""
    for kind in sorted(all_kinds(), key=lambda k: -k.priority):
        if kind.claims(raw):
            return kind
    return None
