"""Batched sampling: repetition penalty, temperature, top-k, top-p, seeded draws, greedy at T=0.

One call of `sample_rows` handles a whole step with one set of tensor ops and one device->host transfer
(the `.tolist()` of the chosen tokens):
- Greedy rows (temperature 0, no repetition penalty) take the argmax; an all-greedy step is one argmax.
- The other rows are gathered into one [n, V] float32 block. Their settings become [n] tensors
  (temperature, top-k, top-p, penalty), copied to the device without waiting for it.
- Repetition penalty: as transformers' RepetitionPenaltyLogitsProcessor (positive logits divided,
  negative multiplied) on the tokens seen in prompt + output. Each such row keeps a [V] bool mask on
  the logits' device. The step stacks the rows' masks (one copy), uses them, marks the chosen tokens
  in the stack with one scatter, and points each row's mask at its row of the stack (a view; the stack
  lives while a row still points into it, and every decoding row moves to the new stack each step): no
  Python set, nothing rebuilt per step. A row's mask is built from its prompt at its first step.
- Top-k and top-p are found with one sort over the rows: `topk` of the largest k of the step when
  every top-p row also has a top-k, else a full sort. Both filters are defined by values, not by
  positions, so ties never depend on sort order or on the other rows: top-k keeps every token at least
  as large as the k-th largest logit (all ties kept, as before); top-p keeps a token when the mass of
  the tokens strictly larger than it is <= top_p (the first token is always kept; ties kept together).
- The draw is the exponential race: token = argmax(p / q) over the kept tokens, with q ~ Exp(1) i.i.d.
  per token, picks token t with probability p_t (p needs no normalizing). q = -log(u), u uniform, is
  drawn over the whole vocabulary and indexed by token id. A row with a `seed` draws its u from its own
  torch.Generator (V numbers per step), so its tokens depend only on its seed and its own logits,
  whatever else is in the batch and wherever the row sits in it (bit for bit on the CPU; on a GPU the
  batched forward pass can already change the logits' last bits). Rows without a seed share one draw
  per step from one generator per device.
  The token stream of a given seed differs from the older per-row `torch.multinomial` sampler.
- OpenAI's presence/frequency penalties, logit_bias and min_tokens, and per-row logprobs: see
  logits_processing.py (after the repetition penalty; the logprobs ride on the same host transfer).
"""

from __future__ import annotations

import torch

from adapterserve.server.engine import logits_processing as lp
from adapterserve.server.engine.row_sampler import RowSampler
from adapterserve.server.engine.types import TokenLogprob

_SHARED_GENERATORS: dict[torch.device, torch.Generator] = {}


def _shared_generator(device: torch.device) -> torch.Generator:
    """The generator of the rows without a seed (one per device, seeded from the OS)."""
    g = _SHARED_GENERATORS.get(device)
    if g is None:
        g = torch.Generator(device=device)
        g.seed()
        _SHARED_GENERATORS[device] = g
    return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits [n, V], seen [n, V] bool, penalty [n]. As transformers' RepetitionPenaltyLogitsProcessor:
    seen tokens' positive logits are divided by the penalty, negative ones multiplied."""
    pen = penalty.to(logits.dtype)[:, None]
    inv = 1.0 / pen
    # factor: 1 where unseen, pen where seen and negative, 1/pen where seen and >= 0 (arithmetic, no
    # torch.where over [n, V]: where is not vectorized on the CPU)
    factor = (logits < 0).to(logits.dtype).mul_(pen - inv).add_(inv - 1.0).mul_(seen).add_(1.0)
    return logits * factor


