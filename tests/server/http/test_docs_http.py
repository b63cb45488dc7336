"""docs/http.md's `curl` and `openai` examples, run as written against a real server (only the
address and the base model's served name are swapped for the test server's)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from tests.clients.test_docs_examples import fenced_blocks
from tests.helpers.server_process import start_server

PAGE = Path(__file__).resolve().parents[3] / "docs" / "http.md"
DOC_URL = "http://127.0.0.1:8000"
DOC_BASE = "SmolLM2-135M-Instruct"


def test_http_page_examples_run(tiny_model_dir, tmp_path, capsys):
    server = start_server(
        tiny_model_dir,
        tmp_path / "store",
        extra_args=("--http-port", "0", "--demo-adapters", "--served-model-name", DOC_BASE),
    )
    try:
        url = server.http_url.removesuffix("/v1")
        markdown = PAGE.read_text()
        commands = [
            line[2:]
            for block in fenced_blocks(markdown, "console")
            for line in block.splitlines()
            if line[:2] == "$ "
        ]
        assert len(commands) == 6
        outputs = []
        for command in commands:
            argv = shlex.split(command.replace(DOC_URL, url))
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
            outputs.append(done.stdout)
        models = [m["id"] for m in json.loads(outputs[0])["data"]]
        assert models[0] == DOC_BASE and "demo-lora" in models
        assert json.loads(outputs[1])["choices"][0]["text"]
        assert json.loads(outputs[2])["usage"]["completion_tokens"] >= 1
        assert outputs[3].rstrip().endswith("data: [DONE]")
        assert json.loads(outputs[4])["error"]["code"] == "model_not_found"
        listed = json.loads(outputs[5])  # a list of two prompts, n 2
        assert [c["index"] for c in listed["choices"]] == [0, 1, 2, 3]
        assert listed["choices"][0]["text"] == listed["choices"][1]["text"]  # greedy: one text per prompt

        (python,) = fenced_blocks(markdown, "python")
        exec(compile(python.replace(DOC_URL, url), "docs/http.md", "exec"), {"__name__": "docs_http"})
        printed = capsys.readouterr().out  # random-weight text may hold newlines
        assert printed.startswith(f"['{DOC_BASE}', ")
        assert "completion_tokens=" in printed
    finally:
        assert server.stop() == 0
