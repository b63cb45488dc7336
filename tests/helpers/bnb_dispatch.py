"""Pin bitsandbytes' CUDA 4-bit matmul to one kernel, to compare like with like.

bitsandbytes 0.50 chooses the kernel of a 4-bit matmul (`bitsandbytes::gemm_4bit` on CUDA) by the number
of tokens M in the call: its fused kernel for small M (SIMT below 8 tokens, tensor-core MMA above, with
per-architecture limits), dequantize-to-compute-dtype + cuBLAS past them. The kernels round differently.
A row inside one of the engine's batches and the same prompt alone in PEFT have different M, so they can
take different kernels: their logits then differ by that kernel difference, not by anything the engine
does. `dequantize_then_linear()` makes every 4-bit matmul take the dequantize + F.linear path, on both
sides, so a comparison measures the engine alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def dequantize_then_linear() -> Iterator[None]:
    from bitsandbytes.backends.cuda import ops

    saved = ops._gemm_4bit_custom_max_m
    ops._gemm_4bit_custom_max_m = 0  # every M is "past the fused kernel's limit"
    try:
        yield
    finally:
        ops._gemm_4bit_custom_max_m = saved


def pinned_if_nf4(quantize: str) -> contextlib.AbstractContextManager[None]:
    """`dequantize_then_linear()` over an nf4 base; nothing to pin otherwise."""
    return dequantize_then_linear() if quantize == "nf4" else contextlib.nullcontext()