def filter_thresholds(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor | None:
    """scaled: [n, V] logits / T. Returns [n, 1] thresholds (keep the tokens >= the threshold), None if
    no row filters. top_k[i] in 1..V-1 or 0 (off), top_p[i] in (0, 1] (1 = off). One sort for all
    rows: a full sort when a top-p row has no top-k, else the top max(top_k) values."""
    if not any(top_k) and all(p >= 1.0 for p in top_p):
        return None
    device = scaled.device
    if any(p < 1.0 and k == 0 for k, p in zip(top_k, top_p, strict=True)):
        vals = torch.sort(scaled, dim=-1, descending=True).values  # [n, V]
    else:
        vals = torch.topk(scaled, max(top_k), dim=-1).values  # [n, K], sorted
    k = _upload(top_k, torch.long, device)[:, None]
    thr = torch.where(k > 0, vals.gather(1, (k - 1).clamp(min=0)), float("-inf"))  # [n, 1]: k-th value
    if all(p >= 1.0 for p in top_p):
        return thr
    p = _upload(top_p, scaled.dtype, device)[:, None]
    kept = vals >= thr  # a prefix of each row
    e_sorted = torch.exp(vals - vals[:, :1]).mul_(kept)
    # the normalizer over every top-k token; with a topk window, tokens tied with the k-th value can lie
    # past the window: they are counted in
    total = e_sorted.sum(dim=-1, keepdim=True)
    if vals.shape[-1] < scaled.shape[-1]:
        tail = (scaled >= thr).sum(dim=-1, keepdim=True, dtype=torch.int32) - kept.sum(dim=-1, keepdim=True)
        total = total + tail * torch.exp(thr - vals[:, :1]).nan_to_num_(0.0)
    cum = torch.cumsum(e_sorted, dim=-1)
    before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1) / total  # mass before each
    # the nucleus is a prefix too (`before` never decreases): its last value is the threshold
    count = (kept & (before <= p)).sum(dim=-1, keepdim=True)  # >= 1: the first token always stays
    nucleus = vals.gather(1, count - 1)
    return torch.maximum(thr, torch.where(p < 1.0, nucleus, float("-inf")))


def _sample_block(x: torch.Tensor, samplers: list[RowSampler], n_shared: int) -> torch.Tensor:
    """x: [n, V] float32 logits of the non-greedy rows in this order: sampled rows without a seed
    (n_shared of them), sampled rows with a seed, then rows at temperature 0 with a penalty.
    Returns the chosen tokens [n] (long, on x's device). Updates the penalty rows' seen masks."""
    n, vocab = x.shape
    device = x.device
    params = [s.params for s in samplers]
    n_hot = sum(p.temperature > 0 for p in params)
    if any(s.penalized for s in samplers):
        seen = _stack_seen(samplers, vocab, device)
        penalty = _upload([p.repetition_penalty for p in params], torch.float32, device)
        x = apply_repetition_penalty(x, seen, penalty)
    else:
        seen = None
    x, counts = lp.apply_processors(x, samplers)
    # the rows at temperature 0 (after their penalty)
    chosen = x[n_hot:].argmax(dim=-1) if n_hot < n else None
    if n_hot:
        hot = params[:n_hot]
        scaled = x[:n_hot] / _upload([p.temperature for p in hot], torch.float32, device)[:, None]
        e = torch.exp(scaled - scaled.amax(dim=-1, keepdim=True))  # softmax up to a row factor
        top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in hot]
        thr = filter_thresholds(scaled, top_k, [p.top_p for p in hot])
        if thr is not None:
            e.mul_(scaled >= thr)
        # q ~ Exp(1) per token as -log(u), u uniform (torch's exponential_ is ~5x slower on the CPU);
        # u >= tiny keeps q finite, so the row's largest kept token always scores > 0
        u = torch.empty_like(scaled)
        if n_shared:
            u[:n_shared].uniform_(generator=_shared_generator(device))
        for i in range(n_shared, n_hot):
            u[i].uniform_(generator=samplers[i].generator)
        q = u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_()
        drawn = e.div_(q).argmax(dim=-1)  # the exponential race: P(token) = its kept softmax mass
        chosen = drawn if chosen is None else torch.cat([drawn, chosen])
    lp.count_chosen(counts, chosen, samplers)
    if seen is not None:
        seen.scatter_(1, chosen[:, None], True)
        for i, s in enumerate(samplers):
            if s.penalized:
                s.seen = seen[i]
    return chosen


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, without waiting for the device (non_blocking copy)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _stack_seen(samplers: list[RowSampler], vocab: int, device: torch.device) -> torch.Tensor:
    """[n, V] bool: each penalty row's seen mask (rows at their first step: their prompt ids)."""
    blank = torch.zeros(vocab, dtype=torch.bool, device=device)
    seen = torch.stack([s.seen if s.penalized and s.seen is not None else blank for s in samplers])
    rows: list[int] = []
    ids: list[int] = []
    for i, s in enumerate(samplers):
        if s.penalized and s.seen is None:
            prompt = [t for t in s.prompt_ids if 0 <= t < vocab]
            rows += [i] * len(prompt)
            ids += prompt
    if ids:
        where = _upload([rows, ids], torch.long, device)
        seen[where[0], where[1]] = True
    return seen


