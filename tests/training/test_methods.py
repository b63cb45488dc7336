"""Every method trains on the tiny model: loss goes down, the saved adapter is exactly the two PEFT files,
reloading it from disk gives the same greedy tokens, and parameter counts agree with PEFT's."""

from __future__ import annotations

import json

import pytest
import torch

from adapterserve.training.data import PadCollator, load_training_data
from adapterserve.training.generation import ForwardGreedyBackend
from adapterserve.training.loop import batch_loss, run_training
from adapterserve.training.methods import count_parameters, prepare_trainable_model
from adapterserve.training.output import ADAPTER_FILES, read_manifest
from adapterserve.training.settings import METHODS, TrainSettings
from adapterserve.training.train import train

# Settings per method that make a visible difference within 6 steps on the tiny model.
FAST: dict[str, dict] = {
    "sft": {"learning_rate": 3e-3},
    "lora": {"learning_rate": 2e-2},
    "qlora": {"learning_rate": 2e-2},
    "adalora": {"learning_rate": 2e-2, "adalora_tinit": 1, "adalora_tfinal": 1},
    "dora": {"learning_rate": 2e-2},
    "bottleneck": {"learning_rate": 2e-2, "reduction_factor": 4},
    "ia3": {"learning_rate": 5e-2},
    "prompt-tuning": {"learning_rate": 0.3, "num_virtual_tokens": 4},
    "p-tuning": {"learning_rate": 1e-2, "num_virtual_tokens": 4},
    "prefix-tuning": {"learning_rate": 5e-2, "num_virtual_tokens": 4},
}
VARIANTS = [
    ("sft", {}),
    ("lora", {}),
    ("qlora", {}),
    ("adalora", {}),
    ("dora", {}),
    ("bottleneck", {}),
    ("bottleneck", {"bottleneck_placement": "pfeiffer", "non_linearity": "tanh"}),
    ("ia3", {}),
    ("prompt-tuning", {}),
    ("prompt-tuning", {"init_text": "Classify the sentiment"}),
    ("p-tuning", {"encoder_type": "mlp"}),
    ("p-tuning", {"encoder_type": "lstm"}),
    ("prefix-tuning", {"prefix_projection": False}),
    ("prefix-tuning", {"prefix_projection": True, "encoder_hidden_size": 32}),
]


def _settings(method: str, **extra) -> TrainSettings:
    return TrainSettings(
        method=method, max_steps=6, batch_size=8, logging_steps=1, **{**FAST[method], **extra}
    )


def _base_for(method, tiny_model_dir):
    from adapterserve.server.model.loading import load_base_model

    return load_base_model(tiny_model_dir, quantize="nf4" if method == "qlora" else "none", device="cpu")


def test_every_method_has_a_variant_here():
    assert {m for m, _ in VARIANTS} == set(METHODS)


@pytest.mark.parametrize(("method", "extra"), VARIANTS, ids=[f"{m}-{e}" if e else m for m, e in VARIANTS])
def test_loss_goes_down_on_a_fixed_batch(method, extra, tiny_model_dir, pc_file):
    base = _base_for(method, tiny_model_dir)
    settings = _settings(method, **extra)
    ds = load_training_data(pc_file, base.tokenizer, settings.max_length)
    batch = PadCollator(base.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    model = prepare_trainable_model(base.model, settings, total_steps=6, base_path=str(tiny_model_dir))
    before = batch_loss(model, batch)
    result = run_training(model, ds, settings, pad_id=base.tokenizer.pad_token_id, device=base.device)
    after = batch_loss(model, batch)
    assert result.steps == 6
    assert after < before - 0.05, f"{method}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize(
    "method", ["lora", "qlora", "adalora", "ia3", "prompt-tuning", "p-tuning", "prefix-tuning"]
)
def test_saved_adapter_is_safetensors_only_and_reloads_to_the_same_greedy_tokens(
    method, tiny_model_dir, pc_file, tmp_path
):
    from peft import PeftModel

    settings = _settings(method)
    if method == "prefix-tuning":
        settings = _settings(method, prefix_projection=True)
    base = _base_for(method, tiny_model_dir)
    out = tmp_path / "adapter"
    result = train(settings, pc_file, out, eval_file=pc_file, base=base)
    assert sorted(p.name for p in out.iterdir()) == sorted(ADAPTER_FILES)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == result.manifest.peft_type

    # The in-memory model that train() evaluated was reloaded from disk; reload once more on a fresh base
    # and compare greedy tokens on the eval prompts.
    fresh = _base_for(method, tiny_model_dir)
    reloaded = PeftModel.from_pretrained(fresh.model, str(out))
    prompts = [list(fresh.tokenizer(f"Classify: text {i} ->")["input_ids"]) for i in range(3)]
    eos = fresh.tokenizer.eos_token_id
    got = ForwardGreedyBackend(reloaded, eos).generate(prompts, 8)
    want = ForwardGreedyBackend(result.model, eos).generate(prompts, 8)
    assert got == want
    # ... and the adapter changes the output of the base on at least one prompt.
    plain = _base_for(method, tiny_model_dir)
    assert ForwardGreedyBackend(plain.model, eos).generate(prompts, 8) != got or method == "qlora"


