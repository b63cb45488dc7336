"""The static decode step never reads a device value on the host, for a batch of every adapter kind.

On a GPU such a read (`.item()`, `int(t)`, a mask that picks rows, `nonzero`) synchronises with the host
every step, and a CUDA graph cannot capture it: the warm-up then turns graphs off for good. The CUDA
tests catch that on a GPU; this test catches it on the CPU in CI, by recording every operator the step
dispatches and refusing the ones whose result the host would have to wait for.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adapterserve.server.adapters.kind import kind_names
from adapterserve.server.engine.offline import OfflineEngine
from adapterserve.server.model.loading import load_base_model
from adapterserve.server.settings import EngineSettings
from tests.helpers.peft_refs import ADAPTER_KINDS, make_every_kind

aten = torch.ops.aten
# Operators whose result (a Python number, or a shape) depends on tensor values: a host sync on a GPU.
HOST_READS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t), `if t:`
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.repeat_interleave.Tensor,
}


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        kwargs = kwargs or {}
        if func in HOST_READS:
            self.found.append(str(func))
        elif func is aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.found.append("index with a boolean mask (nonzero)")
        return func(*args, **kwargs)


def _watch_static_steps(engine: OfflineEngine) -> list[HostReads]:
    """Record the operators of every static decode step the engine runs from now on (one HostReads each)."""
    graphs = engine.core.decode_graphs
    modes: list[HostReads] = []
    run = graphs._run

    def watched(shape):
        with HostReads() as mode:
            logits = run(shape)
        modes.append(mode)
        return logits

    graphs._run = watched
    return modes


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    return make_every_kind(tiny_model_dir, tmp_path_factory.mktemp("adapters"))


def test_static_decode_step_of_every_kind_never_reads_device_values(tiny_model_dir, adapter_dirs):
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(
        base,
        EngineSettings(
            max_batch_size=16, max_seq_len=64, adapter_slots=len(ADAPTER_KINDS), decode_step="static"
        ),
    )
    served = {engine.add_adapter(kind, path).adapter.kind for kind, path in adapter_dirs.items()}
    assert served == set(kind_names())
    modes = _watch_static_steps(engine)
    rows = [None, *ADAPTER_KINDS, "lora_qv_r4"]
    engine.generate(
        [
            engine.request([5, 6, 7, i + 1], adapter=a, max_new_tokens=3, ignore_eos=True)
            for i, a in enumerate(rows)
        ]
    )
    assert len(modes) == 2 and all(m.ops > 100 for m in modes)  # two decode steps, really watched
    found = sorted({f for m in modes for f in m.found})
    assert not found, f"the static decode step reads device values on the host: {found}"


def test_the_watch_sees_a_host_read():
    with HostReads() as mode:
        t = torch.tensor([1, 0, 2])
        int(t.sum())
        t[t > 0]
    assert "aten._local_scalar_dense.default" in mode.found
    assert "index with a boolean mask (nonzero)" in mode.found


# Mixtral is left out: transformers' eager MoE picks each expert's tokens with nonzero (a host read), so
# on a GPU its decode step runs uncaptured (the warm-up falls back, see decode_graphs.py).
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox"])
def test_static_decode_step_of_each_family_never_reads_device_values(family, tmp_path):
    """The family's own forward (sliding windows, soft-capping, fused projections) adds no host read."""
    from tests.helpers.tiny_model import FAMILY_OVERRIDES, make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path, arch=family, **FAMILY_OVERRIDES[family])
    base = load_base_model(model_dir, quantize="none", device="cpu")
    engine = OfflineEngine(
        base, EngineSettings(max_batch_size=4, max_seq_len=64, adapter_slots=1, decode_step="static")
    )
    modes = _watch_static_steps(engine)
    engine.generate([engine.request(list(range(5, 16)), max_new_tokens=3, ignore_eos=True)])
    assert len(modes) == 2 and all(m.ops > 50 for m in modes)
    found = sorted({f for m in modes for f in m.found})
    assert not found, f"{family}: the static decode step reads device values on the host: {found}"
