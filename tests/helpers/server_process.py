"""Run the real `adapterserve serve` in a subprocess on a loopback port, for end-to-end tests (the
server API tests and the SDK/CLI tests share it).

    server = start_server(tiny_model_dir, tmp_path / "store", env={"ADAPTERSERVE_ADMIN_TOKEN": "t"})
    channel = grpc.insecure_channel(server.target)
    ...
    assert server.stop() == 0          # SIGTERM, graceful drain, exit code

The server is started with `--port 0` (or a given port) and `--metrics-port 0`; the harness reads the bound ports from the
"listening on" log line and waits for the "ready on" line (or only for listening, `wait_ready=False`).
The whole server log is kept in `server.log_path` and shown when a wait fails.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

LISTENING = re.compile(
    r"adapterserve listening on (?P<host>[^\s:]+):(?P<port>\d+) \(metrics on [^\s:]+:(?P<metrics>\d+)\)"
)
READY = re.compile(r"adapterserve ready on ")
HTTP_LISTENING = re.compile(r"adapterserve HTTP \(OpenAI-compatible\) listening on [^\s:]+:(?P<port>\d+)")
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A loopback port that was free a moment ago (for tests that must know the port in advance)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server subprocess and what its log said."""

    proc: subprocess.Popen
    log_path: Path
    host: str = "127.0.0.1"
    port: int = 0
    metrics_port: int = 0
    http_port: int | None = None  # with extra_args ("--http-port", "0")
    _lines: list[str] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """The OpenAI-compatible API's base URL (`.../v1`); the server must have been started with HTTP."""
        assert self.http_port is not None, "start the server with extra_args=('--http-port', '0')"
        return f"http://{self.host}:{self.http_port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def log_text(self) -> str:
        with self._cond:
            return "".join(self._lines)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("a", encoding="utf-8") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first log match of `pattern`; raises with the log if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self._lines:
                    match = pattern.search(line)
                    if match:
                        return match
                if self.proc.poll() is not None and not self._pump_alive():
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{''.join(self._lines)}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {pattern.pattern!r} in the server log:\n{''.join(self._lines)}")
                self._cond.wait(min(left, 0.5))

    def _pump_alive(self) -> bool:
        return any(t.name == f"server-log-{self.proc.pid}" and t.is_alive() for t in threading.enumerate())

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait for the exit code (SIGKILL if it does not exit in time)."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise


def server_command(
    model_dir: Path, store_dir: Path, extra_args: Iterable[str] = (), port: int = 0
) -> list[str]:
    args = list(extra_args)
    if "--http-port" not in args and "--no-http" not in args:
        args.append("--no-http")  # never the default port 8000: tests run side by side
    return [
        sys.executable,
        "-m",
        "adapterserve.server.api.app",
        "--base-model",
        str(model_dir),
        "--quantize",
        "none",
        "--device",
        "cpu",
        "--store",
        str(store_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        *args,
    ]


def start_server(
    model_dir: Path,
    store_dir: Path,
    *,
    extra_args: Iterable[str] = (),
    port: int = 0,
    env: Mapping[str, str] | None = None,
    wait_ready: bool = True,
    timeout: float = 180.0,
    log_path: Path | None = None,
    unset_env: Iterable[str] = (),
    new_session: bool = False,
    preexec_fn: Callable[[], None] | None = None,
) -> ServerProcess:
    """Start the server subprocess; return once it listens (and, with `wait_ready`, is ready).
    `unset_env`: variables removed from its environment (OMP_NUM_THREADS=1 is set unless removed);
    `new_session`: in a session of its own; `preexec_fn`: run in the child before the server starts."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_")}
    environ.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    environ.update(env or {})
    for name in unset_env:
        environ.pop(name, None)
    log_path = log_path or Path(store_dir).parent / f"server-{time.monotonic_ns()}.log"
    server_args = list(extra_args)
    proc = subprocess.Popen(
        server_command(model_dir, store_dir, server_args, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ,
        cwd=REPO_ROOT,
        start_new_session=new_session,
        preexec_fn=preexec_fn,
    )
    server = ServerProcess(proc=proc, log_path=log_path)
    threading.Thread(target=server._pump, name=f"server-log-{proc.pid}", daemon=True).start()
    try:
        match = server.wait_for(LISTENING, timeout)
        server.host, server.port, server.metrics_port = (
            match["host"],
            int(match["port"]),
            int(match["metrics"]),
        )
        if "--http-port" in server_args:
            server.http_port = int(server.wait_for(HTTP_LISTENING, timeout)["port"])
        if wait_ready:
            server.wait_for(READY, timeout)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        raise
    return server
