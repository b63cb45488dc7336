"""Prefill chunks split into groups of similar lengths: the split is the cheapest one, and rows are
given in order of prefill length."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from adapterserve.server.cpu.linear import prefill_positions
from adapterserve.server.engine.prefill_groups import forward_cost_tokens, plan_groups


def _cost(lengths: list[int], groups: list[tuple[int, int]], forward_cost: int) -> int:
    return sum((b - a) * max(lengths[a:b]) + forward_cost for a, b in groups)


def _all_splits(n: int):
    for cuts in itertools.product([False, True], repeat=n - 1):
        starts = [0] + [i + 1 for i, cut in enumerate(cuts) if cut]
        yield list(zip(starts, [*starts[1:], n], strict=True))


def test_prompt_tuning_rows_get_their_own_forward():
    """56 plain chat prompts of 39 tokens and 8 prompt-tuning rows of 39 + 16 virtual tokens: one forward
    pads everything to 55 (3,520 positions); two forwards run 56 x 39 + 8 x 55 = 2,624."""
    lengths = [39] * 56 + [55] * 8
    assert plan_groups(lengths, 32) == [(0, 56), (56, 64)]
    assert plan_groups(lengths, 10_000) == [(0, 64)]  # a forward costing more than the padding: one


def test_equal_lengths_stay_one_forward_and_edges():
    assert plan_groups([12] * 64, 0) == [(0, 64)]
    assert plan_groups([], 32) == []
    assert plan_groups([7], 32) == [(0, 1)]
    assert plan_groups([3, 5, 5, 9], 0) == [(0, 1), (1, 3), (3, 4)]  # cost 0: a group per distinct length


@pytest.mark.parametrize("seed", range(20))
def test_the_plan_is_the_cheapest_contiguous_split(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    lengths = [rng.randint(1, 60) for _ in range(n)]
    cost = rng.choice([0, 8, 32, 200])
    groups = plan_groups(lengths, cost)
    assert groups[0][0] == 0 and groups[-1][1] == n
    assert all(a < b and b == c for (a, b), (c, _) in itertools.pairwise(groups))  # contiguous, in order
    assert _cost(lengths, groups, cost) == min(_cost(lengths, s, cost) for s in _all_splits(n))


def test_on_packed_cpu_linears_the_split_counts_the_positions_they_really_compute():
    """Three 128-token prompts and a prompt-tuning row of 128 + 8: one forward pads to 4 x 136 = 544
    positions, which the packed linears round up to 576; 3 x 128 and 136 (-> 144) in two forwards
    compute 528 for one forward more. Counted as padded positions only, one forward looked cheaper."""
    lengths = [128, 128, 128, 136]
    assert plan_groups(lengths, 32) == [(0, 4)]
    assert plan_groups(lengths, 32, prefill_positions) == [(0, 3), (3, 4)]
    assert plan_groups([128] * 4, 32, prefill_positions) == [(0, 4)]  # 512: a bucket already


@pytest.mark.parametrize("seed", range(10))
def test_with_bucketed_positions_the_plan_is_still_the_cheapest_split(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    lengths = [rng.randint(1, 200) for _ in range(n)]
    groups = plan_groups(lengths, 32, prefill_positions)

    def cost(split):
        return sum(prefill_positions((b - a) * max(lengths[a:b])) + 32 for a, b in split)

    assert cost(groups) == min(cost(s) for s in _all_splits(n))


def test_default_forward_cost_by_device_and_the_setting_wins():
    assert forward_cost_tokens(torch.device("cpu"), None) < forward_cost_tokens(torch.device("cuda"), None)
    assert forward_cost_tokens(torch.device("cpu"), 0) == 0


def test_new_rows_are_given_in_prefill_length_order(tiny_model_dir):
    """Admitted together, shorter prompts get the earlier rows (so similar lengths sit together)."""
    from adapterserve.server.engine.offline import OfflineEngine
    from adapterserve.server.model.loading import load_base_model
    from adapterserve.server.settings import EngineSettings

    engine = OfflineEngine(
        load_base_model(tiny_model_dir, quantize="none", device="cpu"),
        EngineSettings(max_batch_size=4, max_seq_len=64, adapter_slots=1, prefill_group_cost=0),
    )
    prompts = [[5] * 20, [6] * 3, [7] * 11, [8] * 3]
    results = engine.generate([engine.request(p, max_new_tokens=2, ignore_eos=True) for p in prompts])
    assert [r.prompt_tokens for r in results] == [20, 3, 11, 3]  # results still in submission order
    alone = [engine.generate([engine.request(p, max_new_tokens=2, ignore_eos=True)])[0] for p in prompts]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]  # grouping changes no output
