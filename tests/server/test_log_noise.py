"""A server start on a CPU with no quantization asked for logs no bitsandbytes WARNING about its optional
`kernels` package (PEFT imports bitsandbytes whenever it is installed); other bitsandbytes messages pass."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import logging
logging.basicConfig(level=logging.WARNING)
import adapterserve.server
import peft
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("another bitsandbytes warning")
"""


def test_the_kernels_probe_warning_is_dropped_and_nothing_else():
    pytest.importorskip("bitsandbytes")
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "gemm_4bit_forward" not in out.stderr
    assert "another bitsandbytes warning" in out.stderr
