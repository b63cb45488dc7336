"""The static decode step's logic on CPU: buckets, padded buffers, graph invalidation when adapter slot
tensors move, and the settings that choose it. (Capture itself is tested on CUDA in
test_decode_graphs_cuda.py; the invariant against PEFT in test_mixed_batch.py covers static and compiled.)"""

from __future__ import annotations

import pytest
import torch

from adapterserve.server.engine.decode_graphs import StepShape, length_bucket, row_buckets
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.errors import InvalidArgumentError
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import make_adapter


def test_row_buckets_cover_every_batch_size_with_little_padding():
    assert row_buckets(1) == [1]
    assert row_buckets(6) == [1, 2, 4, 6]
    assert row_buckets(64) == [1, 2, 4, *range(8, 65, 8)]
    assert row_buckets(70) == [1, 2, 4, *range(8, 70, 8), 70]
    for max_rows in (1, 5, 64, 70):
        buckets = row_buckets(max_rows)
        for n in range(1, max_rows + 1):
            b = min(x for x in buckets if x >= n)
            assert b - n < max(8, n)  # at most 7 padding rows once past 8


def test_length_bucket_is_a_power_of_two_of_at_least_one_block_within_the_row():
    assert length_bucket(1, 16, 1024) == 16
    assert length_bucket(16, 16, 1024) == 16
    assert length_bucket(17, 16, 1024) == 32
    assert length_bucket(100, 16, 1024) == 128
    assert length_bucket(1000, 16, 1024) == 1024
    assert length_bucket(1000, 16, 1008) == 1008  # capped at the cache's row length


@pytest.fixture
def static_engine(tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    return OfflineEngine(
        base, EngineSettings(max_batch_size=8, max_seq_len=64, adapter_slots=2, decode_step="static")
    )


def test_a_step_pads_rows_and_keys_and_points_padding_at_the_scratch_block(static_engine):
    engine = static_engine
    graphs = engine.core.decode_graphs
    seen: list[tuple[StepShape, torch.Tensor, torch.Tensor]] = []
    run = graphs._run

    def spy(shape):
        seen.append((shape, graphs.meta[:, : shape.rows].clone(), graphs.table[: shape.rows].clone()))
        return run(shape)

    graphs._run = spy
    requests = [engine.request([5, 6, 7], max_new_tokens=3, ignore_eos=True) for _ in range(3)]
    engine.generate(requests)
    shape, meta, table = seen[0]
    assert shape.rows == 4 and shape.length == 16 and shape.kinds == frozenset()
    assert meta[1, :3].tolist() == [3, 3, 3]  # positions of the first decoded token
    assert meta[:, 3].tolist() == [0, 0, 0]  # the padding row: token 0, position 0, no adapter
    assert (table[3] == 0).all()  # ... in the scratch block
    assert (table[:3, 0] > 0).all()  # real rows own their first block
    assert graphs.stats.static_steps == 2


def test_graphs_are_dropped_when_adapter_slot_tensors_move(static_engine, tiny_model_dir, tmp_path):
    engine = static_engine
    graphs = engine.core.decode_graphs
    graphs.graphs[StepShape(1, 16, frozenset())] = (None, torch.zeros(1))  # stands in for a captured graph
    engine.add_adapter("r4", make_adapter(tiny_model_dir, "lora_qv_r4", tmp_path / "r4", seed=1))
    engine.generate([engine.request([5, 6], adapter="r4", max_new_tokens=2, ignore_eos=True)])
    assert graphs.graphs == {} and graphs.stats.invalidations == 1  # LoRA slot tensors were allocated
    graphs.graphs[StepShape(1, 16, frozenset({"lora"}))] = (None, torch.zeros(1))
    engine.generate([engine.request([5, 6], adapter="r4", max_new_tokens=2, ignore_eos=True)])
    assert len(graphs.graphs) == 1  # the adapter was resident: nothing moved, the graph stays


@pytest.mark.parametrize(
    "settings,error",
    [
        ({"decode_step": "graphs"}, "needs a CUDA device"),
        ({"decode_step": "static", "kv_cache": "dense"}, "needs kv_cache='paged'"),
        ({"compile_decode": True}, "compile_decode needs decode_step='static'"),
    ],
)
def test_impossible_decode_settings_are_refused_at_start(tiny_base, settings, error):
    with pytest.raises(InvalidArgumentError, match=error):
        OfflineEngine(tiny_base, EngineSettings(max_batch_size=2, max_seq_len=32, **settings))


def test_auto_is_eager_on_cpu(tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    assert OfflineEngine(base, EngineSettings(max_batch_size=2, max_seq_len=32)).core.decode_graphs is None


def test_stats_say_which_decode_step_ran_and_when_compilation_fell_back(tiny_model_dir, monkeypatch):
    """What an operator reads (EngineStats, then the metrics): the static step counted, and a compiler
    failure turns compilation off with the reason kept, the engine still answering."""
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")

    def broken_compile(fn, **_):
        def run(*args):
            raise RuntimeError("the compiler broke")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=4, max_seq_len=32, adapter_slots=1, decode_step="static", compile_decode=True
        ),
    )
    assert engine.core.stats().decode_fallback is None
    [result] = engine.generate([engine.request([5, 6, 7], max_new_tokens=4, ignore_eos=True)])
    assert len(result.token_ids) == 4
    stats = engine.core.stats()
    assert stats.decode_step == "static, compiled"
    assert stats.decode_static_steps == 3 and stats.decode_graph_replays == 0
    assert "the compiler broke" in stats.decode_fallback


