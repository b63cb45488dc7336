"""LoRA (and rsLoRA, AdaLoRA, QLoRA adapters): per-module low-rank deltas, a LINEAR kind.

Stores, per adapted linear, A [in, r] and B [r, out] with the scaling folded into B; applied as
`y += (x @ A[slot]) @ B[slot]` per row (one shared adapter: plain matmuls; mixed: gathered `bmm`).
AdaLoRA's singular values (lora_E) and its `scaling / ranknum` are folded the same way; pruned ranks are
already dropped by PEFT when it saves (its rank_pattern is applied to the state dict).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from adapterserve.server.adapters.config import (
    MAX_LIST,
    ShortStr,
    StrList,
    TargetedConfig,
    check_targets_agree,
    is_off,
    pattern_value,
)
from adapterserve.server.adapters.kind import (
    AdapterKind,
    HookSite,
    LinearKindWeights,
    LinearSite,
    ModuleKey,
    ModuleSlots,
    RowSelection,
    register_kind,
)
from adapterserve.server.adapters.kinds._linear import LowRankSlots, group_module_tensors
from adapterserve.server.errors import AdapterValidationError, BaseMismatchError, UnsupportedAdapterError
from adapterserve.server.model.spec import BaseModelSpec
from adapterserve.server.settings import EngineSettings

# init_lora_weights values that rewrite the BASE weights at init (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA).
# PEFT resets the field to True when it saves such an adapter converted to plain LoRA
# (save_pretrained(path_initial_model_for_weight_conversion=...)); an unconverted one only fits the
# mutated base, which is not what the server holds.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# Plain module names (no regex metacharacters other than '.'): what rank/alpha pattern keys may be.
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.\-]{1,256}$")


class LoraAdapterConfig(TargetedConfig):
    """LoRA / rsLoRA (and QLoRA: a LoRA trained on a quantized base). Fields as PEFT 0.21.2 writes them."""

    peft_type: Literal["LORA"]
    r: Annotated[int, Field(ge=1)] = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    rank_pattern: dict[ShortStr, Annotated[int, Field(ge=1)]] | None = None  # module name -> rank
    alpha_pattern: dict[ShortStr, float] | None = None  # module name -> alpha
    layers_to_transform: Annotated[list[int], Field(max_length=MAX_LIST)] | int | None = None
    layers_pattern: StrList | ShortStr | None = None

    # Init/training-time only: accepted, ignored by the server.
    lora_dropout: float = 0.0
    init_lora_weights: bool | ShortStr = True
    loftq_config: dict[str, Any] | None = None
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    velora_config: dict[str, Any] | None = None  # VeLoRA only changes the backward pass
    qalora_group_size: int = 16  # only read when use_qalora
    ensure_weight_tying: bool = False  # only acts on modules_to_save, which is refused
    megatron_core: ShortStr | None = "megatron.core"

    # Values other than the default are refused (see unsupported()).
    fan_in_fan_out: bool = False
    bias: ShortStr = "none"
    use_dora: bool = False
    lora_bias: bool = False
    use_qalora: bool = False
    target_parameters: StrList | None = None
    alora_invocation_tokens: Annotated[list[int], Field(max_length=MAX_LIST)] | None = None
    layer_replication: Annotated[list[list[int]], Field(max_length=MAX_LIST)] | None = None
    trainable_token_indices: Annotated[list[int], Field(max_length=MAX_LIST)] | dict[str, Any] | None = None
    megatron_config: dict[str, Any] | None = None
    monteclora_config: dict[str, Any] | None = None
    use_bdlora: dict[str, Any] | bool | None = None
    arrow_config: dict[str, Any] | None = None
    kasa_config: dict[str, Any] | None = None

    def unsupported(self) -> list[tuple[str, Any, str]]:
        out = super().unsupported()
        default_only: list[tuple[str, Any, str]] = [
            ("use_dora", False, "DoRA is not served"),
            ("lora_bias", False, "a bias on LoRA B is not served"),
            ("bias", "none", "trained base biases are not served"),
            ("fan_in_fan_out", False, "transposed (Conv1D) base weights are not served"),
            ("use_qalora", False, "QALoRA is not served"),
            ("target_parameters", None, "LoRA on raw parameters (MoE experts) is not served"),
            ("alora_invocation_tokens", None, "Activated LoRA is not served"),
            ("layer_replication", None, "layer replication is not served"),
            ("trainable_token_indices", None, "trainable tokens are not served"),
            ("megatron_config", None, "Megatron parallel layers are not served"),
            ("monteclora_config", None, "Monte Carlo LoRA is not served"),
            ("use_bdlora", None, "block-diagonal LoRA is not served"),
            ("arrow_config", None, "Arrow routing is not served"),
            ("kasa_config", None, "KaSA is not served"),
        ]
        for name, default, why in default_only:
            value = getattr(self, name)
            off = value == default or (default is None and is_off(value))
            if not off:
                out.append((name, value, why))
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
            out.append(
                (
                    "init_lora_weights",
                    init,
                    "this init rewrites the base weights; save the adapter converted to plain LoRA "
                    "(save_pretrained(..., path_initial_model_for_weight_conversion=...))",
                )
            )
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field) or {}:
                if _PLAIN_KEY.fullmatch(key) is None:
                    out.append(
                        (field, key, "only plain module names are served as pattern keys, not regexes")
                    )
        return out

    def remote_code(self) -> list[tuple[str, Any, str]]:
        out = super().remote_code()
        if self.megatron_core not in (None, "megatron.core"):
            out.append(("megatron_core", self.megatron_core, "names a module to import"))
        return out

    def rank_for(self, module_name: str) -> int:
        """The rank PEFT gives `module_name` (e.g. model.layers.0.self_attn.q_proj)."""
        value = pattern_value(self.rank_pattern, module_name)
        return self.r if value is None else int(value)

    def alpha_for(self, module_name: str) -> float:
        """The lora_alpha PEFT gives `module_name`."""
        value = pattern_value(self.alpha_pattern, module_name)
        return self.lora_alpha if value is None else float(value)

    def scaling_for(self, module_name: str, rank: int | None = None) -> float:
        """PEFT's LoRA scaling: alpha / r, or alpha / sqrt(r) with rsLoRA. `rank` overrides the config's."""
        r = self.rank_for(module_name) if rank is None else rank
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


class AdaLoraAdapterConfig(LoraAdapterConfig):
    """AdaLoRA: LoRA with an SVD-style E vector and per-module pruned ranks (rank_pattern holds masks)."""

    peft_type: Literal["ADALORA"]  # type: ignore[assignment]
    target_r: Annotated[int, Field(ge=1)] = 8
    init_r: Annotated[int, Field(ge=1)] = 12
    # After training: module name -> keep-mask over init_r ranks (PEFT's resize_modules_by_rank_pattern).
    rank_pattern: dict[ShortStr, Annotated[list[bool], Field(max_length=1 << 16)]] | None = None  # type: ignore[assignment]
    # Training schedule only.
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def rank_for(self, module_name: str) -> int:
        """Kept ranks of `module_name` after pruning (init_r when there is no mask for it)."""
        mask = pattern_value(self.rank_pattern, module_name)
        return self.init_r if mask is None else sum(1 for keep in mask if keep)


# --------------------------------------------------------------------------------------- served form
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[ABE])(?:\.weight)?$")


@dataclass
class LoraWeights(LinearKindWeights):
    """Per adapted module: (A [in, r], B [r, out] with the scaling folded in)."""

    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:  # type: ignore[override]
        return max(a.shape[1] for a, _ in self.modules.values())

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.modules.values() for t in pair]


def check_rank_cap(config: LoraAdapterConfig, settings: EngineSettings) -> None:
    """The largest rank the config declares must be within the server's cap."""
    ranks = (
        [config.init_r]
        if isinstance(config, AdaLoraAdapterConfig)
        else [config.r, *(config.rank_pattern or {}).values()]
    )
    if max(ranks) > settings.max_lora_rank:
        raise AdapterValidationError(
            f"LoRA rank {max(ranks)} is above this server's cap of {settings.max_lora_rank}"
        )


