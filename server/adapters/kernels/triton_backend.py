"""The `triton` backend: gathered BGMV kernels (see _triton_kernels.py) for mixed batches.

Host work per call is shapes only: the grid and the tile sizes come from the tensor shapes, the output
is `torch.empty` of a shape-derived size, and nothing is read back from the device, so a warmed-up call
can be captured in a CUDA graph. One slot for the whole batch is a plain matmul on that slot's view
(cuBLAS is the better kernel for a uniform batch, and a view is no copy).
"""

from __future__ import annotations

import importlib.util

import torch

from adapterserve.server.adapters.kernels.base import KernelBackendError, LoraKernels, triton_interpreting

# Elements of the fp32 tile (BLOCK_K x BLOCK_N) a program holds, and the bounds of its sides (ranks
# below 16 are masked lanes of a 16-wide tile).
_TILE = 4096
_MIN_BLOCK = 16
_MAX_BLOCK_N = 128
_MAX_BLOCK_K = 128


class TritonLoraKernels(LoraKernels):
    name = "triton"

    def check(self, device: torch.device) -> None:
        if importlib.util.find_spec("triton") is None:
            raise KernelBackendError(
                "lora_backend 'triton' needs the triton package (pip install triton; the CUDA builds of "
                "torch ship it); use lora_backend 'torch' otherwise"
            )
        if device.type != "cuda" and not triton_interpreting():
            raise KernelBackendError(
                f"lora_backend 'triton' runs on CUDA devices only (the engine's device is {device}); "
                "use lora_backend 'torch', or TRITON_INTERPRET=1 to run the kernels in Triton's "
                "CPU interpreter (slow: for tests)"
            )
        if device.type != "cuda":
            import triton.language as tl

            # The interpreter needs the variable before triton's first import: its library functions
            # (tl.sum, tl.zeros) are decorated then, and compiled ones cannot run in the interpreter.
            if type(tl.sum).__name__ == "JITFunction":
                raise KernelBackendError(
                    "TRITON_INTERPRET=1 was set after triton was imported in this process; set it in "
                    "the environment before the process starts"
                )

    def gathered_matmul(
        self, x: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, single_slot: int | None
    ) -> torch.Tensor:
        x = x.to(w.dtype)
        if single_slot is not None:
            return x @ w[single_slot]
        from adapterserve.server.adapters.kernels._triton_kernels import jitted, next_power_of_2

        batch, seq, k_dim = x.shape
        n_dim = w.shape[2]
        out = torch.empty(batch, seq, n_dim, dtype=w.dtype, device=x.device)
        if out.numel() == 0:
            return out
        # Shrink (N = r, small): one program per token holds the whole rank and loops over K.
        # Expand (K = r, small): one program per (token, block of N) loops over rank tiles.
        block_n = max(_MIN_BLOCK, min(next_power_of_2(n_dim), _MAX_BLOCK_N))
        block_k = max(_MIN_BLOCK, min(_MAX_BLOCK_K, next_power_of_2(k_dim), _TILE // block_n))
        with _on_device(x):
            jitted(triton_interpreting())[(batch * seq, -(-n_dim // block_n))](
                x, w, slots, out, seq, k_dim, n_dim,
                *x.stride(), *w.stride(), *out.stride(),
                BLOCK_K=block_k, BLOCK_N=block_n,
            )  # fmt: skip
        return out


def _on_device(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current one)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