def test_eager_engine_stats_report_no_static_steps(tiny_model_dir):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(base, EngineSettings(max_batch_size=2, max_seq_len=32, adapter_slots=1))
    engine.generate([engine.request([5, 6], max_new_tokens=3, ignore_eos=True)])
    stats = engine.core.stats()
    assert (stats.decode_step, stats.decode_static_steps, stats.decode_fallback) == ("eager", 0, None)


class _ReplayStep:
    """A stand-in for a captured graph on the CPU: replay reruns the static step into the shared logits
    buffer, as the real graph's copy does."""

    def __init__(self, graphs, shape):
        self.graphs, self.shape = graphs, shape
        self.replay()

    def replay(self):
        logits = self.graphs._run(self.shape)
        self.graphs._output(logits)[: self.shape.rows].copy_(logits)


def test_graphs_share_one_logits_buffer_and_the_least_recently_used_is_dropped(tiny_model_dir):
    """The graph bookkeeping (capture on first use, LRU beyond max_decode_graphs, one output buffer for
    all graphs) on the CPU, with a stand-in for the CUDA capture; tokens equal the eager engine's."""
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    settings = dict(max_batch_size=8, max_seq_len=64, adapter_slots=1)
    eager = OfflineEngine(base, EngineSettings(**settings))
    prompts = [[5, 6, 7], [40, 41], [100, 17, 250, 3], [60, 61, 62, 63, 64], [9, 8], [7, 7, 7]]
    new_tokens = [30, 10, 20, 5, 40, 15]  # rows leave at different steps: row buckets 8, 4, 2, 1

    def requests(engine):
        return [
            engine.request(p, max_new_tokens=n, ignore_eos=True)
            for p, n in zip(prompts, new_tokens, strict=True)
        ]

    want = [r.token_ids for r in eager.generate(requests(eager))]

    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(base, EngineSettings(**settings, decode_step="static", max_decode_graphs=3))
    graphs = engine.core.decode_graphs
    graphs.capture = True  # the bookkeeping of decode_step="graphs", with the stand-in below
    graphs._record = lambda shape: _ReplayStep(graphs, shape)
    outputs = []
    got = [r.token_ids for r in engine.generate(requests(engine))]
    assert got == want
    # rows leaving and keys crossing the 16/32/64 length buckets: more shapes than are kept
    assert graphs.stats.captures > 3 and graphs.stats.evictions == graphs.stats.captures - len(graphs.graphs)
    assert len(graphs.graphs) == 3 and graphs.stats.replays > 0 and graphs.stats.disabled is None
    for _, logits in graphs.graphs.values():  # every graph's output is a view of the one buffer
        outputs.append(logits.data_ptr())
    assert set(outputs) == {graphs.logits_out.data_ptr()}
