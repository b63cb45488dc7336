"""The engine's attention, plugged into each model family's own transformers code.

transformers calls the attention function registered under `config._attn_implementation` from every
attention module, with the rotated q/k/v and the layer's own `scaling`, `sliding_window` and `softcap`
(transformers' AttentionInterface). Registering ours lets the model's own forward do everything else
(embeddings and their scaling, norms before or after each block, fused projections, partial rotary,
MLP or MoE, parallel residuals), so every family that routes through the interface is served with its
own layout instead of a copy of Llama's.

Per call, our function:
- writes the new keys/values [B, kvH, S, D] into the engine's KV cache (dense or paged) at the rows'
  positions, and reads every cached key/value the rows attend to (prefix tuning's key/values are in the
  cache already, written at prefill start);
- builds the mask from the rows' cache positions (causal, and `q - k < sliding_window` where the layer
  has a window; masks are made once per forward and window size);
- runs SDPA, or, with logit soft-capping (Gemma-2), the same attention written out with the cap.

What the rows are (positions, block tables, how many keys) is the forward's `AttentionStep`, set by the
runner on an `AttentionState` that every attention module of the model points at (one per model, so two
engines in one process never share it).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from adapterserve.server.cpu import paged_attention as cpu_paged_attention
from adapterserve.server.engine.kv_cache import KVCache
from adapterserve.server.engine.paged_kv_cache import PagedKVCache

ATTENTION_NAME = "adapterserve"
_STATE_ATTR = "_adapterserve_attention"
_LAYER_ATTR = "_adapterserve_layer"


@dataclass
class AttentionStep:
    """One forward's rows, as the attention of every layer sees them."""

    positions: torch.Tensor  # [B, S] cache positions of the inputs (= rotary positions)
    length: int  # keys attended: every row's positions < length
    row_start: int = 0  # the rows' first cache row (when `table` is None)
    table: torch.Tensor | None = None  # [B, >= blocks] the rows' block tables (static decode step)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # window -> [B, 1, S, length]

    def mask(self, window: int | None) -> torch.Tensor:
        """Which keys each query sees [B, 1, S, length]: causal, and within `window` if there is one."""
        cached = self.masks.get(window)
        if cached is None:
            keys = torch.arange(self.length, device=self.positions.device)  # [L]
            distance = self.positions[:, :, None] - keys[None, None, :]  # [B, S, L]
            visible = distance >= 0
            if window is not None:
                visible = visible & (distance < window)
            cached = self.masks[window] = visible.unsqueeze(1)
        return cached


@dataclass
class PackedStep:
    """One forward over decode rows and prefill chunks together, every input token a row of its own
    (inputs [T, 1, H]: the Bd decode rows' tokens, then each prefill chunk's tokens in order), so the
    linears read their weights once for both. Attention splits them again: the decode tokens attend as a
    decode step, the prefill tokens are laid out padded [Bp, S] and attend as a prefill chunk."""

    token_table: torch.Tensor  # [T, >= blocks] each token's row's block table
    token_positions: torch.Tensor  # [T, 1] each token's cache position
    decode_rows: int  # Bd: tokens 0..Bd-1
    decode: AttentionStep  # the decode rows: positions [Bd, 1], table [Bd, nb]
    prefill: AttentionStep  # the prefill rows, padded: positions [Bp, S], table [Bp, nb]
    pad_index: torch.Tensor  # [Bp * S] the prefill token at each padded place (padding: any token)
    unpad_index: torch.Tensor  # [Tp] each prefill token's place in the padded [Bp * S] layout


class AttentionState:
    """The KV cache and the current forward's step, shared by every attention module of one model. The
    step is per thread: a prefill worker's forward and the decode forward may run at the same time
    (server/cpu/prefill_workers.py), each over its own rows."""

    def __init__(self, cache: KVCache | PagedKVCache, paged_kernel: bool = False):
        self.cache = cache
        # decode rows (one query position) read the paged cache in place (cpu/paged_attention.py)
        self.paged_kernel = paged_kernel and isinstance(cache, PagedKVCache)
        self._local = threading.local()

    @property
    def step(self) -> AttentionStep | PackedStep | None:
        return getattr(self._local, "step", None)

    @step.setter
    def step(self, step: AttentionStep | PackedStep | None) -> None:
        self._local.step = step


