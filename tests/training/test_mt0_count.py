"""The source material's figure: LoRA r=8 on q,v of mt0-large trains 2,359,296 parameters (0.19%).

mt0-large is built from its config on the meta device (no weights, no download); the config values are
those of bigscience/mt0-large, written out by hand.
"""

from __future__ import annotations

import torch

from adapterserve.training.methods import count_parameters, peft_config_for
from adapterserve.training.settings import TrainSettings


def mt0_large_config():
    from transformers import MT5Config

    config = MT5Config(
        vocab_size=250112,
        d_model=1024,
        d_kv=64,
        d_ff=2816,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=32,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return config


def test_lora_r8_qv_on_mt0_large_trains_2359296_parameters():
    from peft import get_peft_model
    from transformers import MT5ForConditionalGeneration

    config = mt0_large_config()
    with torch.device("meta"):
        model = MT5ForConditionalGeneration(config)
        # transformers 5 forces tie_word_embeddings=True in MT5Config (untying it there also unties the
        # encoder/decoder input embeddings). mt0-large has tie_word_embeddings False: its own lm_head.
        model.lm_head = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
    base_total = sum(p.numel() for p in model.parameters())
    # mt0-large: shared input embedding + lm_head (250112 x 1024 each) + 24 encoder and 24 decoder blocks.
    assert base_total == 1_229_581_312

    settings = TrainSettings(method="lora", rank=8, target_modules=("q", "v"))
    config = peft_config_for(settings, total_steps=1, task_type="SEQ_2_SEQ_LM")
    peft_model = get_peft_model(model, config)
    counts = count_parameters(peft_model)
    assert counts.trainable == 2_359_296
    # 72 attention blocks (24 encoder self, 24 decoder self, 24 decoder cross) x {q, v} x r * (in + out).
    assert counts.trainable == 72 * 2 * 8 * (1024 + 1024)
    assert (counts.trainable, counts.total) == peft_model.get_nb_trainable_parameters()
    assert round(counts.percent, 2) == 0.19
