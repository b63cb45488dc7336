"""oneDNN-packed linears for the engine on a CPU.

torch's CPU `F.linear` in float32 goes to a BLAS whose x86 kernels are far from the machine's peak on
some CPUs; oneDNN's matmul, with the weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, the op inductor's CPU freezing path uses), is not. Measured on
the 2-core development VM (AMD EPYC, AVX-512), the embedded model's decode linears for 64 rows: 88 ms
plain against 39 ms packed; the 49,152-token lm_head 34 ms against 9 ms; a [64, 40] prefill chunk's
gate_proj 21 ms against 9 ms. Results equal `F.linear` up to float32 summation order (~1e-4 absolute on
outputs of magnitude ~20).

`PackedLinear` keeps the original `nn.Linear` (its weight stays the model's parameter: tied embeddings,
DoRA's weight norms and anything else reading `.weight` see it unchanged) and a packed copy, so a CPU
model's linear weights take twice their memory. The copy is made once, when the engine wraps the model:
weights changed afterwards (training) are not seen, which is why `EngineSettings.cpu_linear` exists and
training's evaluation engines use `torch`.

Under `torch.compile` (`compile_decode`) the call goes through a custom op, `adapterserve::onednn_linear`,
that inductor runs as an opaque kernel: inductor's own lowering of `mkldnn._linear_pointwise` accepts
only the weights it packed itself (frozen constants) and failed on ours, which silently turned compilation
off. Eager calls skip the custom op's dispatch and call oneDNN directly.

Memory: oneDNN makes a primitive per input shape, and two caches keep them (torch's ideep cache and
oneDNN's own primitive cache, 1,024 entries each): measured ~0.55 MB per shape and weight shape (JIT
code and the like, whatever the weight's size), ~1.3 ms to make one. Prefill row counts (rows x padded
prompt length) take hundreds of values, so a server fed prompts of many lengths grew by ~190 MB and kept
it (FINDINGS "Soak memory"). Eager calls therefore reach oneDNN as 2-D inputs whose row count is
`padded_rows`: one position per row (decode, the lm_head) keeps its row count up to EXACT_ROWS (padding
a decode batch would cost time on every step); several positions per row (prefill) keep it up to
PREFILL_EXACT_ROWS; above those, rows round up to one of 8 sizes per doubling (at most 1/8 more rows).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

_DTYPES = (torch.float32, torch.bfloat16)
_BATCH_HINT = 64  # rows the reorder is tuned for; any row count works
EXACT_ROWS = 64  # one position per row (decode): row counts up to this reach oneDNN as they are
PREFILL_EXACT_ROWS = 16  # several positions per row (prefill): up to this


def padded_rows(rows: int, exact: int = EXACT_ROWS) -> int:
    """The row count oneDNN sees for `rows` rows: `rows` up to `exact`, else the next multiple of 1/8
    of its power of two (65 -> 72, 129 -> 144, 520 -> 576): 8 shapes per doubling, < 1/8 padding."""
    if rows <= exact:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def prefill_positions(positions: int) -> int:
    """The rows a prefill forward of `positions` padded token positions gives each packed linear."""
    return padded_rows(positions, PREFILL_EXACT_ROWS)


def onednn_linear_available() -> bool:
    ops = torch.ops.mkldnn
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ packed [out, in] (oneDNN layout) + bias -> [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _bucketed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`_onednn_linear` on x [..., in] flattened to [rows, in] and zero-padded to `padded_rows` rows (a
    bounded set of shapes for oneDNN's caches); the padding rows' outputs are dropped."""
    lead, width = x.shape[:-1], x.shape[-1]
    rows = x.numel() // width if width else 0
    flat = x.reshape(rows, width)  # [rows, in]
    one_position = x.dim() < 3 or x.shape[-2] == 1  # [B, in] or [B, 1, in]
    target = padded_rows(rows, EXACT_ROWS if one_position else PREFILL_EXACT_ROWS)
    if target != rows:
        padded = flat.new_empty(target, width)  # [target, in]
        padded[:rows] = flat
        padded[rows:].zero_()
        flat = padded
    out = _onednn_linear(flat, packed, bias)  # [target, out]
    return out[:rows].view(*lead, out.shape[-1])


@torch.library.custom_op("adapterserve::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn_linear(x, packed, bias)


@onednn_linear_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


class PackedLinear(nn.Module):
    """`linear(x)` through oneDNN with the weight packed once. x: [..., in] -> [..., out]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _BATCH_HINT)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return onednn_linear_op(x, self.packed, self.linear.bias)  # static shapes already
        return _bucketed_linear(x, self.packed, self.linear.bias)


@functools.cache
def packs_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs `dtype` weights on this CPU. bfloat16 needs AVX-512 (bw, vl, dq) or
    AVX-NE-CONVERT; on an AVX2-only CPU the reorder raises, so such weights keep `F.linear`."""
    if dtype not in _DTYPES or not onednn_linear_available():
        return False
    try:
        with torch.no_grad():
            torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), _BATCH_HINT)
    except RuntimeError:
        return False
    return True


def can_pack(linear: nn.Module) -> bool:
    """A plain CPU nn.Linear in a dtype oneDNN packs here (quantized linears keep their own kernels)."""
    return (
        type(linear) is nn.Linear
        and linear.weight.device.type == "cpu"
        and not linear.weight.requires_grad
        and packs_dtype(linear.weight.dtype)
    )


def use_packed_linears(setting: str, device: torch.device) -> bool:
    """EngineSettings.cpu_linear: auto = oneDNN on a CPU where torch has it; onednn = required."""
    if setting == "torch" or device.type != "cpu":
        return False
    available = onednn_linear_available()
    if setting == "onednn" and not available:
        raise ValueError("cpu_linear='onednn' needs a torch build with oneDNN (mkldnn)")
    return available


def pack(linear: nn.Module) -> nn.Module:
    """`linear` as a PackedLinear if it can be packed, else unchanged."""
    return PackedLinear(linear) if can_pack(linear) else linear