def lora_pairs(
    config: LoraAdapterConfig,
    grouped: dict[ModuleKey, dict[str, torch.Tensor]],
    spec: BaseModelSpec,
) -> dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]]:
    """(A [in, r], B [r, out] * scaling) per module from PEFT's lora_A/lora_B(/lora_E) tensors."""
    is_adalora = isinstance(config, AdaLoraAdapterConfig)
    modules: dict[ModuleKey, tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, short), parts in sorted(grouped.items()):
        name = spec.module_name(layer, short)
        if "A" not in parts or "B" not in parts or (is_adalora and "E" not in parts):
            need = "lora_A, lora_B" + (" and lora_E" if is_adalora else "")
            raise BaseMismatchError(f"module {name}: needs {need}; found {sorted(parts)}")
        if not is_adalora and "E" in parts:
            raise UnsupportedAdapterError(f"module {name}: lora_E only exists in ADALORA adapters")
        a, b = parts["A"].float(), parts["B"].float()  # a: [r, in], b: [out, r]
        in_f, out_f = spec.linear_shapes[short]
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != in_f
            or b.shape[0] != out_f
            or a.shape[0] != b.shape[1]
        ):
            raise BaseMismatchError(
                f"module {name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"a {in_f}->{out_f} linear (expected [r, {in_f}] and [{out_f}, r])"
            )
        rank = a.shape[0]
        if rank == 0:  # AdaLoRA pruned this module entirely: it changes nothing
            continue
        if isinstance(config, AdaLoraAdapterConfig):
            e = parts["E"].float().reshape(-1)  # [r]
            if e.shape[0] != rank:
                raise BaseMismatchError(f"module {name}: lora_E has {e.shape[0]} values for rank {rank}")
            # PEFT: delta = x @ (A*E).T @ B.T * scaling / (ranknum + 1e-5). ranknum is the rank the
            # module was created with (init_r); PEFT keeps it when it prunes by rank_pattern on load.
            scaling = (config.lora_alpha if config.lora_alpha > 0 else float(rank)) / (
                float(config.init_r) + 1e-5
            )
            a = a * e[:, None]
        else:
            if config.rank_for(name) != rank:
                raise BaseMismatchError(
                    f"module {name}: weights have rank {rank} but the config says {config.rank_for(name)}"
                )
            scaling = config.scaling_for(name, rank)
        modules[(layer, short)] = (a.t().contiguous(), (b.t() * scaling).contiguous())  # [in, r], [r, out]
    if not modules:
        raise BaseMismatchError("the adapter adapts no module of the base model (it would change nothing)")
    return modules


