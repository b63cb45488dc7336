"""Run the real `adapterserve serve` in a subprocess on loopback for the SDK and CLI tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_LISTENING = re.compile(r"adapterserve listening on [^:\s]+:(\d+) \(metrics on [^:\s]+:(\d+)\)")
_READY = "adapterserve ready on"


def free_port() -> int:
    """A loopback port that was free a moment ago (for tests that must know the port in advance)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    log_path: Path
    port: int = 0
    metrics_port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str | re.Pattern, timeout: float) -> re.Match | None:
        """Wait until the log matches `pattern`; raise with the log if the process died or time ran out."""
        deadline = time.monotonic() + timeout
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        while time.monotonic() < deadline:
            match = regex.search(self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"server log never matched {regex.pattern!r}:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in `timeout` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(
    model_dir: Path,
    workdir: Path,
    *,
    port: int = 0,
    admin_token: str | None = None,
    generate_token: str | None = None,
    extra_args: tuple[str, ...] = (),
    wait_ready: bool = True,
    timeout: float = 120.0,
) -> ServerProcess:
    """Start `python -m adapterserve.server.api.app` on the tiny model (CPU, no quantization).

    Returns once the gRPC port is bound (and, with `wait_ready`, once the model is loaded and warm).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_")}
    if admin_token:
        env["ADAPTERSERVE_ADMIN_TOKEN"] = admin_token
    if generate_token:
        env["ADAPTERSERVE_GENERATE_TOKEN"] = generate_token
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [
        sys.executable,
        "-m",
        "adapterserve.server.api.app",
        "--base-model",
        str(model_dir),
        "--quantize",
        "none",
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--store",
        str(workdir / "store"),
        "--grace",
        "5",
        *extra_args,
    ]
    log_path = workdir / f"server-{time.monotonic_ns()}.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    log_file.close()
    server = ServerProcess(proc=proc, log_path=log_path, env=env)
    try:
        match = server.wait_for(_LISTENING, timeout)
        assert match is not None
        server.port, server.metrics_port = int(match.group(1)), int(match.group(2))
        if wait_ready:
            server.wait_for(_READY, timeout)
    except BaseException:
        server.stop(5)
        raise
    return server
