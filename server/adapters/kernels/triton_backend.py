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

# Elements of one fp32 tile a program holds (BLOCK_K x BLOCK_R for shrink, BLOCK_R x BLOCK_N for expand).
_TILE = 4096
_MAX_BLOCK_R = 64  # expand loops over rank tiles above this


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

    def shrink(
        self, x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, single_slot: int | None = None
    ) -> torch.Tensor:
        x = x.to(a.dtype)
        if single_slot is not None:
            return x @ a[single_slot]
        from adapterserve.server.adapters.kernels import _triton_kernels as k

        batch, seq, in_dim = x.shape
        rank = a.shape[2]
        out = torch.empty(batch, seq, rank, dtype=a.dtype, device=x.device)
        if out.numel() == 0:
            return out
        block_r = k.next_power_of_2(rank)
        block_k = max(16, min(128, _TILE // block_r))
        shrink, _ = k.jitted(triton_interpreting())
        with _on_device(x):
            shrink[(batch * seq,)](
                x, a, slots, out, seq, in_dim, rank,
                *x.stride(), *a.stride(), *out.stride(),
                BLOCK_K=block_k, BLOCK_R=block_r,
            )  # fmt: skip
        return out

    def expand(
        self, h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, single_slot: int | None = None
    ) -> torch.Tensor:
        h = h.to(b.dtype)
        if single_slot is not None:
            return h @ b[single_slot]
        from adapterserve.server.adapters.kernels import _triton_kernels as k

        batch, seq, rank = h.shape
        out_dim = b.shape[2]
        out = torch.empty(batch, seq, out_dim, dtype=b.dtype, device=h.device)
        if out.numel() == 0:
            return out
        block_r = min(k.next_power_of_2(rank), _MAX_BLOCK_R)
        block_n = max(32, min(128, _TILE // block_r))
        _, expand = k.jitted(triton_interpreting())
        with _on_device(h):
            expand[(batch * seq, -(-out_dim // block_n))](
                h, b, slots, out, seq, rank, out_dim,
                *h.stride(), *b.stride(), *out.stride(),
                BLOCK_R=block_r, BLOCK_N=block_n,
            )  # fmt: skip
        return out


def _on_device(t: torch.Tensor):
    """Launch on the tensor's own GPU (Triton launches on the current one)."""
    import contextlib

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
