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
weights changed afterwards (training) are not seen, which is why `EngineSettings.cpu.linear` exists
and training's evaluation engines use `torch`.

Under `torch.compile` (`compile_decode`) the call goes through a custom op, `adapterserve::onednn_linear`,
that inductor runs as an opaque kernel: inductor's own lowering of `mkldnn._linear_pointwise` accepts
only the weights it packed itself (frozen constants) and failed on ours, which silently turned compilation
off. Eager calls skip the custom op's dispatch and call oneDNN directly.

Memory: oneDNN makes a primitive per input shape, and two caches keep them (torch's ideep cache and
oneDNN's own primitive cache, 1,024 entries each): measured ~0.55 MB per shape and weight shape (JIT
code and the like, whatever the weight's size), ~1.3 ms to make one. Prefill row counts (rows x padded
prompt length) take hundreds of values, so a server fed prompts of many lengths grew by ~190 MB and kept
it (the soak, tests/reliability/test_soak.py). Eager calls therefore reach oneDNN as 2-D inputs whose row count is
`padded_rows`: one position per row (decode, the lm_head) keeps its row count up to EXACT_ROWS (padding
a decode batch would cost time on every step); several positions per row (prefill) keep it up to
PREFILL_EXACT_ROWS; above those, rows round up to one of 8 sizes per doubling (at most 1/8 more rows).

Which kernel, measured (`cpu.linear="auto"`, the default): oneDNN is not faster everywhere. On the
AVX2-only development VM (the AVX-512 one above has since gone), one thread: at 128 rows (a prefill)
`F.linear` was 10-15% faster than the packed weights on every shape of the embedded model, at 16 rows
(a decode step) oneDNN 6-14% faster on the MLP and square shapes but 34% slower on the narrow k/v
projections (576 -> 192). So each weight shape is timed once per process, on one thread (a prefill
worker's and a contended decode step's setting), with its own weight at a few rows and at many
(`LinearRoute`): oneDNN unless `F.linear` is at least 5% faster. A shape that `F.linear` wins at both is
not packed at all (no second copy of its weight); calls that go to `F.linear` are not padded (its BLAS
keeps no per-shape state). `cpu.linear="onednn"` packs everything and always uses oneDNN, as before.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.bfloat16)
_BATCH_HINT = 64  # rows the reorder is tuned for; any row count works
EXACT_ROWS = 64  # one position per row (decode): row counts up to this reach oneDNN as they are
PREFILL_EXACT_ROWS = 16  # several positions per row (prefill): up to this
MANY_ROWS = 32  # calls of at least this many rows take LinearRoute.many_rows_onednn, fewer few_rows_onednn
FEW_ROWS_PROBE, MANY_ROWS_PROBE = 16, 128  # the row counts each route is timed at (a decode step, a prefill)
F_LINEAR_MARGIN = 0.95  # F.linear is chosen when it takes at most this fraction of oneDNN's time


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


@dataclass(frozen=True)
class LinearRoute:
    """Which kernel a CPU linear runs: oneDNN (packed weight) or F.linear, for calls of fewer than
    MANY_ROWS rows (decode steps) and of more (prefill chunks)."""

    few_rows_onednn: bool = True
    many_rows_onednn: bool = True

    @property
    def packs(self) -> bool:
        return self.few_rows_onednn or self.many_rows_onednn

    def onednn_for(self, rows: int) -> bool:
        return self.many_rows_onednn if rows >= MANY_ROWS else self.few_rows_onednn


ALWAYS_ONEDNN = LinearRoute()


