"""Structured output: a request's `StructuredOutput` (JSON object / JSON schema) as a grammar that masks
its row's logits, with llguidance (the grammar engine vLLM and SGLang ship).

- Compile: the schema becomes a llguidance grammar and a *template* `LLMatcher` once per distinct
  schema text (a bounded LRU, `GrammarCache`); a request gets a cheap `deep_copy` of the template
  (microseconds). A schema llguidance cannot compile is an InvalidArgumentError carrying llguidance's
  message, raised when the request is validated (`EngineCore.new_sequence`), before it is queued.
- Per row, a `RowGrammar`: its matcher advances with each accepted token; when the grammar is complete
  (the JSON value is closed) the row ends with finish_reason STOP (or EOS, when the model chose EOS
  where the grammar allowed it).
- Per step, only for the rows with a grammar: their token bitmasks ([n, ceil(V_tok/32)] int32, one bit
  per tokenizer token) are unpacked on the logits' device into one [n, V] additive mask (0 or -inf)
  and applied to the step's logits with ONE `index_add_` (in place) before sampling. Logit columns past
  the tokenizer's vocabulary (padding of the embedding matrix) are always blocked. A step without
  grammar rows does no mask work at all.
- Overlap: a row's mask for its next step is computed right after its token is accepted, on a worker
  thread (llguidance's `LLExecutor` over the rows of the step, GIL released), while the engine thread
  retires rows, prepares and runs the next forward; the next step waits for it only when it samples.
  A new row's first mask is started when the request is validated, so it overlaps the prefill.

The JSON is generated compact and predictable: ", " between items, ": " between keys and values, no
other whitespace (a small model under a grammar that allows free whitespace can emit newlines until
max_tokens).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from adapterserve.server.engine.types import MAX_SCHEMA_BYTES, StructuredKind, StructuredOutput
from adapterserve.server.errors import InvalidArgumentError

# Distinct compiled schemas kept (a template matcher each: the grammar and its lexer's state cache).
GRAMMAR_CACHE_SIZE = 64
MAX_ERROR_CHARS = 600
ANY_OBJECT = '{"type": "object"}'
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # the server extra installs it
        raise InvalidArgumentError(
            "response_format: structured output needs the llguidance package (pip install llguidance)"
        ) from exc
    return llguidance


class GrammarCache:
    """Compiles StructuredOutputs into template matchers, once per distinct schema text (bounded LRU).

    Thread-safe: requests are validated on the API's threads. The llguidance tokenizer (~0.3 s to build
    from a 49k-token vocabulary) is built on first use.
    """

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], size: int = GRAMMAR_CACHE_SIZE):
        self._hf_tokenizer = tokenizer
        self._eos_ids = sorted(eos_ids)
        self._size = size
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self.compiled = 0  # grammars compiled (cache misses), for tests and stats

    @property
    def tokenizer(self) -> Any:
        """The llguidance tokenizer (LLTokenizer) of the served model."""
        with self._lock:
            if self._tokenizer is None:
                _llguidance()  # a clear error when it is missing
                from llguidance.hf import from_tokenizer

                self._tokenizer = from_tokenizer(self._hf_tokenizer, eos_token=self._eos_ids or None)
            return self._tokenizer

    @property
    def words(self) -> int:
        """int32 words of one row's bitmask: ceil(tokenizer vocabulary / 32)."""
        return (self.tokenizer.vocab_size + 31) // 32

    def template(self, structured: StructuredOutput) -> Any:
        """The compiled template matcher of `structured` (never consumed; copy it per request)."""
        key = f"{structured.kind}\0{structured.schema}"
        with self._lock:
            found = self._templates.get(key)
            if found is not None:
                self._templates.move_to_end(key)
                return found
        matcher = self._compile(structured)
        with self._lock:
            self._templates[key] = matcher
            self._templates.move_to_end(key)
            while len(self._templates) > self._size:
                self._templates.popitem(last=False)
            self.compiled += 1
        return matcher

    def _compile(self, structured: StructuredOutput) -> Any:
        llg = _llguidance()
        if structured.kind == StructuredKind.JSON_OBJECT:
            schema = ANY_OBJECT
        elif structured.kind == StructuredKind.JSON_SCHEMA:
            schema = structured.schema
            if len(schema.encode()) > MAX_SCHEMA_BYTES:
                raise InvalidArgumentError(
                    f"response_format.json_schema: the schema is over {MAX_SCHEMA_BYTES} bytes of JSON"
                )
            try:
                if not isinstance(json.loads(schema), dict | bool):
                    raise ValueError("a JSON schema is an object (or true/false)")
            except ValueError as exc:
                raise InvalidArgumentError(f"response_format.json_schema: not a JSON schema: {exc}") from None
        else:
            raise InvalidArgumentError(f"response_format: unknown type {structured.kind!r}")
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidArgumentError(f"response_format.json_schema: {_short(str(exc))}") from None
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)  # never raises: check is_error
        if matcher.is_error():
            raise InvalidArgumentError(
                f"response_format.json_schema: the schema cannot be compiled: {_short(matcher.get_error())}"
            )
        return matcher


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


