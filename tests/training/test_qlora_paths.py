"""QLoRA picks the paged 8-bit optimizer and bf16 only on CUDA; on a CPU it trains over bitsandbytes'
CPU 4-bit base with torch AdamW and says so."""

from __future__ import annotations

import logging

import pytest
import torch

from adapterserve.training.loop import optimizer_name, use_bf16
from adapterserve.training.settings import TrainSettings


def test_cpu_qlora_uses_torch_adamw_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        assert optimizer_name(TrainSettings(method="qlora"), torch.device("cpu")) == "adamw_torch"
    assert "no paged 8-bit optimizer without CUDA" in caplog.text
    assert use_bf16(TrainSettings(method="qlora"), torch.device("cpu")) is False
    assert use_bf16(TrainSettings(method="qlora", bf16=True), torch.device("cpu")) is True


def test_cuda_qlora_uses_the_paged_8bit_optimizer():
    assert optimizer_name(TrainSettings(method="qlora"), torch.device("cuda")) == "paged_adamw_8bit"
    assert optimizer_name(TrainSettings(method="lora"), torch.device("cuda")) == "adamw_torch"


def test_cpu_qlora_base_is_4bit(tiny_model_dir):
    from adapterserve.training.methods import prepare_trainable_model
    from adapterserve.training.train import load_base_for

    base = load_base_for(TrainSettings(method="qlora", base_model=str(tiny_model_dir), device="cpu"))
    assert base.quantize == "nf4"
    model = prepare_trainable_model(base.model, TrainSettings(method="qlora"), total_steps=1, base_path=None)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"


@pytest.mark.cuda
def test_qlora_trains_on_cuda(tiny_model_dir, pc_file, tmp_path):
    from adapterserve.training.train import train

    settings = TrainSettings(
        method="qlora", base_model=str(tiny_model_dir), device="cuda", max_steps=8, learning_rate=2e-2
    )
    result = train(settings, pc_file, tmp_path / "q", eval_file=pc_file)
    assert result.manifest.base_quantize == "nf4"
    assert result.loop.losses[-1][1] < result.loop.losses[0][1]
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_qlora_gradient_reaches_lora_after_an_eval_forward(tiny_model_dir, pc_file):
    """An eval-mode forward (as evaluation before training does) lets bitsandbytes repack CPU 4-bit weights
    for its inference kernel, which has no autograd; the trainer must undo that, or every LoRA weight
    behind a 4-bit linear gets a zero gradient and the loss stays flat."""
    from adapterserve.training.data import PadCollator, load_training_data
    from adapterserve.training.loop import batch_loss, run_training
    from adapterserve.training.methods import prepare_trainable_model
    from adapterserve.training.train import load_base_for

    settings = TrainSettings(
        method="qlora",
        base_model=str(tiny_model_dir),
        device="cpu",
        max_steps=1,
        batch_size=8,
        learning_rate=2e-2,
        logging_steps=1,
    )
    base = load_base_for(settings)
    ds = load_training_data(pc_file, base.tokenizer, settings.max_length)
    batch = PadCollator(base.tokenizer.pad_token_id)([ds[i] for i in range(len(ds))])
    model = prepare_trainable_model(base.model, settings, total_steps=1, base_path=None)
    before = batch_loss(model, batch)  # eval + no_grad: the forward that used to repack the weights

    grads: dict[str, float] = {}
    hooks = [
        p.register_hook(lambda g, n=n: grads.__setitem__(n, float(g.abs().sum())))
        for n, p in model.named_parameters()
        if p.requires_grad and "lora_B" in n
    ]
    run_training(model, ds, settings, pad_id=base.tokenizer.pad_token_id, device=base.device)
    for h in hooks:
        h.remove()
    assert grads, "no LoRA B weight was trained"
    assert all(v > 0 for v in grads.values()), {n: v for n, v in grads.items() if v == 0}
    assert batch_loss(model, batch) < before
