"""The committed demo adapters load as they are in the server's engine over the embedded default model and
beat the base model on their task's held-out examples (all three in one engine, one mixed batch each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterserve.training.data import load_eval_data
from adapterserve.training.evaluate import evaluate, new_tokens_for
from adapterserve.training.generation import EngineBackend
from adapterserve.training.output import ADAPTER_FILES, manifest_path

ROOT = Path(__file__).resolve().parents[2]
DEMOS = {"json-extract": "exact_match", "sentiment": "exact_match", "pirate": "token_f1"}


def test_demo_adapters_are_two_files_and_small():
    for name in DEMOS:
        folder = ROOT / "demo" / "adapters" / name
        assert sorted(p.name for p in folder.iterdir()) == sorted(ADAPTER_FILES)
        assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
        manifest = json.loads(manifest_path(folder).read_text())
        assert manifest["eval_adapter"]["backend"] == "engine"


@pytest.mark.smollm2
def test_demo_adapters_beat_the_base_in_the_engine():
    from adapterserve.server.engine.offline import OfflineEngine
    from adapterserve.server.model.loading import load_base_model

    base = load_base_model(None, quantize="none", device="cpu")
    engine = OfflineEngine(base)
    for name in DEMOS:
        engine.add_adapter(name, ROOT / "demo" / "adapters" / name)
    for name, metric in DEMOS.items():
        examples = load_eval_data(ROOT / "demo" / "data" / name / "eval.jsonl", base.tokenizer, limit=16)
        max_new = new_tokens_for(examples, base.tokenizer, 48)
        plain = evaluate(EngineBackend(engine, None), examples, base.tokenizer, max_new_tokens=max_new)
        tuned = evaluate(EngineBackend(engine, name), examples, base.tokenizer, max_new_tokens=max_new)
        assert getattr(tuned.metrics, metric) > getattr(plain.metrics, metric) + 0.3, name
