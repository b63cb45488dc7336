"""A request checked against the engine's limits before it is queued (EngineCore.new_sequence).

These are the engine's own bounds, which hold for every caller (the server, OfflineEngine, training's
evaluation): what it can run at all (the vocabulary, MAX_LOGPROBS alternatives, its rows, its KV cache
and max_seq_len). A server's narrower per-request policy (LimitSettings: max_logprobs, max_n,
max_new_tokens, ...) is checked once, before this, by server/api/validation.py; every such limit's
ceiling is one of these bounds (LimitSettings.max_logprobs <= MAX_LOGPROBS). Every refusal is an InvalidArgumentError (HTTP 400, gRPC INVALID_ARGUMENT) that names the field and the
limit it broke, so a client can fix the request without reading the server's settings.
`check_request` looks at the request alone; `check_fits` at the wrapped sequence (its prompt after a
prompt-kind adapter's rewrite, its virtual tokens) against the KV cache and `max_seq_len`.
"""

from __future__ import annotations

from adapterserve.server.engine.kv_cache import KVCache
from adapterserve.server.engine.paged_kv_cache import PagedKVCache
from adapterserve.server.engine.sequence import Sequence
from adapterserve.server.engine.types import GenerationRequest
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.settings import MAX_LOGPROBS, EngineSettings


def check_request(request: GenerationRequest, vocab: int, settings: EngineSettings) -> None:
    """The prompt's token ids, the sampling parameters, logprobs and n."""
    if not request.prompt_ids:
        raise InvalidArgumentError("prompt: the prompt is empty")
    if any(t < 0 or t >= vocab for t in request.prompt_ids):
        raise InvalidArgumentError(f"prompt_ids: token ids must be in [0, {vocab})")
    p = request.sampling
    if p.max_new_tokens < 1:
        raise InvalidArgumentError("max_new_tokens: must be at least 1")
    if p.temperature < 0 or p.top_k < 0 or not (0 < p.top_p <= 1) or p.repetition_penalty <= 0:
        raise InvalidArgumentError(
            "sampling: temperature >= 0, top_k >= 0, 0 < top_p <= 1, repetition_penalty > 0"
        )
    if p.min_tokens < 0 or p.min_tokens > p.max_new_tokens:
        raise InvalidArgumentError(
            f"min_tokens: {p.min_tokens} must be in 0..max_new_tokens ({p.max_new_tokens})"
        )
    vocab_k = min(vocab, MAX_LOGPROBS)
    for name, k in (("logprobs", p.logprobs), ("prompt_logprobs", request.prompt_logprobs)):
        if k is not None and not 0 <= k <= vocab_k:
            raise InvalidArgumentError(f"{name}: {k} alternatives, must be in 0..{vocab_k}")
    if request.n < 1 or request.n > settings.max_batch_size:
        raise InvalidArgumentError(
            f"n: {request.n} choices, must be in 1..{settings.max_batch_size} (the engine's rows)"
        )
    if request.n > 1 and request.score_tokens:
        raise InvalidArgumentError("n: a scoring request has one result (n must be 1)")


def check_fits(seq: Sequence, settings: EngineSettings, cache: KVCache | PagedKVCache) -> None:
    """The sequence's KV tokens (prompt, virtual tokens, new tokens; every choice of n) fit
    `max_seq_len` and the whole KV cache; a scoring request scores tokens after its first."""
    request, need = seq.request, seq.kv_tokens
    if request.score_tokens:
        if not 1 <= request.score_tokens < len(request.prompt_ids):
            raise InvalidArgumentError(
                f"score_tokens: {request.score_tokens} must be in 1..{len(request.prompt_ids) - 1} "
                "(the tokens scored follow at least one prompt token)"
            )
        if need > min(settings.max_seq_len, cache.capacity_tokens):
            raise InvalidArgumentError(
                f"prompt: {need} tokens to score exceed the engine's max_seq_len ({settings.max_seq_len})"
                f" or KV cache ({cache.capacity_tokens} tokens)"
            )
        return
    if need > settings.max_seq_len:
        raise InvalidArgumentError(
            f"max_new_tokens: prompt ({len(request.prompt_ids)} tokens"
            + (f" + {seq.virtual_tokens} virtual" if seq.virtual_tokens else "")
            + f") + max_new_tokens ({request.sampling.max_new_tokens}) exceeds the engine's max_seq_len "
            f"({settings.max_seq_len})"
        )
    if need > cache.capacity_tokens:
        raise InvalidArgumentError(
            f"max_new_tokens: prompt + max_new_tokens ({need} tokens) exceeds the engine's whole KV cache "
            f"({cache.capacity_tokens} tokens; raise kv_cache_bytes: serve --kv-cache-bytes)"
        )
    if request.n > 1 and not cache.can_ever_reserve([need] * request.n):
        raise InvalidArgumentError(
            f"n: {request.n} choices of {need} KV tokens each do not fit the engine's KV cache "
            "(raise kv_cache_bytes: serve --kv-cache-bytes; or ask for fewer choices or tokens)"
        )
