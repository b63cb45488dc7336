"""Run the HTTP app with uvicorn inside the server's own event loop (one process, one engine).

The socket is bound by us (so `--http-port 0` can pick a free port and report it); uvicorn's own
signal handling is switched off, because `ServeApp` owns SIGTERM/SIGINT and drains gRPC and HTTP
together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn

from adapterserve.server.errors import ServeError
from adapterserve.server.settings import TlsSettings

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 30.0
# How long an idle keep-alive connection stays open. uvicorn's default, 5 s, is shorter than the idle
# timeouts of common client pools (aiohttp's 15 s; a load balancer's 60 s, AWS ALB's default): a client
# reusing a connection the server is closing at that moment gets "Can not write request body" (seen with
# AIPerf, which runs on aiohttp, on the first request after its warm-up phase). Longer than the clients'
# timeouts, the client always closes first.
KEEP_ALIVE_S = 65


class _InLoopServer(uvicorn.Server):
    """uvicorn.Server that leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    """An ASGI app served on host:port by uvicorn in the running event loop."""

    def __init__(
        self, app: Any, host: str, port: int, *, shutdown_grace_s: float = 1.0, tls: TlsSettings | None = None
    ) -> None:
        self._app = app
        self._tls = tls
        self._host = host
        self._port = port
        self._grace = shutdown_grace_s
        self._server: _InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    def _tls_options(self) -> dict[str, Any]:
        """uvicorn's TLS options from the server's TlsSettings (the same certificate as gRPC)."""
        tls = self._tls
        if tls is None or not tls.enabled:
            return {}
        options: dict[str, Any] = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
        if tls.client_ca_file is not None:
            options.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise ServeError(
                f"could not bind the HTTP port {self._host}:{self._port} (in use?): {exc}"
            ) from None
        sock.listen(1024)
        sock.setblocking(False)
        return sock

    async def start(self) -> int:
        """Bind, start serving, return the bound port."""
        sock = self._bind()
        port = int(sock.getsockname()[1])
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(int(round(self._grace)), 1),
            timeout_keep_alive=KEEP_ALIVE_S,
            **self._tls_options(),
        )
        self._server = _InLoopServer(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise ServeError("the HTTP server stopped while starting")
            if asyncio.get_running_loop().time() > deadline:
                raise ServeError("the HTTP server did not start in time")
            await asyncio.sleep(0.01)
        return port

    async def stop(self) -> None:
        """Close the listener, give open responses the grace period, then close what is left."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        except Exception:  # a failed shutdown must not stop the rest of the drain
            log.exception("HTTP server shutdown failed")
        self._server = None
        self._task = None
