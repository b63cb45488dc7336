"""The baselines the engine is measured against, each capped by wall time so none holds the benchmark
hostage: a baseline that cannot finish within its budget stops (transformers' `max_time`), and its
tokens/s is computed from the tokens it did produce.

  * transformers' own batched `generate` of the base (static batch, left-padded): the in-process ceiling;
  * PEFT's own mixed-LoRA static batch, `generate(adapter_names=...)` (LoRA only: PEFT refuses to mix kinds);
  * naive PEFT: one request at a time, `set_adapter` per request.
Each is warmed once at full batch size (two tokens) before it is timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterserve.server.model.loading import LoadedBase, load_base_model


@dataclass
class BaselineSettings:
    model_dir: str
    quantize: str
    dtype: str
    device: str | None
    max_new_tokens: int
    seconds: float  # wall-time budget of one baseline, loading its adapters included


@dataclass
class BaselineResult:
    name: str
    requests: int
    tokens: int
    seconds: float
    capped: bool  # stopped by its time budget before every request got every token
    note: str = ""


def _load(settings: BaselineSettings) -> LoadedBase:
    return load_base_model(
        settings.model_dir, quantize=settings.quantize, dtype=settings.dtype, device=settings.device
    )


def _pad_id(base: LoadedBase) -> int:
    tok = base.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _left_padded(
    prompts: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)  # [B, W]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def _generate(model: Any, ids, mask, new_tokens: int, pad: int, max_time: float | None, **kw) -> torch.Tensor:
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        max_time=max_time,
        **kw,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_static_batch(
    model: Any, base: LoadedBase, prompts: list[list[int]], settings: BaselineSettings, budget: float, **kw
) -> tuple[int, float, bool]:
    """Warm at full batch (2 tokens), then one timed static batch capped at `budget` seconds.
    Returns (tokens, seconds, capped)."""
    pad = _pad_id(base)
    ids, mask = _left_padded(prompts, pad, base.device)
    _generate(model, ids, mask, 2, pad, None, **kw)
    _sync(base.device)
    start = time.perf_counter()
    out = _generate(model, ids, mask, settings.max_new_tokens, pad, max(budget, 1e-3), **kw)
    _sync(base.device)
    seconds = time.perf_counter() - start
    produced = out.shape[1] - ids.shape[1]
    return produced * out.shape[0], seconds, produced < settings.max_new_tokens


def transformers_batched(prompts: list[list[int]], settings: BaselineSettings) -> BaselineResult:
    """transformers' own batched generate of the base model, no adapters: the in-process ceiling."""
    base = _load(settings)
    start = time.monotonic()
    tokens, seconds, capped = _timed_static_batch(
        base.model, base, prompts, settings, settings.seconds - (time.monotonic() - start)
    )
    return BaselineResult("transformers generate, base, static batch", len(prompts), tokens, seconds, capped)


def _peft_with_adapters(
    base: LoadedBase, adapter_dirs: dict[str, Path], names: list[str], deadline: float
) -> tuple[Any, list[str]]:
    """A PeftModel with as many of `names` loaded as the deadline allows (at least one)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base.model, adapter_dirs[names[0]], adapter_name=names[0])
    loaded = [names[0]]
    for name in names[1:]:
        if time.monotonic() > deadline:
            break
        model.load_adapter(adapter_dirs[name], adapter_name=name)
        loaded.append(name)
    model.eval()
    return model, loaded


def peft_static_batch(
    prompts: list[list[int]], adapter_dirs: dict[str, Path], lora_names: list[str], settings: BaselineSettings
) -> BaselineResult:
    """PEFT's own mixed-LoRA batch: one static `generate(adapter_names=[...])` over all requests."""
    start = time.monotonic()
    base = _load(settings)
    # Loading adapters may take at most half the budget; requests then cycle over the loaded ones.
    model, loaded = _peft_with_adapters(base, adapter_dirs, lora_names, start + settings.seconds / 2)
    per_row = [loaded[i % len(loaded)] for i in range(len(prompts))]
    tokens, seconds, capped = _timed_static_batch(
        model, base, prompts, settings, settings.seconds - (time.monotonic() - start), adapter_names=per_row
    )
    note = "" if len(loaded) == len(lora_names) else f"only {len(loaded)} of {len(lora_names)} LoRAs loaded"
    return BaselineResult(
        f"PEFT generate(adapter_names=...) static batch, {len(loaded)} LoRAs",
        len(prompts),
        tokens,
        seconds,
        capped or len(loaded) < len(lora_names),
        note,
    )


def naive_peft(
    prompts: list[list[int]],
    adapter_dirs: dict[str, Path],
    lora_names: list[str],
    settings: BaselineSettings,
    max_requests: int,
) -> BaselineResult:
    """One request at a time through PeftModel with set_adapter per request, until the budget runs out."""
    start = time.monotonic()
    deadline = start + settings.seconds
    base = _load(settings)
    count = max(1, min(max_requests, len(prompts)))
    model, loaded = _peft_with_adapters(base, adapter_dirs, lora_names[:count], start + settings.seconds / 2)
    pad = _pad_id(base)
    ids, mask = _left_padded([prompts[0]], pad, base.device)
    _generate(model, ids, mask, 2, pad, None)  # warm
    tokens = done = 0
    capped = False
    t0 = time.perf_counter()
    for i in range(count):
        name = loaded[i % len(loaded)]  # requests cycle over the loaded adapters
        left = deadline - time.monotonic()
        if left <= 0 and done:  # the first request always runs, so there is a figure to report
            capped = True
            break
        model.set_adapter(name)
        ids, mask = _left_padded([prompts[i % len(prompts)]], pad, base.device)
        out = _generate(model, ids, mask, settings.max_new_tokens, pad, max(left, 1e-3))
        produced = out.shape[1] - ids.shape[1]
        tokens += produced
        done += 1
        capped = capped or produced < settings.max_new_tokens
    _sync(base.device)
    return BaselineResult("naive PEFT, one request at a time", done, tokens, time.perf_counter() - t0, capped)
