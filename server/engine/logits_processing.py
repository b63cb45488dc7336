"""OpenAI's per-request logits processors and per-row logprobs, for a whole sampling step at once.

Processors (applied by sampling._sample_block to the rows that are not plain greedy rows, after the
repetition penalty and before temperature / top-k / top-p, in this order):
- presence / frequency penalty, as OpenAI documents them, over the tokens this row has GENERATED
  (not its prompt): logit[t] -= presence * (count[t] > 0) + frequency * count[t]. Each such row keeps a
  [V] float32 count on the logits' device; a step stacks the rows' counts (one copy), uses them, adds
  the chosen tokens with one scatter_add and points each row at its row of the stack (as the
  repetition penalty's seen masks do: nothing rebuilt per step, no host set).
- logit_bias: (token id, bias) pairs added to the logits (one index_put for every biased row).
- min_tokens: the end-of-sequence ids get -inf while the row has generated fewer than min_tokens
  tokens (one index_put).
Every op is out of place: the caller's logits stay the model's (the logprobs and captured logits use
them). Rows that use none of these pay nothing: a step without them runs none of this.

Logprobs (`step_logprobs`): the log-softmax of the RAW logits (the model's, adapters applied; before
penalties, bias, temperature and top-k/top-p, as vLLM reports them by default), the chosen token's
value and the k largest; a row with `logprobs_at_temperature` (and a temperature) gets those of its
logits divided by its temperature instead (an RL trainer's sampling logprobs). The values travel to the host in the same transfer as the chosen tokens, so a
step still synchronizes with the device once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from adapterserve.server.engine.types import TokenLogprob

if TYPE_CHECKING:
    from adapterserve.server.engine.row_sampler import RowSampler


def apply_processors(x: torch.Tensor, samplers: list[RowSampler]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [n, V] float32 logits of these rows -> (processed logits [n, V], the stacked counts [n, V] or
    None). Call `count_chosen` with the stack once the tokens are chosen."""
    if not any(s.processed for s in samplers):
        return x, None
    n, vocab = x.shape
    device = x.device
    counts = None
    if any(s.counts_penalized for s in samplers):
        blank = torch.zeros(vocab, dtype=torch.float32, device=device)
        counts = torch.stack([s.counts if s.counts is not None else blank for s in samplers])  # [n, V]
        presence = _upload([s.params.presence_penalty for s in samplers], torch.float32, device)[:, None]
        frequency = _upload([s.params.frequency_penalty for s in samplers], torch.float32, device)[:, None]
        x = x - presence * (counts > 0) - frequency * counts  # [n, V]
    rows: list[int] = []
    ids: list[int] = []
    bias: list[float] = []
    for i, s in enumerate(samplers):
        for token, value in s.params.logit_bias:
            if 0 <= token < vocab:
                rows.append(i)
                ids.append(token)
                bias.append(value)
    if rows:
        where = _upload([rows, ids], torch.long, device)
        x = x.index_put((where[0], where[1]), _upload(bias, x.dtype, device), accumulate=True)
    rows, ids = [], []
    for i, s in enumerate(samplers):
        if s.generated < s.params.min_tokens:
            eos = [t for t in s.eos_ids if 0 <= t < vocab]
            rows += [i] * len(eos)
            ids += eos
    if rows:
        where = _upload([rows, ids], torch.long, device)
        x = x.index_put((where[0], where[1]), torch.tensor(float("-inf"), dtype=x.dtype, device=device))
    return x, counts


def count_chosen(counts: torch.Tensor | None, chosen: torch.Tensor, samplers: list[RowSampler]) -> None:
    """After the draw: add each row's chosen token [n] to its count and point the rows at the stack."""
    for s in samplers:
        s.generated += 1
    if counts is None:
        return
    counts.scatter_add_(1, chosen[:, None], torch.ones_like(chosen[:, None], dtype=counts.dtype))
    for i, s in enumerate(samplers):
        if s.counts_penalized:
            s.counts = counts[i]


def logprob_temperature(sampler: RowSampler) -> float:
    """What a row's logits are divided by before its logprobs: its temperature with
    `logprobs_at_temperature` (and a temperature above 0), else 1 (the raw distribution)."""
    p = sampler.params
    return p.temperature if p.logprobs_at_temperature and p.temperature > 0 else 1.0


def step_logprobs(
    logits: torch.Tensor,
    chosen: torch.Tensor,
    rows: list[int],
    ks: list[int],
    temperatures: list[float],
) -> tuple[torch.Tensor, int]:
    """logits [B, V] (raw), chosen [B] long (row order), rows: the rows that want logprobs, ks: their
    top-k counts, temperatures: what each of those rows' logits are divided by (logprob_temperature).
    Returns (a flat float64 tensor to append to the step's one host transfer, K): per row [logprob of
    its chosen token], then [m, K] top values, then [m, K] top ids, K = max(ks)."""
    if len(rows) == logits.shape[0]:  # every row asks: no gather
        x = logits.float()  # [B, V]
        picked_ids = chosen
    else:
        index = _upload(rows, torch.long, logits.device)
        x = logits.index_select(0, index).float()  # [m, V]
        picked_ids = chosen.index_select(0, index)
    if any(t != 1.0 for t in temperatures):
        x = x / _upload(temperatures, torch.float32, logits.device)[:, None]
    lsm = torch.log_softmax(x, dim=-1)
    picked = lsm.gather(1, picked_ids[:, None])[:, 0]  # [m]
    k = max(ks)
    parts = [picked.double()]
    if k:
        top = torch.topk(lsm, k, dim=-1)  # values/indices [m, K]
        parts += [top.values.double().reshape(-1), top.indices.double().reshape(-1)]
    return torch.cat(parts), k


def unpack_logprobs(
    flat: list[float], tokens: list[int], rows: list[int], ks: list[int], k: int
) -> list[TokenLogprob | None]:
    """The host side of step_logprobs: one TokenLogprob per row (None for rows that did not ask)."""
    out: list[TokenLogprob | None] = [None] * len(tokens)
    m = len(rows)
    for j, (row, kj) in enumerate(zip(rows, ks, strict=True)):
        values = flat[m + j * k : m + j * k + kj]
        ids = flat[m + m * k + j * k : m + m * k + j * k + kj]
        top = tuple((int(t), v) for t, v in zip(ids, values, strict=True))
        out[row] = TokenLogprob(token_id=tokens[row], logprob=flat[j], top=top)
    return out


def prompt_token_logprobs(logits: torch.Tensor, ids: list[int], k: int) -> list[TokenLogprob]:
    """logits [n, V] at the positions before the tokens `ids` (n of them) -> each token's logprob and
    the top k (one host transfer)."""
    targets = torch.tensor(ids, dtype=torch.long, device=logits.device)
    lsm = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    picked = lsm.gather(1, targets[:, None])[:, 0]  # [n]
    parts = [picked.double()]
    if k:
        top = torch.topk(lsm, k, dim=-1)  # [n, k]
        parts += [top.values.double().reshape(-1), top.indices.double().reshape(-1)]
    flat = torch.cat(parts).tolist()
    n = len(ids)
    return unpack_logprobs(flat, ids, list(range(n)), [k] * n, k)  # type: ignore[return-value]


def _upload(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, without waiting for the device (non_blocking copy)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
