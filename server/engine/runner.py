"""The batched forward over a Llama-family base: our own attention over the KV cache (paged or dense), the
base model's own modules for everything else (embeddings, norms, rotary, MLP, wrapped linears).

Two stages, as in gpt-fast: `prefill` (new rows, a chunk of each prompt, right-padded) and `decode` (one
token for every running row). Both return the logits of each row's last position; `prefill_states`
returns every position's final hidden state instead (scoring requests need every position's logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adapterserve.server.adapters.layers import AdapterBatch, AdapterContext
from adapterserve.server.engine.kv_cache import KVCache
from adapterserve.server.engine.paged_kv_cache import PagedKVCache


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos, sin: [B, S, D] (from the model's rotary embedding)."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


@dataclass
class PrefillRow:
    """One new request's prefill input."""

    embeds: torch.Tensor  # [n, H]: virtual prompt embeddings (prompt tuning) + token embeddings
    start: int  # cache position of the first input (prefix tuning: its virtual token count)


class ModelRunner:
    def __init__(self, model, cache: KVCache | PagedKVCache, context: AdapterContext):
        self.model = model
        self.inner = model.model  # LlamaModel-like: embed_tokens, layers, norm, rotary_emb
        self.cache = cache
        self.context = context
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.num_heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.num_heads)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_tokens(token_ids)

    @torch.inference_mode()
    def prefill(self, rows: list[PrefillRow], row_start: int, batch: AdapterBatch) -> torch.Tensor:
        """Run new rows row_start.. through the model, filling their cache. Returns logits [B, V]."""
        x, last = self._prefill_hidden(rows, row_start, batch)
        return self.head(self.inner.norm(x[torch.arange(len(rows), device=x.device), last]))  # [B, V]

    @torch.inference_mode()
    def prefill_states(self, rows: list[PrefillRow], row_start: int, batch: AdapterBatch) -> torch.Tensor:
        """Like `prefill`, but returns the final-norm hidden state of every position [B, S, H] (rows
        right-padded to the longest): `head` of a position's state is its next-token logits."""
        x, _ = self._prefill_hidden(rows, row_start, batch)
        return self.inner.norm(x)

    @torch.inference_mode()
    def head(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token logits [..., V] (float32) of final-norm hidden states [..., H]."""
        return self.model.lm_head(states).float()

    def _prefill_hidden(
        self, rows: list[PrefillRow], row_start: int, batch: AdapterBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(rows)
        longest = max(r.embeds.shape[0] for r in rows)
        hidden = rows[0].embeds.shape[1]
        device = rows[0].embeds.device
        embeds = torch.zeros(b, longest, hidden, dtype=rows[0].embeds.dtype, device=device)  # [B, S, H]
        positions = torch.empty(b, longest, dtype=torch.long, device=device)  # [B, S]
        last = torch.empty(b, dtype=torch.long, device=device)
        steps = torch.arange(longest, device=device)
        for i, row in enumerate(rows):
            n = row.embeds.shape[0]
            embeds[i, :n] = row.embeds
            # Padded positions continue past the row's end (clamped); they are masked for the row's own
            # real tokens and overwritten by its decode steps before they are ever read.
            positions[i] = (row.start + steps).clamp(max=self.cache.max_len - 1)
            last[i] = n - 1
        return self._forward(embeds, positions, row_start, batch), last

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, positions: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        """token_ids, positions: [B] for rows 0..B-1. Returns logits [B, V]."""
        embeds = self.embed(token_ids[:, None])  # [B, 1, H]
        x = self._forward(embeds, positions[:, None], 0, batch)  # [B, 1, H]
        return self.head(self.inner.norm(x[:, 0]))  # [B, V]

    @torch.inference_mode()
    def decode_static(
        self,
        tokens: torch.Tensor,  # [R] long
        positions: torch.Tensor,  # [R] long
        table: torch.Tensor,  # [R, >= length / block_size] block tables (paged cache)
        batch: AdapterBatch,  # slots [R], single_slot None
        length: int,  # keys attended, a bucket >= every row's position + 1
    ) -> torch.Tensor:
        """The decode step with static shapes (see decode_graphs.py): every shape depends on R and
        `length` only, nothing reads a tensor's value on the host. Padding rows carry token 0 at
        position 0 of the scratch block. Returns logits [R, V]."""
        return self.decode_static_step(tokens, positions, table, batch, length)

    def decode_static_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        table: torch.Tensor,
        batch: AdapterBatch,
        length: int,
    ) -> torch.Tensor:
        """`decode_static` without its inference_mode wrapper: what torch.compile traces (called inside
        inference mode; compiling the decorated method leaves the mode out of the traced graph)."""
        embeds = self.embed(tokens[:, None])  # [R, 1, H]
        x = self._forward(embeds, positions[:, None], 0, batch, table=table, length=length)  # [R, 1, H]
        return self.head(self.inner.norm(x[:, 0]))  # [R, V]

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        """SDPA of q [B, H, S, D] over k, v [B, kvH, L, D] with mask [B, 1, S, L]. One query position with
        grouped KV heads (decode): the g = H / kvH query heads of a KV head are folded into the query
        axis ([B, kvH, g, D], head h reads KV head h // g as in transformers' repeat_kv), a plain
        attention with no GQA expansion (~15% faster SDPA on a CPU)."""
        b, h, s, d = q.shape
        kv_heads = k.shape[1]
        if s == 1 and h != kv_heads:
            folded = q.view(b, kv_heads, h // kv_heads, d)
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=scale)
            return out.view(b, h, 1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    def _forward(
        self,
        x: torch.Tensor,  # [B, S, H]
        positions: torch.Tensor,  # [B, S] cache positions = rotary positions
        row_start: int,
        batch: AdapterBatch,
        *,
        table: torch.Tensor | None = None,  # [B, nb]: the rows' block tables (else rows row_start..)
        length: int | None = None,  # keys attended (else max(positions) + 1, a host sync)
    ) -> torch.Tensor:
        """The decoder layers over x; returns the last layer's hidden states [B, S, H] (before the
        final norm)."""
        b, s, _ = x.shape
        if length is None:
            length = int(positions.max()) + 1
        cos, sin = self.inner.rotary_emb(x, positions)  # [B, S, D]
        keys = torch.arange(length, device=x.device)
        mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, S, length]
        self.context.batch = batch
        try:
            for layer_idx, layer in enumerate(self.inner.layers):
                attn = layer.self_attn
                h = layer.input_layernorm(x)
                q = attn.q_proj(h).view(b, s, self.num_heads, self.head_dim)
                k = attn.k_proj(h).view(b, s, self.kv_heads, self.head_dim)
                v = attn.v_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
                if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
                    q, k = attn.q_norm(q), attn.k_norm(k)
                q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, H, S, D]
                k = apply_rotary(k.transpose(1, 2), cos, sin)  # [B, kvH, S, D]
                if table is None:
                    self.cache.write(layer_idx, row_start, positions, k, v)
                    k_all, v_all = self.cache.read(layer_idx, row_start, b, length)  # [B, kvH, length, D]
                else:
                    self.cache.write_blocks(layer_idx, table, positions, k, v)
                    k_all, v_all = self.cache.read_blocks(layer_idx, table, length)
                out = self._attention(q, k_all, v_all, mask, getattr(attn, "scaling", None))  # [B, H, S, D]
                x = x + attn.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        finally:
            self.context.batch = None
        return x
