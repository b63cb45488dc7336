"""Splitting a prefill chunk into groups of similar lengths, so right-padding wastes little work.

A prefill forward pads every row to the chunk's longest row: rows of 39 tokens beside prompt-tuning rows
of 39 + 16 virtual tokens all run [B, 55], +41% work for the plain rows. Running the chunk as several
forwards over contiguous row groups pays each group's padding only, plus a fixed cost per forward
(kernel launches, Python, weights read once more). `plan_groups` picks the split with the least total of
both, exactly (dynamic programming over the contiguous splits; n <= max_batch_size rows, O(n^2)).

On a CPU with oneDNN-packed linears a forward of n padded positions computes `padded_rows(n)` of them
(up to 1/8 more: 4 rows of 136 = 544 -> 576), so the split is costed in those.

The engine gives the requests admitted in one step their rows sorted by prefill length, shortest first,
so rows of similar lengths sit next to each other and contiguous groups can separate them
(`prefill_length`). That order holds within one admission only: rows admitted later come after them, so
a long prompt is passed by at most the shorter ones admitted with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from adapterserve.server.adapters.kind import HookSite
from adapterserve.server.engine.sequence import Sequence

# The fixed cost of one more prefill forward, in padded token positions: on a CPU a forward's fixed
# cost (Python and op dispatch, ~5 ms for the embedded model) is the time of a few tokens' matmuls; on a
# GPU, launches cost far more against its token rate.
FORWARD_COST_TOKENS = {"cpu": 32, "cuda": 2048}
DEFAULT_FORWARD_COST_TOKENS = 2048


def forward_cost_tokens(device: torch.device, setting: int | None) -> int:
    """EngineSettings.prefill_group_cost, or the device's default when it is unset."""
    return FORWARD_COST_TOKENS.get(device.type, DEFAULT_FORWARD_COST_TOKENS) if setting is None else setting


def plan_groups(
    lengths: list[int], forward_cost: int, positions: Callable[[int], int] | None = None
) -> list[tuple[int, int]]:
    """Contiguous [start, end) groups covering rows 0..n-1 (in order) that minimise
    sum(positions(group rows x group's longest row)) + forward_cost x groups (of equal costs, the fewest
    groups). `positions`: the token positions a forward of that many padded positions really computes
    (oneDNN-packed CPU linears round them up to a bucket, cpu_linear.padded_rows); default as many."""
    computed = positions or (lambda tokens: tokens)
    n = len(lengths)
    if n <= 1:
        return [(0, n)] if n else []
    # best[j]: (least cost, fewest groups) of rows 0..j-1; ties go to fewer forwards
    best: list[tuple[float, int]] = [(0, 0)] + [(float("inf"), 0)] * n
    cut = [0] * (n + 1)  # cut[j]: start of the last group in that best split
    for j in range(1, n + 1):
        longest = 0
        for i in range(j - 1, -1, -1):  # the last group is rows i..j-1
            longest = max(longest, lengths[i])
            candidate = (best[i][0] + computed((j - i) * longest) + forward_cost, best[i][1] + 1)
            if candidate < best[j]:
                best[j], cut[j] = candidate, i
    groups = []
    j = n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]


def prefill_length(seq: Sequence) -> int:
    """The inputs a new request's prefill will run: its prompt, after the virtual tokens of a prompt-side
    adapter (prompt tuning, P-tuning; prefix tuning's live in the cache, not in the prefill)."""
    virtual = seq.virtual_tokens if seq.hook == HookSite.PROMPT else 0
    return virtual + len(seq.request.prompt_ids)
