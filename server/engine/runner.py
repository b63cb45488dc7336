"""The batched forward over the base model: the model family's own transformers code for everything
(embeddings, norms, rotary, MLP/MoE, wrapped linears), with the engine's attention over its KV cache
(paged or dense) plugged in through transformers' attention interface (see attention.py).

Two stages, as in gpt-fast: `prefill` (new rows, a chunk of each prompt, right-padded) and `decode` (one
token for every running row). Both return the logits of each row's last position; `prefill_states`
returns every position's final hidden state instead (scoring requests need every position's logits).
`verify` checks once, at start, that this forward gives the model's own logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterserve.server.adapters.layers import AdapterBatch, AdapterContext, build_batch
from adapterserve.server.adapters.slots import NO_ADAPTER
from adapterserve.server.engine import attention
from adapterserve.server.engine.attention import AttentionStep, PackedStep
from adapterserve.server.engine.kv_cache import KVCache
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.model.family import UnsupportedModelError, decoder_parts, text_config


@dataclass
class PrefillRow:
    """One new request's prefill input."""

    embeds: torch.Tensor  # [n, H]: virtual prompt embeddings (prompt tuning) + token embeddings
    start: int  # cache position of the first input (prefix tuning: its virtual token count)


class ModelRunner:
    def __init__(
        self, model, cache: KVCache | PagedKVCache, context: AdapterContext, *, paged_kernel: bool = False
    ):
        """paged_kernel: decode attention reads the paged cache in place (cpu/paged_attention.py)."""
        parts = decoder_parts(model)
        self.model = model
        self.model_type = parts.model_type
        self.decoder = parts.decoder  # embeddings -> layers -> final norm, the family's own forward
        self.embeddings = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.head_scale, self.head_softcap = parts.head_scale, parts.head_softcap
        self.cache = cache
        self.context = context
        self.reference_attention = attention.original_implementation(model)
        self.attention = attention.install(model, parts.layers, cache, paged_kernel=paged_kernel)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(token_ids)

    @torch.inference_mode()
    def prefill(
        self,
        rows: list[PrefillRow],
        row_start: int,
        batch: AdapterBatch,
        table: torch.Tensor | None = None,  # [B, nb] the rows' block tables (paged; else rows row_start..)
    ) -> torch.Tensor:
        """Run new rows row_start.. through the model, filling their cache. Returns logits [B, V]."""
        x, last = self._prefill_hidden(rows, row_start, batch, table)
        return self.head(x[torch.arange(len(rows), device=x.device), last])  # [B, V]

    @torch.inference_mode()
    def prefill_states(
        self,
        rows: list[PrefillRow],
        row_start: int,
        batch: AdapterBatch,
        table: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Like `prefill`, but returns the final-norm hidden state of every position [B, S, H] (rows
        right-padded to the longest): `head` of a position's state is its next-token logits."""
        x, _ = self._prefill_hidden(rows, row_start, batch, table)
        return x

    @torch.inference_mode()
    def head(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token logits [..., V] (float32) of final-norm hidden states [..., H]."""
        logits = self.lm_head(states).float()
        if self.head_scale != 1.0:  # Cohere, Granite
            logits = logits * self.head_scale
        if self.head_softcap is not None:  # Gemma-2/3: cap * tanh(logits / cap)
            logits = torch.tanh(logits / self.head_softcap) * self.head_softcap
        return logits

    def _prefill_hidden(
        self, rows: list[PrefillRow], row_start: int, batch: AdapterBatch, table: torch.Tensor | None
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
        return self._forward(embeds, positions, row_start, batch, table=table), last

    @torch.inference_mode()
    def decode(
        self,
        token_ids: torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B]
        batch: AdapterBatch,
        table: torch.Tensor | None = None,  # [B, nb]: the rows' block tables (paged), else rows 0..B-1
    ) -> torch.Tensor:
        """One token for each row. Returns logits [B, V]."""
        embeds = self.embed(token_ids[:, None])  # [B, 1, H]
        x = self._forward(embeds, positions[:, None], 0, batch, table=table)  # [B, 1, H]
        return self.head(x[:, 0])  # [B, V]

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
        return self.head(x[:, 0])  # [R, V]

    @torch.inference_mode()
    def packed(
        self,
        tokens: list[int],  # the decode rows' last tokens (rows 0..Bd-1)
        positions: list[int],  # their cache positions
        rows: list[PrefillRow],  # prefill chunks (paged cache only)
        table: torch.Tensor,  # [Bd + Bp, nb] the rows' block tables: decode rows, then prefill rows
        batch: AdapterBatch,  # slots of every token: Bd decode tokens, then each chunk's tokens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode rows and prefill chunks in one forward: every token is a row of its own ([T, 1, H]), so
        each linear reads its weights once for both (see attention.PackedStep). Returns the decode rows'
        logits [Bd, V] and each prefill row's last-position logits [Bp, V]. The rows are addressed through
        `table` only (a copy on a prefill worker: the engine thread may renumber rows meanwhile)."""
        cache = self.cache
        assert isinstance(cache, PagedKVCache)
        device = cache.table.device
        bd, sizes = len(tokens), [r.embeds.shape[0] for r in rows]
        width, offsets = max(sizes), [sum(sizes[:i]) for i in range(len(sizes))]
        inputs = torch.cat(
            [self.embed(torch.tensor(tokens, dtype=torch.long, device=device)), *[r.embeds for r in rows]]
        )
        token_positions = positions + [r.start + s for r in rows for s in range(r.embeds.shape[0])]
        token_rows = list(range(bd)) + [bd + i for i, n in enumerate(sizes) for _ in range(n)]  # in table
        padded_positions = [
            [min(r.start + s, cache.max_len - 1) for s in range(width)] for r in rows
        ]  # [Bp, S]: padding continues past the row's end (masked; never written)
        pad_index = [offsets[i] + min(s, n - 1) for i, n in enumerate(sizes) for s in range(width)]
        unpad_index = [i * width + s for i, n in enumerate(sizes) for s in range(n)]
        as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        pos = as_long(token_positions)[:, None]  # [T, 1]
        step = PackedStep(
            token_table=table.index_select(0, as_long(token_rows)),
            token_positions=pos,
            decode_rows=bd,
            decode=AttentionStep(positions=pos[:bd], length=max(positions, default=0) + 1, table=table[:bd]),
            prefill=AttentionStep(
                positions=as_long(padded_positions),
                length=max(r.start + n for r, n in zip(rows, sizes, strict=True)),
                table=table[bd:],
            ),
            pad_index=as_long(pad_index),
            unpad_index=as_long(unpad_index),
        )
        self.context.batch = batch
        self.attention.step = step
        try:
            states = self.decoder(
                inputs_embeds=inputs[:, None], position_ids=pos, use_cache=False
            ).last_hidden_state
        finally:
            self.context.batch = None
            self.attention.step = None
        last = as_long(list(range(bd)) + [bd + o + n - 1 for o, n in zip(offsets, sizes, strict=True)])
        logits = self.head(states[:, 0].index_select(0, last))  # [Bd + Bp, V]
        return logits[:bd], logits[bd:]

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
        """The model's decoder over x; returns its final-norm hidden states [B, S, H]."""
        if length is None:
            length = int(positions.max()) + 1
        self.context.batch = batch
        self.attention.step = AttentionStep(
            positions=positions, length=length, row_start=row_start, table=table
        )
        try:
            out = self.decoder(inputs_embeds=x, position_ids=positions, use_cache=False)
        finally:
            self.context.batch = None
            self.attention.step = None
        return out.last_hidden_state

    @torch.inference_mode()
    def verify(self, prompt_tokens: int = 10, decode_steps: int = 3) -> float | None:
        """Check, before serving, that this forward gives the model's own logits: rows prefilled through
        the cache then decoded for a few steps, against the model's full forward with the attention it
        was loaded with. Uses cache rows 0 and 1 (nothing may be running). Returns the largest logit
        difference (None if the cache cannot hold the check); UnsupportedModelError when it is past the
        dtype's tolerance (a family whose forward the engine would change: refuse rather than serve
        different text)."""
        total = min(prompt_tokens + decode_steps, self.cache.capacity_tokens)
        prompt_tokens = max(total - decode_steps, 1)
        decode_steps = total - prompt_tokens
        count = min(2, self.cache.max_rows)
        if total < 2 or not self.cache.can_reserve([total] * count):
            return None
        vocab = int(text_config(self.model).vocab_size)
        device, dtype = self.embeddings.weight.device, self.embeddings.weight.dtype
        ids = (torch.arange(count * total, device=device).view(count, total) * 7919 + 13) % max(vocab - 1, 1)
        ids = ids + 1  # [rows, T], no token 0 (often padding)
        self.model.set_attn_implementation(self.reference_attention)
        try:
            want = self.model(input_ids=ids, use_cache=False).logits.float()  # [rows, T, V]
        finally:
            self.model.set_attn_implementation(attention.ATTENTION_NAME)
        no_adapter = build_batch([NO_ADAPTER] * count, {}, device)
        rows = [PrefillRow(embeds=self.embed(ids[i, :prompt_tokens]), start=0) for i in range(count)]
        for row in range(count):
            self.cache.reserve(row, total)
        try:
            got = [self.prefill(rows, 0, no_adapter)]  # [rows, V] each
            for step in range(decode_steps):
                pos = torch.full((count,), prompt_tokens + step, dtype=torch.long, device=device)
                got.append(self.decode(ids[:, prompt_tokens + step], pos, no_adapter))
        except (NotImplementedError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported by the engine: its forward through the "
                f"engine's KV cache fails ({type(exc).__name__}: {exc})"
            ) from exc
        finally:
            for row in range(count):
                self.cache.release(row)
        ours = torch.stack(got, dim=1)  # [rows, steps, V]
        ref = want[:, prompt_tokens - 1 : prompt_tokens - 1 + ours.shape[1]]
        diff = float((ours - ref).abs().max())
        scale = float(ref.abs().max())
        rel = 1e-3 if dtype == torch.float32 else 5e-2
        if not diff <= rel * max(scale, 1.0):  # also catches NaN
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported by the engine: its forward through the "
                f"engine's KV cache differs from transformers' own (max logit difference {diff:.3g} of "
                f"{scale:.3g}); refusing to serve different text"
            )
        return diff
