"""PEFT adapters with non-trivial random weights, and PEFT's own greedy output as the reference.

References are computed with full forward passes (no cache) through `PeftModel`: with transformers
5.24 + peft 0.21.2, `PeftModel.generate` silently drops prefix tuning's key/value prefix.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from adapterserve.server.adapters.peft_configs import build_peft_config

ADAPTER_KINDS: dict[str, Callable[[], object]] = {}


def _register(name: str):
    def wrap(fn):
        ADAPTER_KINDS[name] = fn
        return fn

    return wrap


@_register("lora_qv_r4")
def _lora_small():
    return build_peft_config(
        "lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )


@_register("lora_all_r8_rs")
def _lora_big():
    return build_peft_config(
        "lora",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"o_proj": 4},
        init_lora_weights=False,
    )


@_register("adalora_pruned")
def _adalora():
    return build_peft_config(
        "adalora",
        init_r=6,
        target_r=4,
        total_step=10,
        lora_alpha=12,
        target_modules=["q_proj", "v_proj"],
    )


@_register("dora")
def _dora():
    return build_peft_config(
        "dora",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        init_lora_weights=False,
    )


@_register("ia3")
def _ia3():
    return build_peft_config(
        "ia3",
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    )


@_register("prompt")
def _prompt():
    return build_peft_config("prompt-tuning", num_virtual_tokens=4)


@_register("ptuning")
def _ptuning():
    return build_peft_config("p-tuning", num_virtual_tokens=3, encoder_hidden_size=32)


@_register("prefix")
def _prefix():
    return build_peft_config("prefix-tuning", num_virtual_tokens=5)


def _bottleneck_config(**fields):
    from adapterserve.server.adapters.kinds.bottleneck import BottleneckAdapterConfig

    return BottleneckAdapterConfig(peft_type="BOTTLENECK", task_type="CAUSAL_LM", **fields)


@_register("bottleneck_houlsby")
def _bottleneck_houlsby():
    return _bottleneck_config(reduction_factor=8, placement="houlsby", non_linearity="gelu")


@_register("bottleneck_pfeiffer")
def _bottleneck_pfeiffer():
    return _bottleneck_config(reduction_factor=4, placement="pfeiffer", non_linearity="tanh")


@_register("template")
def _template():
    return {"template": "Q: {input}\nA:", "system": "Answer briefly."}


def make_adapter(base_dir: Path, kind: str, out_dir: Path, seed: int = 0, config=None) -> Path:
    """Create adapter `kind` on the model in base_dir with random (non-identity) weights; save it.
    `config` replaces the kind's registered config (other target modules for other model families).
    Bottleneck adapters (which PEFT lacks) are made by the training module, which is their reference."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = ADAPTER_KINDS[kind]() if config is None else config
    if isinstance(config, dict):  # a hard-prompt template: no weights
        from adapterserve.server.adapters.kinds.template import write_template_dir

        return write_template_dir(out_dir, **config)
    if getattr(config, "peft_type", None) == "BOTTLENECK":
        from adapterserve.training.bottleneck import BottleneckModel

        wrapped = BottleneckModel(model, config)
        with torch.no_grad():  # scaled to the fan-in, so a deep base (SmolLM2: 30 layers) stays stable
            for p in wrapped.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.5 / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1)
        wrapped.save_pretrained(out_dir)
        return out_dir
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "ia3_l" in name:  # make IA3 clearly non-identity
                p.uniform_(0.2, 2.0)
            if "lora_magnitude_vector" in name:  # DoRA's init magnitude is the norm: move it off
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            if "lora_E" in name or (
                "lora_B" in name and kind.startswith("adalora")
            ):  # AdaLoRA inits E, B to 0
                p.normal_(0.0, 1.0)
    if kind.startswith("adalora"):
        # As AdaLoRA's rank allocator leaves it: some ranks pruned per module (one module to rank 0).
        config = peft_model.peft_config["default"]
        config.rank_pattern = {}
        for layer in range(model.config.num_hidden_layers):
            for proj in ("q_proj", "v_proj"):
                keep = [True, False, True, True, False, True] if proj == "q_proj" else [layer == 0] * 6
                config.rank_pattern[f"model.layers.{layer}.self_attn.{proj}.lora_E"] = keep
    peft_model.save_pretrained(out_dir)
    return out_dir


def make_every_kind(base_dir: Path, root: Path) -> dict[str, Path]:
    """One adapter of every kind in ADAPTER_KINDS on the model in base_dir, each with its own seed."""
    return {kind: make_adapter(base_dir, kind, root / kind, seed=i) for i, kind in enumerate(ADAPTER_KINDS)}


def peft_reference_model(
    base_dir: Path, adapter_dir: Path | None, quantize: str = "none", device: str = "cpu", dtype: str = "auto"
):
    """A fresh base (not shared with the engine) with the adapter loaded by PEFT, or the plain base."""
    from peft import PeftModel

    from adapterserve.server.model.loading import load_base_model

    model = load_base_model(base_dir, quantize=quantize, device=device, dtype=dtype).model
    if adapter_dir is None:
        return model
    peft_type = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["peft_type"]
    if peft_type == "HARD_PROMPT":
        return model  # a template changes the prompt, not the model: see reference_prompt
    if peft_type == "BOTTLENECK":
        from adapterserve.training.bottleneck import load_bottleneck

        return load_bottleneck(model, adapter_dir)  # the training-time module's own forward
    peft_model = PeftModel.from_pretrained(model, adapter_dir).eval()
    if peft_model.active_peft_config.is_prompt_learning:
        # PEFT keeps the prompt encoder in float32; over a bf16 (or 4-bit) base its virtual tokens or key/
        # values would meet bf16 ones in attention. The engine serves them in the base's dtype.
        peft_model.prompt_encoder.to(model.get_input_embeddings().weight.dtype)
    return peft_model


def reference_prompt(base_dir: Path, adapter_dir: Path | None, prompt: list[int]) -> list[int]:
    """The token ids the reference model sees for `prompt`: a template's text around them (system text,
    blank line, the template's text before and after {input}, each tokenized without special tokens)."""
    if adapter_dir is None:
        return list(prompt)
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config["peft_type"] != "HARD_PROMPT":
        return list(prompt)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    before, after = config["template"].split("{input}")
    if config.get("system"):
        before = config["system"] + "\n\n" + before
    head = [prompt[0]] if prompt and prompt[0] == tok.bos_token_id else []
    body = list(prompt[len(head) :])
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"] if text else []  # noqa: E731
    return head + enc(before) + body + enc(after)


@torch.inference_mode()
def peft_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and last-position logits [V] per step, by full forward passes (no cache)."""
    ids = list(prompt)
    tokens, logits = [], []
    device = next(model.parameters()).device
    for _ in range(steps):
        input_ids = torch.tensor([ids], device=device)
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        last = out.logits[0, -1].float().cpu()
        token = int(last.argmax())
        tokens.append(token)
        logits.append(last)
        ids.append(token)
    return tokens, logits