def attend(
    q: torch.Tensor,  # [B, H, S, D]
    k: torch.Tensor,  # [B, kvH, L, D]
    v: torch.Tensor,  # [B, kvH, L, D]
    mask: torch.Tensor,  # [B, 1, S, L] bool
    scale: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of q over k, v [B, H, S, D]. One query position with grouped KV heads (decode): the
    g = H / kvH query heads of a KV head are folded into the query axis ([B, kvH, g, D], head h reads
    KV head h // g as in transformers' repeat_kv), a plain attention with no GQA expansion (~15% faster
    SDPA on a CPU)."""
    b, h, s, d = q.shape
    kv_heads = k.shape[1]
    if softcap is not None:
        return _softcapped(q, k, v, mask, scale if scale is not None else 1 / math.sqrt(d), softcap)
    if s == 1 and h != kv_heads:
        folded = q.view(b, kv_heads, h // kv_heads, d)
        out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
        return out.view(b, h, 1, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != kv_heads)


def _softcapped(q, k, v, mask, scale: float, cap: float) -> torch.Tensor:
    """Attention with logit soft-capping, as Gemma-2 computes it: scores = cap * tanh(q.k * scale / cap)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # [B, H, L, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, S, L]
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def cache_attention(
    module: nn.Module,
    query: torch.Tensor,  # [B, H, S, D], rotated
    key: torch.Tensor,  # [B, kvH, S, D], rotated
    value: torch.Tensor,  # [B, kvH, S, D]
    attention_mask: torch.Tensor | None,  # transformers' mask: unused (ours comes from positions)
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls (registered as ATTENTION_NAME). Returns the attention
    output [B, S, H, D] as transformers' own functions do."""
    del attention_mask, dropout  # inference only; masks are built from the cache positions
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by the engine's attention")
    state: AttentionState | None = getattr(module, _STATE_ATTR, None)
    if state is None or state.step is None:
        raise RuntimeError(f"{type(module).__name__} called the engine's attention outside an engine forward")
    step, cache, layer = state.step, state.cache, getattr(module, _LAYER_ATTR)
    if isinstance(step, PackedStep):
        return _packed_attention(
            step, cache, layer, query, key, value, scaling, sliding_window, softcap, state.paged_kernel
        ), None
    if state.paged_kernel and query.shape[2] == 1 and softcap is None:  # a decode step on a CPU
        table = (
            step.table
            if step.table is not None
            else cache.table[step.row_start : step.row_start + key.shape[0]]
        )
        cache.write_blocks(layer, table, step.positions, key, value)
        out = _in_place(query, cache, layer, table, step.positions, sliding_window, scaling)  # [B, H, 1, D]
        return out.transpose(1, 2).contiguous(), None
    if step.table is None:
        cache.write(layer, step.row_start, step.positions, key, value)
        k_all, v_all = cache.read(layer, step.row_start, key.shape[0], step.length)  # [B, kvH, L, D]
    else:
        cache.write_blocks(layer, step.table, step.positions, key, value)
        k_all, v_all = cache.read_blocks(layer, step.table, step.length)
    out = attend(query, k_all, v_all, step.mask(sliding_window), scaling, softcap)  # [B, H, S, D]
    return out.transpose(1, 2).contiguous(), None


def _in_place(
    query: torch.Tensor,  # [B, H, 1, D]
    cache: PagedKVCache,
    layer: int,
    table: torch.Tensor,  # [B, >= blocks]
    positions: torch.Tensor,  # [B, 1]
    window: int | None,
    scale: float | None,
) -> torch.Tensor:
    """Decode attention over the rows' blocks where they lie (the C++ kernel). Returns [B, H, 1, D]."""
    scale = scale if scale is not None else 1 / math.sqrt(query.shape[3])
    return cpu_paged_attention.paged_decode_attention(
        query, cache.k[layer], cache.v[layer], table, positions, window, scale
    )


def _packed_attention(
    step: PackedStep,
    cache: PagedKVCache,
    layer: int,
    query: torch.Tensor,  # [T, H, 1, D]
    key: torch.Tensor,  # [T, kvH, 1, D]
    value: torch.Tensor,  # [T, kvH, 1, D]
    scaling: float | None,
    window: int | None,
    softcap: float | None,
    state_kernel: bool,
) -> torch.Tensor:
    """Attention of a PackedStep: every token's key/value written through its row's block table, then
    the decode tokens and the (re-padded) prefill chunk attend over their rows' cache. Returns [T, 1, H, D]."""
    cache.write_blocks(layer, step.token_table, step.token_positions, key, value)
    heads, dim = query.shape[1], query.shape[3]
    bd = step.decode_rows
    parts = []
    if bd and state_kernel and softcap is None:
        decode = step.decode
        parts.append(
            _in_place(query[:bd], cache, layer, decode.table, decode.positions, window, scaling)[:, :, 0]
        )
    elif bd:
        k, v = cache.read_blocks(layer, step.decode.table, step.decode.length)  # [Bd, kvH, Ld, D]
        parts.append(
            attend(query[:bd], k, v, step.decode.mask(window), scaling, softcap)[:, :, 0]
        )  # [Bd, H, D]
    rows, width = step.prefill.positions.shape
    padded = query[bd:, :, 0].index_select(0, step.pad_index)  # [Bp * S, H, D]
    q = padded.view(rows, width, heads, dim).transpose(1, 2)  # [Bp, H, S, D]
    k, v = cache.read_blocks(layer, step.prefill.table, step.prefill.length)  # [Bp, kvH, Lp, D]
    out = attend(q, k, v, step.prefill.mask(window), scaling, softcap)  # [Bp, H, S, D]
    parts.append(out.transpose(1, 2).reshape(rows * width, heads, dim).index_select(0, step.unpad_index))
    return torch.cat(parts)[:, None]  # [T, 1, H, D]


def install(
    model: nn.Module, layers: nn.ModuleList, cache: KVCache | PagedKVCache, *, paged_kernel: bool = False
) -> AttentionState:
    """Make `model` call `cache_attention` with a state of its own; returns that state. The attention
    modules are the ones transformers gives a `layer_idx`; each is told its layer's cache index.
    paged_kernel: decode rows read the paged cache in place (cpu/paged_attention.py)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, cache_attention)
    state = AttentionState(cache, paged_kernel)
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                setattr(module, _STATE_ATTR, state)
                setattr(module, _LAYER_ATTR, index)
    model.set_attn_implementation(ATTENTION_NAME)
    return state


def original_implementation(model: nn.Module) -> str:
    """The attention implementation the model was loaded with (sdpa, eager, ...)."""
    return str(model.config._attn_implementation)
