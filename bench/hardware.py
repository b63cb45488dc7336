"""What a decode step must read, and how fast the card could read it: the memory-bandwidth limit.

A decode step reads every weight once (the lm_head included; the input embedding table only for the
rows it looks up) plus each row's KV cache up to its length. The limit is those bytes divided by the
card's peak memory bandwidth; `fraction = (bytes / step_time) / peak`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Peak memory bandwidth (bytes/s) by a substring of torch.cuda.get_device_name(), most specific first.
# Vendor datasheet figures. Override with `adapterserve bench --peak-bandwidth-gbs`.
PEAK_BANDWIDTH: list[tuple[str, float]] = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # H100 SXM5 80GB HBM3
    ("GH200", 4.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),  # 40GB
    ("L40S", 0.864e12),
    ("L4", 0.3e12),
    ("A10G", 0.6e12),
    ("RTX 4090", 1.008e12),
]


@dataclass(frozen=True)
class PeakBandwidth:
    bytes_per_s: float
    source: str  # where the figure came from, printed beside every fraction


def peak_bandwidth(device: torch.device, override_gbs: float | None = None) -> PeakBandwidth | None:
    """The card's peak bandwidth (None on a CPU unless given, or for an unknown card)."""
    if override_gbs is not None:
        return PeakBandwidth(override_gbs * 1e9, f"--peak-bandwidth-gbs {override_gbs:g}")
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BANDWIDTH:
        if key in name:
            return PeakBandwidth(value, f"{name}: {value / 1e12:.3g} TB/s (datasheet)")
    return None


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quant_state_bytes(state: Any) -> int:
    """absmax (and the nested absmax) of a bitsandbytes 4-bit weight: read with the packed weight."""
    total = 0
    for name in ("absmax", "code"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            total += _tensor_bytes(t)
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every unique parameter and buffer once, except an input
    embedding table that the lm_head does not share (a lookup reads only the batch's rows)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen or (tensor is embed and not tied):
            continue
        seen.add(tensor.data_ptr())
        total += _tensor_bytes(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            total += _quant_state_bytes(state)
    return total


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one cached token holds across all layers."""
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class BandwidthUse:
    bytes_per_step: float  # weights + the KV the rows hold, averaged over decode steps
    achieved_bytes_per_s: float
    fraction_of_peak: float | None
    peak: str | None


def bandwidth_use(
    weight_bytes: int, mean_kv_bytes: float, step_seconds: float, peak: PeakBandwidth | None
) -> BandwidthUse:
    per_step = weight_bytes + mean_kv_bytes
    achieved = per_step / step_seconds if step_seconds > 0 else 0.0
    fraction = achieved / peak.bytes_per_s if peak is not None else None
    return BandwidthUse(per_step, achieved, fraction, peak.source if peak is not None else None)
