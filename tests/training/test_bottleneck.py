"""`adapterserve train --method bottleneck`: the training-time module saves a PEFT-layout adapter that
the server serves, equal per row to the module's own forward."""

from __future__ import annotations

import json

import pytest

from adapterserve.training.generation import ForwardGreedyBackend
from adapterserve.training.output import ADAPTER_FILES
from adapterserve.training.settings import TrainSettings
from adapterserve.training.train import train

pytest.importorskip("adapterserve.server.engine.offline")


@pytest.mark.parametrize(
    "options",
    [
        {"bottleneck_placement": "houlsby", "non_linearity": "relu", "reduction_factor": 4},
        {"bottleneck_placement": "pfeiffer", "non_linearity": "silu", "reduction_factor": 8},
    ],
)
def test_trained_bottleneck_serves_equal_to_its_training_module(options, tiny_model_dir, pc_file, tmp_path):
    from adapterserve.server.engine.offline import OfflineEngine
    from adapterserve.server.model.loading import eos_token_ids, load_base_model
    from adapterserve.training.bottleneck import load_bottleneck
    from adapterserve.training.generation import EngineBackend

    settings = TrainSettings(method="bottleneck", max_steps=8, batch_size=8, learning_rate=2e-2, **options)
    out = tmp_path / "adapter"
    base = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    result = train(settings, pc_file, out, base=base, eval_file=pc_file)
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK" == result.manifest.peft_type
    assert (config["placement"], config["non_linearity"]) == (
        options["bottleneck_placement"],
        options["non_linearity"],
    )
    hidden = base.spec.hidden_size
    per_module = (
        2 * hidden * (hidden // options["reduction_factor"]) + hidden + hidden // options["reduction_factor"]
    )
    modules = base.spec.num_layers * (2 if options["bottleneck_placement"] == "houlsby" else 1)
    assert result.manifest.stored_parameters == modules * per_module
    assert result.manifest.eval_adapter is not None and result.manifest.eval_adapter.backend == "engine"

    fresh = load_base_model(tiny_model_dir, quantize="none", device="cpu")
    reference = load_bottleneck(fresh.model, out)
    tok = fresh.tokenizer
    prompts = [
        list(tok(t)["input_ids"]) for t in ("Classify: I love this movie ->", "Classify: rain ->", "def")
    ]
    want = ForwardGreedyBackend(reference, eos_token_ids(tok, fresh.model)).generate(prompts, 8)

    engine = OfflineEngine(load_base_model(tiny_model_dir, quantize="none", device="cpu"))
    adapter = engine.add_adapter("trained", out).adapter
    assert adapter.kind == "bottleneck"
    assert EngineBackend(engine, "trained").generate(prompts, 8) == want
    assert EngineBackend(engine, None).generate(prompts, 8) != want  # training moved it


def test_cli_trains_bottleneck(tiny_model_dir, pc_file, tmp_path, capsys):
    from adapterserve.training.cli import main

    out = tmp_path / "cli-adapter"
    code = main(
        [
            "--method", "bottleneck", "--base-model", str(tiny_model_dir), "--data", str(pc_file),
            "--out", str(out), "--max-steps", "2", "--reduction-factor", "8",
            "--bottleneck-placement", "pfeiffer", "--non-linearity", "gelu", "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["reduction_factor"] == 8
