"""An adapter saved by the training module serves as is: the server's engine, given the adapter directory,
produces the same greedy tokens as PEFT with that adapter (full-forward reference decoding)."""

from __future__ import annotations

import pytest

from adapterserve.server.model.loading import eos_token_ids
from adapterserve.training.generation import EngineBackend, ForwardGreedyBackend
from adapterserve.training.settings import TrainSettings
from adapterserve.training.train import train

pytest.importorskip("adapterserve.server.engine.offline")

CASES = {
    "lora": {"learning_rate": 2e-2},
    "adalora": {"learning_rate": 5e-2, "adalora_tinit": 1, "adalora_tfinal": 2},
    "dora": {"learning_rate": 2e-2},
    "ia3": {"learning_rate": 5e-2},
    "prompt-tuning": {"learning_rate": 0.3, "num_virtual_tokens": 4, "init_text": "Classify the sentiment"},
    "p-tuning": {"learning_rate": 1e-2, "num_virtual_tokens": 4, "encoder_type": "lstm"},
    "prefix-tuning": {"learning_rate": 5e-2, "num_virtual_tokens": 4, "prefix_projection": True},
}


@pytest.mark.parametrize("method", list(CASES))
def test_engine_matches_peft_on_the_saved_adapter(method, tiny_model_dir, pc_file, tmp_path):
    from peft import PeftModel

    from adapterserve.server.engine.offline import OfflineEngine
    from adapterserve.server.model.loading import load_base_model

    settings = TrainSettings(method=method, max_steps=10, batch_size=8, eval_backend="peft", **CASES[method])
    out = tmp_path / method
    train(settings, pc_file, out, base=load_base_model(tiny_model_dir, quantize="none", device="cpu"))

    peft_base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    peft_model = PeftModel.from_pretrained(peft_base.model, str(out))
    tok = peft_base.tokenizer
    texts = ("Classify: I love this movie ->", "Classify: I hate rain ->", "Translate to French:", "def")
    prompts = [list(tok(text)["input_ids"]) for text in texts]
    want = ForwardGreedyBackend(peft_model, eos_token_ids(tok, peft_base.model)).generate(prompts, 10)

    engine = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"))
    engine.add_adapter("trained", out)
    got = EngineBackend(engine, "trained").generate(prompts, 10)
    assert got == want
    # The adapter matters: the base model says something else on at least one prompt.
    assert EngineBackend(engine, None).generate(prompts, 10) != got


def test_train_evaluates_through_the_engine_by_default(tiny_model_dir, pc_file, tmp_path):
    from adapterserve.server.model.loading import load_base_model

    settings = TrainSettings(method="lora", max_steps=4, learning_rate=2e-2)
    result = train(
        settings,
        pc_file,
        tmp_path / "a",
        eval_file=pc_file,
        base=load_base_model(tiny_model_dir, quantize="none", device="cpu"),
    )
    assert result.manifest.eval_base is not None and result.manifest.eval_base.backend == "engine"
    assert result.manifest.eval_adapter is not None and result.manifest.eval_adapter.backend == "engine"

    peft_settings = settings.model_copy(update={"eval_backend": "peft"})
    again = train(
        peft_settings,
        pc_file,
        tmp_path / "b",
        eval_file=pc_file,
        base=load_base_model(tiny_model_dir, quantize="none", device="cpu"),
    )
    # Same seed, same data: the engine's numbers and PEFT's agree.
    assert again.eval_adapter.predictions == result.eval_adapter.predictions
    assert again.eval_base.predictions == result.eval_base.predictions