def sample_rows(logits: torch.Tensor, samplers: list[RowSampler]) -> list[int]:
    """logits: [B, V] -> one next token per row. One device->host transfer (the chosen tokens)."""
    return sample_step(logits, samplers)[0]


def sample_step(
    logits: torch.Tensor, samplers: list[RowSampler]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [B, V] -> (one next token per row, its logprobs for the rows whose params ask for them,
    else None). One device->host transfer for both."""
    chosen, order = _choose(logits, samplers)  # [B] long on the device, rows in `order`
    want = [i for i, s in enumerate(samplers) if s.params.logprobs is not None]
    if not want:
        flat = chosen.tolist()
        extra: list = []
    else:
        if order is not None:  # chosen in row order for the logprob rows (a device-side permutation)
            inverse = torch.empty_like(chosen)
            inverse[_upload(order, torch.long, chosen.device)] = chosen
            chosen = inverse
            order = None
        ks = [samplers[i].params.logprobs or 0 for i in want]
        temperatures = [lp.logprob_temperature(samplers[i]) for i in want]
        packed, k = lp.step_logprobs(logits, chosen, want, ks, temperatures)
        host = torch.cat([chosen.double(), packed]).tolist()
        flat, extra = [int(t) for t in host[: len(samplers)]], host[len(samplers) :]
    if order is None:
        tokens = flat
    else:
        tokens = [0] * len(samplers)
        for i, token in zip(order, flat, strict=True):
            tokens[i] = token
    if not want:
        return tokens, [None] * len(samplers)
    return tokens, lp.unpack_logprobs(extra, tokens, want, ks, k)


def _choose(logits: torch.Tensor, samplers: list[RowSampler]) -> tuple[torch.Tensor, list[int] | None]:
    """The chosen tokens [B] (long, on the device) in the order of the returned row list (None: rows in
    order)."""
    if all(s.greedy for s in samplers):  # the common case: the argmax in place
        return logits.argmax(dim=-1), None
    fast, shared, own, cold = [], [], [], []
    for i, s in enumerate(samplers):
        if s.greedy:
            fast.append(i)
        elif s.params.temperature <= 0:
            cold.append(i)  # greedy after a repetition penalty
        else:
            (shared if s.generator is None else own).append(i)
    order = fast + shared + own + cold
    if order == list(range(len(samplers))):
        rows = logits
    else:
        rows = logits.index_select(0, _upload(order, torch.long, logits.device))
    block = [samplers[i] for i in order[len(fast) :]]
    chosen = _sample_block(rows[len(fast) :].float(), block, len(shared))
    if fast:
        chosen = torch.cat([rows[: len(fast)].argmax(dim=-1), chosen])
    return chosen, (None if order == list(range(len(samplers))) else order)
