"""Measure how far the engine's nf4 logits are from PEFT's on CUDA, per bitsandbytes kernel dispatch.

usage: python scripts/gpu/nf4_parity.py MODEL_DIR [ROWS]   (prints one JSON object)

For ROWS prompts spread over LoRA adapters (q,v r8) on MODEL_DIR loaded as nf4/bf16, one mixed engine
batch is compared row by row with PeftModel + that adapter alone (first-token logits, by a full forward):
once with bitsandbytes' default kernel choice (which depends on the tokens per matmul, so the engine's
batch and PEFT's single prompt may take different kernels) and once with every 4-bit matmul pinned to
dequantize + F.linear. Reported per dispatch: max and median |logit diff|, the logits' scale, greedy
agreement, and the rows where PEFT's top-two margin is below the measured diff (near-ties).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

# On a machine without CUDA the script still runs (fp32 on the CPU, default dispatch only): a check of
# the script itself, not a measurement of the GPU kernels.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"


@contextlib.contextmanager
def pinned_dequant():
    from bitsandbytes.backends.cuda import ops

    saved = ops._gemm_4bit_custom_max_m
    ops._gemm_4bit_custom_max_m = 0
    try:
        yield
    finally:
        ops._gemm_4bit_custom_max_m = saved


def _adapters(model_dir: str, n: int, workdir: Path) -> dict[str, Path]:
    from peft import LoraConfig
    from transformers import AutoConfig

    from adapterserve.server.api.demo import write_demo_adapter

    config = AutoConfig.from_pretrained(model_dir)
    out = {}
    for i in range(n):
        path = workdir / f"lora-{i}"
        cfg = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        )
        write_demo_adapter(config, cfg, path, seed=i, embed_std=0.02)
        out[f"lora-{i}"] = path
    return out


def _measure(model_dir: str, adapters: dict[str, Path], prompts: list[list[int]]) -> dict:
    from peft import PeftModel

    from adapterserve.server.engine.offline import OfflineEngine
    from adapterserve.server.model.loading import load_base_model
    from adapterserve.server.settings import EngineSettings

    names = list(adapters)
    rows = [names[i % len(names)] for i in range(len(prompts))]
    base = load_base_model(model_dir, quantize="nf4", device=DEVICE, dtype=DTYPE)
    engine = OfflineEngine(
        base,
        EngineSettings(max_batch_size=len(prompts), max_seq_len=128, adapter_slots=len(names)),
        capture_logits=True,
    )
    for n, d in adapters.items():
        engine.add_adapter(n, d)
    got = engine.generate(
        [
            engine.request(p, adapter=a, max_new_tokens=1, ignore_eos=True)
            for p, a in zip(prompts, rows, strict=True)
        ]
    )
    del engine, base
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    ref_base = load_base_model(model_dir, quantize="nf4", device=DEVICE, dtype=DTYPE)
    model = PeftModel.from_pretrained(ref_base.model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapters[n], adapter_name=n)
    model.eval()
    diffs, scales, agree, ties = [], [], 0, []
    with torch.no_grad():
        for i, (prompt, name) in enumerate(zip(prompts, rows, strict=True)):
            model.set_adapter(name)
            ids = torch.tensor([prompt], device=DEVICE)
            want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float().cpu()
            have = got[i].logits[0].float()
            diff = float((have - want).abs().max())
            top2 = torch.topk(want, 2).values
            diffs.append(diff)
            scales.append(float(want.abs().max()))
            same = got[i].token_ids[0] == int(want.argmax())
            agree += same
            if float(top2[0] - top2[1]) < diff:
                ties.append({"row": i, "margin": round(float(top2[0] - top2[1]), 4), "same_token": same})
    return {
        "rows": len(prompts),
        "max_abs_diff": round(max(diffs), 4),
        "median_abs_diff": round(statistics.median(diffs), 4),
        "logit_scale_max": round(max(scales), 2),
        "greedy_agree": agree,
        "near_ties": ties,
    }


def main() -> None:
    model_dir = sys.argv[1]
    n_rows = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [list(tok(f"Tell me a fact about the number {i}, please.")["input_ids"]) for i in range(n_rows)]
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _adapters(model_dir, 4, Path(tmp))
        device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
        report = {"device": device, "default_dispatch": _measure(model_dir, adapters, prompts)}
        if DEVICE == "cuda":
            with pinned_dequant():
                report["pinned_dequant"] = _measure(model_dir, adapters, prompts)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