def _best_seconds(fn: Callable[[], object], reps: int) -> float:
    """The fastest of `reps` calls (after one untimed): the least disturbed by other processes."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _onednn_seconds_over_f_linear(weight: torch.Tensor, packed: torch.Tensor, rows: int) -> float:
    """oneDNN's time over F.linear's for x [rows, in] @ weight [out, in], on the calling thread."""
    x = torch.ones(rows, weight.shape[1], dtype=weight.dtype)  # values do not change the time; the
    # process's random generator is left alone (randn here shifted every seeded draw after an engine start)
    reps = 5 if weight.numel() * rows < 2**27 else 2  # ~10 ms a call at most on a CPU core for 5 reps
    onednn = f_linear = float("inf")
    for _ in range(2):  # alternated, so a slow moment of the machine hits both
        onednn = min(onednn, _best_seconds(lambda: _onednn_linear(x, packed, None), reps))
        f_linear = min(f_linear, _best_seconds(lambda: F.linear(x, weight), reps))
    return onednn / f_linear


_routes: dict[tuple[int, int, torch.dtype], LinearRoute] = {}
_routes_lock = threading.Lock()


def measured_route(linear: nn.Linear) -> LinearRoute:
    """The route for `linear`'s weight shape, timed once per process on a thread of one intra-op
    thread (its weight, random inputs; ~0.5 s for the embedded model's five shapes)."""
    weight = linear.weight.detach()
    key = (weight.shape[0], weight.shape[1], weight.dtype)
    with _routes_lock:
        if key not in _routes:
            _routes[key] = _time_route(weight)
        return _routes[key]


def _time_route(weight: torch.Tensor) -> LinearRoute:
    from adapterserve.server.cpu.omp_pools import set_thread_threads

    ratios: dict[int, float] = {}

    def probe() -> None:
        try:
            set_thread_threads(1)
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, _BATCH_HINT)
                for rows in (FEW_ROWS_PROBE, MANY_ROWS_PROBE):
                    ratios[rows] = _onednn_seconds_over_f_linear(weight, packed, rows)
        except Exception:  # a probe that cannot run must not stop the engine: oneDNN, as before
            log.warning(
                "timing the CPU linear %s failed; it runs on oneDNN", tuple(weight.shape), exc_info=True
            )

    thread = threading.Thread(target=probe, name="adapterserve-linear-probe")
    thread.start()
    thread.join()
    if len(ratios) < 2:
        return ALWAYS_ONEDNN
    # oneDNN time / F.linear time above 1/margin: F.linear is at least (1 - margin) faster
    return LinearRoute(
        few_rows_onednn=ratios[FEW_ROWS_PROBE] * F_LINEAR_MARGIN <= 1.0,
        many_rows_onednn=ratios[MANY_ROWS_PROBE] * F_LINEAR_MARGIN <= 1.0,
    )


def describe_routes() -> str:
    """The routes measured so far in this process, for the start-up log: "in->out: kernel(s)"."""

    def kernels(route: LinearRoute) -> str:
        few, many = ("oneDNN" if r else "F.linear" for r in (route.few_rows_onednn, route.many_rows_onednn))
        return few if few == many else f"{few} below {MANY_ROWS} rows, {many} from {MANY_ROWS}"

    with _routes_lock:
        items = sorted(_routes.items(), key=lambda item: (item[0][:2], str(item[0][2])))
        return "; ".join(f"{i}->{o} {str(d).removeprefix('torch.')}: {kernels(r)}" for (o, i, d), r in items)


class PackedLinear(nn.Module):
    """`linear(x)` through oneDNN with the weight packed once, or through F.linear where `route` says
    that is faster for the call's row count. x: [..., in] -> [..., out]."""

    def __init__(self, linear: nn.Linear, route: LinearRoute = ALWAYS_ONEDNN):
        super().__init__()
        self.linear = linear
        self.route = route
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
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not self.route.onednn_for(rows):
            return F.linear(x, self.linear.weight, self.linear.bias)
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
    """EngineSettings.cpu.linear: auto = oneDNN on a CPU where torch has it, per shape where measured
    faster (`measured_route`); onednn = required, everywhere."""
    if setting == "torch" or device.type != "cpu":
        return False
    available = onednn_linear_available()
    if setting == "onednn" and not available:
        raise ValueError("cpu.linear='onednn' (--cpu-linear onednn) needs a torch build with oneDNN (mkldnn)")
    return available


def pack(linear: nn.Module, setting: str = "onednn") -> nn.Module:
    """`linear` as a PackedLinear if it can be packed (and, with setting "auto", if oneDNN is measured
    faster for its shape at some row count), else unchanged."""
    if not can_pack(linear):
        return linear
    route = measured_route(linear) if setting == "auto" else ALWAYS_ONEDNN
    return PackedLinear(linear, route) if route.packs else linear
