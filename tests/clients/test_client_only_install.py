"""The client-only install: a fresh venv with the core dependencies only (no torch) talks to the server.

`pip install <project>` with the core dependencies (grpcio, protobuf, pydantic) into a venv created
without system site packages; then the SDK and the `adapterserve` script run there against the real
server, `import torch` fails there, and `adapterserve serve` says what is missing in one line.

Marked `client_install` (about a minute: a venv, a wheel build, installs from the package registry).
Skipped when ADAPTERSERVE_SKIP_CLIENT_INSTALL=1 or when the registry cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.clients.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.client_install

REPO = Path(__file__).resolve().parents[2]
SOURCE_ITEMS = ("pyproject.toml", "README.md", "clients", "server", "training", "bench", "proto")
OFFLINE_HINTS = (
    "No matching distribution",
    "Could not find a version",
    "NewConnectionError",
    "Network is unreachable",
)

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, json, sys
    import adapterserve
    from adapterserve import AsyncClient, Client

    target, token = sys.argv[1], sys.argv[2]
    report = {"torch_importable": importlib.util.find_spec("torch") is not None,
              "torch_loaded": "torch" in sys.modules}
    with Client(target, admin_token=token) as c:
        report["health"] = c.health().status
        r = c.generate("The capital of France is", max_new_tokens=5, ignore_eos=True)
        report["generate_tokens"] = r.generated_tokens
        report["stream_ids"] = [t for ch in c.stream("The capital of France is", max_new_tokens=5, ignore_eos=True)
                                for t in ch.token_ids]
        report["generate_ids"] = r.token_ids
        report["adapters"] = [a.name for a in c.list_adapters()]
        try:
            c.get_adapter("no-such-adapter")
        except adapterserve.NotFound as err:
            report["not_found"] = err.code

    async def run_async():
        async with AsyncClient(target) as ac:
            return [ch.index async for ch in ac.stream("hello", max_new_tokens=3, ignore_eos=True)]

    report["async_indices"] = asyncio.run(run_async())
    report["torch_loaded_after"] = "torch" in sys.modules
    print(json.dumps(report))
    """
)


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    if os.environ.get("ADAPTERSERVE_SKIP_CLIENT_INSTALL") == "1":
        pytest.skip("ADAPTERSERVE_SKIP_CLIENT_INSTALL=1")
    root = tmp_path_factory.mktemp("client-only")
    src = root / "src"
    src.mkdir()
    for item in SOURCE_ITEMS:
        path = REPO / item
        if path.is_dir():
            shutil.copytree(path, src / item, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif path.exists():
            shutil.copy2(path, src / item)
    if not (src / "README.md").exists():
        (src / "README.md").write_text("adapterserve\n")
    venv = root / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    made = _run([base_python, "-m", "venv", str(venv)], env)
    assert made.returncode == 0, made.stderr
    installed = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(src)], env)
    if installed.returncode != 0 and any(h in installed.stdout + installed.stderr for h in OFFLINE_HINTS):
        pytest.skip(f"package registry not reachable: {installed.stderr[-500:]}")
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-4000:]
    return venv


def _venv_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTERSERVE_") and k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def test_core_install_has_no_torch_and_only_core_dependencies(client_venv):
    frozen = _run(
        [str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"], _venv_env(client_venv)
    )
    names = {p["name"].lower().replace("_", "-") for p in json.loads(frozen.stdout)}
    assert {"adapterserve", "grpcio", "protobuf", "pydantic"} <= names
    assert not names & {"torch", "transformers", "peft", "grpcio-health-checking", "prometheus-client"}


def test_sdk_in_client_only_venv_talks_to_the_server(client_venv, server, tmp_path):
    script = tmp_path / "client_check.py"
    script.write_text(CLIENT_SCRIPT)
    done = _run(
        [str(client_venv / "bin" / "python"), str(script), server.target, ADMIN_TOKEN],
        {**_venv_env(client_venv)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["torch_importable"] is False
    assert report["torch_loaded"] is False and report["torch_loaded_after"] is False
    assert report["health"] == "SERVING"
    assert report["generate_tokens"] == 5 and report["stream_ids"] == report["generate_ids"]
    assert isinstance(report["adapters"], list)
    assert report["not_found"] == "NOT_FOUND"
    assert report["async_indices"] == list(range(len(report["async_indices"])))


def test_cli_in_client_only_venv(client_venv, server):
    env = {
        **_venv_env(client_venv),
        "ADAPTERSERVE_TARGET": server.target,
        "ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    exe = str(client_venv / "bin" / "adapterserve")
    gen = _run([exe, "generate", "hello", "-n", "3", "--ignore-eos", "--json"], env, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["generated_tokens"] == 3
    listed = _run([exe, "adapters", "list", "--json"], env, timeout=120)
    assert listed.returncode == 0 and isinstance(json.loads(listed.stdout), list)
    # `serve` needs torch & co: one line saying what to install, exit 10, no traceback.
    refused = _run([exe, "serve", "--port", "0"], env, timeout=120)
    assert refused.returncode == 10, refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert "adapterserve[server]" in refused.stderr