class RowGrammar:
    """One request's matcher and the bitmask of the tokens it allows next ([W] int32, on the host)."""

    __slots__ = ("matcher", "mask", "pending", "done")

    def __init__(self, matcher: Any):
        self.matcher = matcher
        self.mask: torch.Tensor | None = None  # [W] int32: a row of a step's bitmask buffer
        self.pending: Future | None = None  # the worker computing `mask`
        self.done = False  # the grammar is complete (nothing but EOS may follow)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def consume(self, token: int, eos_ids: frozenset[int]) -> str | None:
        """Advance past an accepted token. Returns None, or the error when the grammar refused it (not
        expected: the mask allowed it)."""
        self.wait()
        if token in eos_ids:  # EOS is only allowed where the value is complete
            self.done = True
            return None
        if not self.matcher.consume_token(token):
            return f"response_format: the grammar refused token {token}: {_short(self.matcher.get_error())}"
        self.done = self.matcher.is_stopped()
        return None


class GrammarMasks:
    """The engine's structured-output side: compiles requests' grammars, computes their rows' masks on
    a worker thread, applies them to a step's logits."""

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], cache_size: int = GRAMMAR_CACHE_SIZE):
        self.cache = GrammarCache(tokenizer, eos_ids, cache_size)
        self.eos_ids = eos_ids
        self._executor: Any = None  # llguidance.LLExecutor: the rows' masks in parallel (its own threads)
        self._worker: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._shifts: dict[torch.device, torch.Tensor] = {}
        # seconds spent (bench and docs/performance.md): masks computed on the worker; the engine thread
        # waiting for them, applying them (waits included), starting the next ones; steps with grammar rows
        self.compute_s = self.wait_s = self.apply_s = self.prefetch_s = 0.0
        self.steps = 0

    def row(self, structured: StructuredOutput) -> RowGrammar:
        """A new request's grammar (compiling its schema unless cached); its first mask is started."""
        grammar = RowGrammar(self.cache.template(structured).deep_copy())
        self.prefetch([grammar])
        return grammar

    def _start(self) -> tuple[Any, ThreadPoolExecutor]:
        with self._lock:
            if self._worker is None:
                self._executor = _llguidance().LLExecutor()
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="adapterserve-grammar")
            return self._executor, self._worker

    def prefetch(self, grammars: Sequence[RowGrammar]) -> None:
        """Start computing the next masks of these rows (not done ones) on the worker thread."""
        rows = [g for g in grammars if not g.done]
        if not rows:
            return
        start = time.perf_counter()
        executor, worker = self._start()
        words = self.cache.words
        buffer = torch.empty((len(rows), words), dtype=torch.int32)  # [n, W], host
        pairs = [(g.matcher, i) for i, g in enumerate(rows)]

        def compute() -> None:
            start = time.perf_counter()
            executor.unsafe_compute_mask_ptr(pairs, buffer.data_ptr(), words * 4, len(rows))
            self.compute_s += time.perf_counter() - start

        future = worker.submit(compute)
        for i, g in enumerate(rows):
            g.mask = buffer[i]
            g.pending = future
        self.prefetch_s += time.perf_counter() - start

    def apply(self, logits: torch.Tensor, grammars: Sequence[RowGrammar | None]) -> torch.Tensor:
        """logits [B, V] -> the same tensor, every token a row's grammar refuses set to -inf (rows without a
        grammar untouched), in place: one additive mask (0 or -inf) added to the grammar rows in one
        `index_add_` (CPU: `masked_fill` over [B, V] is not vectorized there and costs ~4x more)."""
        start = time.perf_counter()
        vocab = logits.shape[1]
        rows = [i for i, g in enumerate(grammars) if g is not None]
        masks = []
        for i in rows:
            g = grammars[i]
            assert g is not None and g.mask is not None
            g.wait()
            masks.append(g.mask)
        self.wait_s += time.perf_counter() - start
        device = logits.device
        bits = torch.stack(masks).to(device)  # [n, W] int32, token t = bit t % 32 of word t // 32
        shifts = self._shifts.get(device)
        if shifts is None:
            shifts = self._shifts[device] = torch.arange(8, dtype=torch.uint8, device=device)
        # little-endian bytes of the words: token t = bit t % 8 of byte t // 8
        allowed = ((bits.view(torch.uint8)[:, :, None] >> shifts) & 1).view(len(rows), -1)  # [n, 32W] 0/1
        width = allowed.shape[1]
        if width >= vocab:
            allowed = allowed[:, :vocab]
        else:  # logit columns past the tokenizer's vocabulary: never allowed
            allowed = torch.nn.functional.pad(allowed, (0, vocab - width))
        # 0 where allowed, -inf where refused: (a - 1) * max * 2 overflows to -inf, and 0 * x = 0 (no NaN)
        bias = allowed.to(logits.dtype).sub_(1).mul_(torch.finfo(logits.dtype).max).mul_(2)  # [n, V]
        with torch.inference_mode():  # the forward's logits are inference tensors
            if len(rows) == logits.shape[0]:
                logits.add_(bias)
            else:
                logits.index_add_(0, torch.tensor(rows, device=device), bias)
        self.steps += 1
        self.apply_s += time.perf_counter() - start
        return logits

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.shutdown(wait=True)
                self._worker = None
