"""The adapterserve server (`adapterserve.server`): engine, adapters, store, CPU control and the APIs.

One log line is dropped here, before anything imports bitsandbytes (PEFT imports it whenever it is
installed, quantization asked for or not): bitsandbytes' CPU backend tries the optional `kernels`
package for a faster 4-bit GEMM and, without it, logs the WARNING "Failed to load CPU gemm_4bit_forward
from kernels-community: No module named 'kernels'" and uses its own kernel. That is no fault of the
server's, and `kernels` fetches its code from a model hub at run time, so the advice cannot be followed
offline. Every other bitsandbytes message passes.
"""

import logging


class _KernelsProbeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_KernelsProbeFilter())
