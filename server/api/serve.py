"""The server's life: listen, load and warm, serve, drain on SIGTERM/SIGINT, exit.

1. Bind the gRPC port and start it with health NOT_SERVING (API calls get UNAVAILABLE), start the
   metrics endpoint, log "listening".
   With `http_port` set, the OpenAI-compatible HTTP API (api/http) starts too, over the same runtime,
   limits, metrics and lifecycle (it answers 503 until ready).
2. Build the runtime (load the base, open the store, start and warm the engine), then flip health to
   SERVING and log "ready".
3. On the first SIGTERM/SIGINT: health NOT_SERVING for good, new calls UNAVAILABLE, calls in flight
   get up to `grace_seconds` to finish; then running generations are cut (they end with UNAVAILABLE
   and the same message a new call gets), the gRPC server stops (cancelling what is left, which frees
   its engine work), the engine stops, and `run()` returns 0. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Any

from adapterserve.server.api.auth import AuthPolicy
from adapterserve.server.api.grpc.server import GrpcServer, build_grpc_server
from adapterserve.server.api.lifecycle import Lifecycle, Phase
from adapterserve.server.api.metrics import RuntimeSnapshot, ServerMetrics
from adapterserve.server.api.runtime import RuntimeFactory, RuntimeRef, StartedRuntime
from adapterserve.server.api.tls import describe as describe_tls
from adapterserve.server.api.tls import server_credentials
from adapterserve.server.errors import ServeError
from adapterserve.server.settings import ServerSettings

log = logging.getLogger("adapterserve.serve")

# How long the gRPC server itself waits for RPCs still running after the drain window.
FINAL_STOP_GRACE_S = 1.0


@dataclass(frozen=True)
class BoundPorts:
    grpc: int
    metrics: int
    http: int | None = None  # None: HTTP is off


class ServeApp:
    """One server process. `await app.run()` serves until a signal (or `request_stop()`) and returns 0."""

    def __init__(self, settings: ServerSettings, runtime_factory: RuntimeFactory | None = None) -> None:
        self.settings = settings
        self._factory = runtime_factory
        self.lifecycle = Lifecycle(settings.limits.max_concurrent_streams)
        self.metrics = ServerMetrics()
        self.runtime = RuntimeRef()
        self.ports: BoundPorts | None = None
        self._started: StartedRuntime | None = None
        self._grpc: GrpcServer | None = None
        self._http: Any = None  # http.server.HttpServer when settings.http_port is set
        self._stop = asyncio.Event()
        self._stop_requests = 0
        self._hurry = asyncio.Event()

    def policy(self) -> AuthPolicy:
        s = self.settings
        return AuthPolicy(
            admin_token=s.admin_token, generate_token=s.generate_token, insecure_admin=s.insecure_admin
        )

    def request_stop(self) -> None:
        """Begin the graceful shutdown (the signal handler calls this; a second call skips the grace)."""
        self._stop_requests += 1
        self._stop.set()
        if self._stop_requests > 1:
            self._hurry.set()

    def _snapshot(self) -> RuntimeSnapshot | None:
        return self._started.snapshot() if self._started is not None else None

    async def listen(self) -> BoundPorts:
        """Bind and start the gRPC server (NOT_SERVING) and the metrics endpoint."""
        s = self.settings
        if s.insecure_admin and not s.admin_token:
            log.warning(
                "--insecure-admin: admin calls (upload, delete, pin) are open to anyone who can connect"
            )
        elif not s.admin_token:
            log.warning("no ADAPTERSERVE_ADMIN_TOKEN set: admin calls will be refused")
        credentials = server_credentials(s.tls)  # ServeError for unreadable or mismatched files
        self._grpc = build_grpc_server(self.runtime, s.limits, self.policy(), self.metrics, self.lifecycle)
        address = f"{s.host}:{s.port}"
        try:
            port = (
                self._grpc.server.add_secure_port(address, credentials)
                if credentials is not None
                else self._grpc.server.add_insecure_port(address)
            )
        except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind ...")
            raise ServeError(f"could not bind the gRPC port {s.host}:{s.port} (in use?): {exc}") from None
        if port == 0:
            raise ServeError(f"could not bind the gRPC port {s.host}:{s.port} (in use?)")
        await self._grpc.set_serving(False)
        await self._grpc.server.start()
        self.metrics.attach_runtime(self._snapshot)
        try:
            metrics_port = self.metrics.serve_http(s.host, s.metrics_port)
        except OSError as exc:
            await self._grpc.server.stop(None)
            raise ServeError(
                f"could not bind the metrics port {s.host}:{s.metrics_port} (in use?): {exc}"
            ) from None
        try:
            http_port = await self._start_http()
        except ServeError:
            await self._grpc.server.stop(None)
            self.metrics.close()
            raise
        self.ports = BoundPorts(grpc=port, metrics=metrics_port, http=http_port)
        log.info("gRPC transport: %s", describe_tls(s.tls))
        log.info(
            "adapterserve listening on %s:%d (metrics on %s:%s); health NOT_SERVING until the model is warm",
            s.host,
            port,
            s.host,
            metrics_port,
        )
        if http_port is not None:
            log.info("adapterserve HTTP (OpenAI-compatible) listening on %s:%d", s.host, http_port)
        return self.ports

    async def _start_http(self) -> int | None:
        """Start the OpenAI-compatible HTTP API on the same runtime, limits, metrics and lifecycle."""
        s = self.settings
        if s.http_port is None:
            return None
        try:
            from adapterserve.server.api.http.admin import AdminHttp
            from adapterserve.server.api.http.app import build_http_app
            from adapterserve.server.api.http.server import HttpServer
            from adapterserve.server.api.http.service import OpenAIService
        except ImportError as exc:
            raise ServeError(
                f"HTTP needs the [http] extra (pip install 'adapterserve[http]'), or pass --no-http: {exc}"
            ) from None
        service = OpenAIService(self.runtime, s.limits, self.metrics, self.lifecycle, s.served_model_name)
        admin = AdminHttp(self.runtime, s.limits, self.lifecycle)
        app = build_http_app(service, self.policy(), self.metrics, self.lifecycle, admin)
        self._http = HttpServer(app, s.host, s.http_port, shutdown_grace_s=FINAL_STOP_GRACE_S, tls=s.tls)
        return await self._http.start()

    async def load(self) -> None:
        """Build the runtime and start serving."""
        factory = self._factory
        if factory is None:
            from adapterserve.server.api.wiring import start_runtime

            factory = start_runtime
        self._started = await factory(self.settings)
        self.runtime.set(self._started.runtime)
        self.lifecycle.phase = Phase.SERVING
        assert self._grpc is not None and self.ports is not None
        await self._grpc.set_serving(True)
        log.info("adapterserve ready on %s:%d", self.settings.host, self.ports.grpc)

    async def drain(self) -> None:
        """Stop accepting calls, let running ones finish within the grace period, stop everything."""
        self.lifecycle.phase = Phase.DRAINING
        if self._grpc is not None:
            await self._grpc.enter_draining()
        grace = self.settings.grace_seconds
        log.info(
            "draining: %d call(s) in flight, waiting up to %.1f s", self.lifecycle.calls_in_flight, grace
        )
        idle = asyncio.ensure_future(self.lifecycle.wait_idle(grace))
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({idle, hurry}, return_when=asyncio.FIRST_COMPLETED)
        hurried = hurry.done() and not idle.done()
        idle.cancel()
        hurry.cancel()
        if self.lifecycle.calls_in_flight:
            reason = (
                "second signal, not waiting any longer" if hurried else f"grace period of {grace:g} s over"
            )
            log.warning("%s: cancelling %d call(s) in flight", reason, self.lifecycle.calls_in_flight)
            # Running generations end with UNAVAILABLE and the drain message, not gRPC's bare cancel.
            self.lifecycle.cut()
            await self.lifecycle.wait_idle(FINAL_STOP_GRACE_S)
        if self._grpc is not None:
            await self._grpc.server.stop(FINAL_STOP_GRACE_S)
        if self._http is not None:
            await self._http.stop()
        if self._started is not None:
            await self._started.stop()
        self.metrics.close()
        log.info("adapterserve stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
                pass

    async def run(self, *, handle_signals: bool = True) -> int:
        """Listen, load, serve until asked to stop, drain. Returns the process exit code."""
        if handle_signals:
            self._install_signal_handlers()
        try:
            await self.listen()
        except ServeError as exc:
            log.error("startup failed: %s", exc)
            return 1
        loader = asyncio.ensure_future(self.load())
        stopper = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({loader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if loader.done() and loader.exception() is not None:
            exc = loader.exception()
            if isinstance(exc, ServeError):
                log.error("startup failed: %s", exc)
            else:
                log.error("startup failed", exc_info=exc)
            code = 1
        elif not loader.done():
            loader.cancel()
            log.info("stop requested while starting")
        else:
            await stopper
        stopper.cancel()
        await self.drain()
        return code