def test_sft_saves_a_whole_model_labelled_as_such(tiny_model_dir, pc_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    result = train(_settings("sft"), pc_file, out, base=_base_for("sft", tiny_model_dir))
    assert result.manifest.format == "full-model" and result.manifest.peft_type == "full-model"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), b in zip(result.model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert result.manifest.trainable_parameters == result.manifest.total_parameters


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "prompt-tuning", "p-tuning", "prefix-tuning"])
def test_trainable_counts_match_peft(method, fresh_base, tiny_model_dir):
    settings = TrainSettings(method=method, max_steps=100)
    model = prepare_trainable_model(
        fresh_base.model, settings, total_steps=100, base_path=str(tiny_model_dir)
    )
    ours = count_parameters(model)
    trainable, total = model.get_nb_trainable_parameters()
    assert (ours.trainable, ours.total) == (trainable, total)


def test_lora_count_is_the_closed_form(fresh_base):
    # r * (in + out) per adapted linear; q: 64 -> 64, v: 64 -> 32 (GQA), 2 layers.
    model = prepare_trainable_model(
        fresh_base.model, TrainSettings(method="lora", rank=4), total_steps=1, base_path=None
    )
    assert count_parameters(model).trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))


def test_qlora_count_counts_4bit_weights_as_elements(tiny_model_dir):
    fp = _base_for("lora", tiny_model_dir)
    q = _base_for("qlora", tiny_model_dir)
    s = TrainSettings(method="qlora")
    q_model = prepare_trainable_model(q.model, s, total_steps=1, base_path=None)
    fp_model = prepare_trainable_model(fp.model, TrainSettings(method="lora"), total_steps=1, base_path=None)
    assert count_parameters(q_model) == count_parameters(fp_model)
    assert count_parameters(q_model).trainable == q_model.get_nb_trainable_parameters()[0]


def test_manifest_records_the_run(tiny_model_dir, pc_file, tmp_path):
    from adapterserve.training.data import file_sha256

    base = _base_for("lora", tiny_model_dir)
    out = tmp_path / "a"
    result = train(_settings("lora"), pc_file, out, eval_file=pc_file, base=base)
    m = read_manifest(out)
    assert m == result.manifest
    assert m.method == "lora" and m.peft_type == "LORA" and m.format == "peft-adapter"
    assert m.base_fingerprint == base.fingerprint
    assert m.train_data_sha256 == file_sha256(pc_file) and m.train_examples == 8
    assert m.bytes_on_disk == sum(p.stat().st_size for p in out.iterdir())
    assert m.stored_parameters == m.trainable_parameters  # LoRA stores exactly what it trains
    assert m.steps == 6 and m.final_loss is not None
    assert m.eval_base is not None and m.eval_adapter is not None and m.eval_adapter.examples == 8
    assert m.settings["rank"] == 8


def test_refuses_a_non_empty_out_dir(tiny_model_dir, pc_file, tmp_path):
    from adapterserve.training.errors import TrainingError

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    with pytest.raises(TrainingError, match="not empty"):
        train(_settings("lora"), pc_file, tmp_path / "out", base=_base_for("lora", tiny_model_dir))
    assert (tmp_path / "out" / "x").read_text() == "keep me"
