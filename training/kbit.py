"""Keep a bitsandbytes 4-bit base trainable on a CPU.

bitsandbytes 0.50 repacks a CPU 4-bit weight for its AVX512-BF16 inference kernel the first time an
eval-mode, no-grad forward runs through `Linear4bit` (on CPUs that have AVX512-BF16). The repacked
weight then always takes `gemv_4bit`, which has no autograd formula: in training, gradients stop at
every 4-bit linear, so LoRA weights before one (q/v feed o_proj) get exactly zero gradient and QLoRA
silently does not train. That is what made QLoRA's loss stay flat on some machines and not others:
it depends on the CPU, and on whether anything evaluated the model before training.

`keep_4bit_trainable` undoes the repacking and turns the conversion off for the model's 4-bit linears;
the trainer calls it before every run. On CUDA it has nothing to do.
"""

from __future__ import annotations

from typing import Any


def keep_4bit_trainable(model: Any) -> int:
    """Restore the trainable layout of every CPU-repacked 4-bit weight in `model` and stop bitsandbytes
    from repacking again. Returns how many layers were restored (0 when nothing was repacked)."""
    from adapterserve.server.model.loading import keep_plain_4bit_layout

    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return 0
    keep_plain_4bit_layout(model)  # no repacking from now on (the loader already does this for its models)
    restored = 0
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            module.quant_state = weight.quant_state
            restored += 1
    return restored
