"""An adapterserve server inside the training process, for `--stage grpo` without `--rollout-server`.

The whole server (engine, store, gRPC API) runs on its own thread and event loop, bound to 127.0.0.1 on
a free port, with a temporary store; rollouts and weight pushes reach it through the same gRPC calls as
a remote server's, so both paths are one. It loads its own copy of the base (the trainer's copy carries
the trainable adapter layers).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from pathlib import Path

from adapterserve.training.errors import TrainingError

log = logging.getLogger(__name__)


class LocalServer:
    """`with LocalServer(base_model, device) as target:` a served engine at `target` ("127.0.0.1:port")."""

    def __init__(
        self,
        base_model: str | None,
        device: str | None,
        *,
        max_batch_size: int = 64,
        max_new_tokens: int = 256,
        max_n: int = 16,
        start_timeout: float = 300.0,
    ) -> None:
        from adapterserve.server.settings import EngineSettings, LimitSettings, ServerSettings

        self._tmp = tempfile.TemporaryDirectory(prefix="adapterserve-grpo-store-")
        self.settings = ServerSettings(
            base_model=base_model,
            device=device,
            quantize="none",
            store=Path(self._tmp.name),
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            http_port=None,
            insecure_admin=True,
            grace_seconds=1.0,
            engine=EngineSettings(max_batch_size=max_batch_size),
            limits=LimitSettings(max_new_tokens=max_new_tokens, max_n=max_n),
        )
        self.start_timeout = start_timeout
        self._app = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.target: str | None = None

    def start(self) -> str:
        from adapterserve.server.api.lifecycle import Phase
        from adapterserve.server.api.serve import ServeApp

        app = self._app = ServeApp(self.settings)

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(app.run(handle_signals=False))
            except BaseException as exc:  # reported by start()/stop()
                self._error = exc
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="adapterserve-local-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while app.lifecycle.phase is not Phase.SERVING:
            if not self._thread.is_alive():
                raise TrainingError(f"the in-process rollout server did not start: {self._error}")
            if time.monotonic() > deadline:
                self.stop()
                raise TrainingError(
                    f"the in-process rollout server was not serving after {self.start_timeout} s"
                )
            time.sleep(0.05)
        assert app.ports is not None
        self.target = f"127.0.0.1:{app.ports.grpc}"
        log.info("in-process rollout server on %s", self.target)
        return self.target

    def stop(self) -> None:
        if self._app is not None and self._loop is not None and self._thread is not None:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._app.request_stop)
            self._thread.join(timeout=60)
        self._tmp.cleanup()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