class LoraModuleSlots(ModuleSlots):
    """A [S, in, r_cap], B [S, r_cap, out] (zeros: no delta)."""

    def __init__(self, site: LinearSite) -> None:
        super().__init__(site)
        self.pairs = LowRankSlots(site, site.in_features, site.out_features)

    def write(self, slot: int, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.pairs.write(slot, *value)

    def clear(self, slot: int) -> None:
        self.pairs.clear(slot)

    def nbytes(self) -> int:
        return self.pairs.nbytes()

    def post(self, x: torch.Tensor, y: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        return y + self.pairs.delta(x, rows).to(y.dtype)  # [B, S, out]


class LoraKind(AdapterKind):
    name = "lora"
    peft_method = "lora"
    configs = {"LORA": LoraAdapterConfig, "ADALORA": AdaLoraAdapterConfig}
    hook = HookSite.LINEAR
    summary = (
        "A [in, r], B [r, out] per adapted linear; y += x @ A @ B per row (LoRA, rsLoRA, AdaLoRA, QLoRA)"
    )

    def load(self, config, tensors, spec, settings) -> LoraWeights:
        assert isinstance(config, LoraAdapterConfig)
        check_rank_cap(config, settings)
        grouped = group_module_tensors(tensors, spec, _LORA_KEY, "<module>.lora_A/.lora_B[.weight]")
        check_targets_agree(config, list(grouped), spec)
        return LoraWeights(modules=lora_pairs(config, grouped, spec))

    def module_slots(self, site: LinearSite) -> ModuleSlots:
        return LoraModuleSlots(site)


register_kind(LoraKind())
