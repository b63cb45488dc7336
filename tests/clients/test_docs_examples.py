"""The examples of docs/sdk.md and docs/cli.md, run verbatim against the real server.

Only the address in the SDK examples is swapped for the test server's; the CLI examples get it from
ADAPTERSERVE_TARGET, as the page says.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from tests.clients.conftest import ADMIN_TOKEN
from tests.clients.test_cli import run_cli

DOCS = Path(__file__).resolve().parents[2] / "docs"
DOC_ADDRESS = "127.0.0.1:50051"


def fenced_blocks(markdown: str, language: str) -> list[str]:
    """The bodies of the ```<language> fenced blocks, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", markdown, flags=re.S | re.M)


@pytest.fixture
def docs_cwd(tmp_path, monkeypatch, lora_dir) -> Path:
    """A working directory with `out/my-lora` (a LoRA directory), as the pages assume."""
    shutil.copytree(lora_dir, tmp_path / "out" / "my-lora")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_sdk_page_examples_run(server, docs_cwd, monkeypatch, capsys):
    monkeypatch.setenv("ADAPTERSERVE_ADMIN_TOKEN", ADMIN_TOKEN)
    blocks = fenced_blocks((DOCS / "sdk.md").read_text(), "python")
    assert len(blocks) >= 5
    namespace: dict[str, object] = {"__name__": "docs_sdk"}
    for block in blocks:
        exec(compile(block.replace(DOC_ADDRESS, server.target), "docs/sdk.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert out.startswith("SERVING\n")
    assert "NOT_FOUND adapter 'no-such-adapter'" in out
    assert "adapter_model.safetensors: " in out  # the progress callback ran


def test_cli_page_examples_run(server, docs_cwd):
    env = {"ADAPTERSERVE_TARGET": server.target, "ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    markdown = (DOCS / "cli.md").read_text()
    commands = [
        line[2:]
        for block in fenced_blocks(markdown, "console")
        for line in block.splitlines()
        if line.startswith("$ ")
    ]
    assert len(commands) >= 10
    for command in commands:
        text, _, comment = command.partition("  # ")
        expected = int(comment.split(":")[0].removeprefix("exit ")) if comment.startswith("exit ") else 0
        argv = shlex.split(text)
        assert argv[0] == "adapterserve"
        code, out, err = run_cli(*argv[1:], env=env)
        assert code == expected, f"{command!r}: exit {code}, stderr {err!r}"
        if "--json" in argv and code == 0:
            lines = out.splitlines() if "--stream" in argv else [out]
            assert all(json.loads(line) is not None for line in lines)


def test_cli_page_refusal_message_is_what_the_cli_prints(server, docs_cwd):
    markdown = (DOCS / "cli.md").read_text()
    documented = next(line for line in markdown.splitlines() if line.startswith("adapterserve upload: error"))
    old = docs_cwd / "out" / "old"
    shutil.copytree(docs_cwd / "out" / "my-lora", old)
    (old / "adapter_model.bin").write_bytes(b"\x80\x04K.")
    code, _, err = run_cli("upload", "out/old", "--name", "old", env={"ADAPTERSERVE_TARGET": server.target})
    assert code == 6
    assert err == documented + "\n"
