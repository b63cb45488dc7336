"""Prefix caching: which KV blocks a request can take already computed, and the keys of those it fills.

A block's key is a hash chained over its parent block's key and the tokens at its positions, rooted in
the identity of what computes keys and values: the base alone, or an adapter's name and version. Keys and
values at a position depend on every token before it and, under a LoRA anywhere, on the adapter in every
later layer, so a block is never shared across adapters or across versions of one adapter (a replaced
adapter gets a new version, its old blocks are unreachable and age out of the LRU). A prompt- or
prefix-tuning adapter's virtual positions come first in the chain as placeholder tokens (-1, -2, ...):
the adapter version in the root says what they hold.

The scheduler (scheduler.Scheduler.place) looks a new request's chain up in the paged cache
(`PagedKVCache.match`) and it prefills only the rest; once its prefill inputs are written, after a prefill
chunk is booked, and when a row retires, the row's full blocks get their keys (`register_blocks`). A request that asks for prompt logprobs or scores its prompt
computes every position (cached positions would give no states to score), and still leaves its blocks
for others. With prefix caching off only a prefix-tuning adapter's own key/value prefix is shared (whole
blocks of it: no forward computes them).
"""

from __future__ import annotations

import hashlib
from array import array

from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.sequence import Sequence

ROOT_OF_BASE = b"adapterserve-kv/base"


def root_key(seq: Sequence) -> bytes:
    """The chain's root: the base, or the adapter's (name, version)."""
    if seq.resolved is None:
        return ROOT_OF_BASE
    return hashlib.sha256(f"adapterserve-kv/{seq.resolved.name}@{seq.resolved.version}".encode()).digest()


def chain_tokens(seq: Sequence, with_output: bool = False) -> list[int]:
    """The token at each cache position: virtual placeholders, the prompt (and what was generated)."""
    tokens = [-1 - i for i in range(seq.virtual_tokens)] + list(seq.request.prompt_ids)
    return tokens + seq.output if with_output else tokens


def extend_keys(seq: Sequence, tokens: list[int], blocks: int, block_size: int) -> list[bytes]:
    """The keys of the first `blocks` full blocks of `tokens` (seq.block_keys, extended as needed)."""
    keys = seq.block_keys
    parent = keys[-1] if keys else root_key(seq)
    for i in range(len(keys), min(blocks, len(tokens) // block_size)):
        digest = hashlib.sha256(parent)
        digest.update(array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes())
        parent = digest.digest()
        keys.append(parent)
    return keys[:blocks]


def lookup_blocks(seq: Sequence, block_size: int, prompts: bool) -> int:
    """How many leading blocks of a new request's chain it may take from the cache: full blocks before its
    last prompt position (whose logits it needs); with `prompts` off (or a prompt it scores) only the whole
    blocks of a prefix-tuning adapter's key/value prefix."""
    kv_prefix = seq.resolved is not None and seq.resolved.adapter.handler.kv_prefix
    if not prompts or seq.scores_prompt:
        return seq.virtual_tokens // block_size if kv_prefix else 0
    return (seq.virtual_tokens + len(seq.request.prompt_ids) - 1) // block_size


def register_blocks(
    cache: PagedKVCache, seq: Sequence, row: int, prompts: bool, with_output: bool = False
) -> None:
    """Key `seq`'s full blocks whose positions are computed (its length), so later requests take them;
    with prefix caching (`prompts`) off only a prefix-tuning prefix's whole blocks."""
    block_size = cache.block_size
    if prompts:
        tokens = chain_tokens(seq, with_output)
        blocks = min(seq.length, len(tokens)) // block_size
    else:
        tokens = chain_tokens(seq)
        blocks = min(lookup_blocks(seq, block_size, prompts=False), seq.length // block_size)
    if blocks:
        cache.register(row, extend_keys(seq, tokens, blocks, block_size))
