"""The `adapterserve` CLI against the real server: output for people, --json for scripts, exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from adapterserve import cli
from tests.clients.conftest import ADMIN_TOKEN, MAX_UPLOAD_BYTES


def run_cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `adapterserve ARGV` in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("ADAPTERSERVE_")]:
            del os.environ[key]
        os.environ.update(env or {})
        code = cli.main(list(argv), out=out, err=err)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def env(server) -> dict[str, str]:
    return {"ADAPTERSERVE_TARGET": server.target, "ADAPTERSERVE_ADMIN_TOKEN": ADMIN_TOKEN}


def test_generate_plain_json_and_stream(env):
    code, out, err = run_cli(
        "generate", "The capital of France is", "-n", "6", "--ignore-eos", "--json", env=env
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["generated_tokens"] == 6 and len(result["token_ids"]) == 6
    assert result["finish_reason"] == "length"

    code, text_out, _ = run_cli("generate", "The capital of France is", "-n", "6", "--ignore-eos", env=env)
    assert code == 0 and text_out == result["text"] + "\n"

    code, stream_out, _ = run_cli(
        "generate", "The capital of France is", "-n", "6", "--ignore-eos", "--stream", env=env
    )
    assert code == 0 and stream_out == result["text"] + "\n"

    code, lines, err = run_cli(
        "generate", "The capital of France is", "-n", "6", "--ignore-eos", "--stream", "--json", "-v", env=env
    )
    chunks = [json.loads(line) for line in lines.splitlines()]
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert [t for c in chunks for t in c["token_ids"]] == result["token_ids"]
    assert chunks[-1]["finish_reason"] == "length"
    assert "finish_reason=length" in err and "generated_tokens=6" in err


def test_generate_chat_and_messages_file(env, tmp_path):
    code, out, _ = run_cli(
        "generate", "hi", "--chat", "--system", "be brief", "-n", "3", "--ignore-eos", "--json", env=env
    )
    assert code == 0
    via_flags = json.loads(out)
    messages = tmp_path / "chat.json"
    messages.write_text(
        json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    )
    code, out, _ = run_cli(
        "generate", "--messages", str(messages), "-n", "3", "--ignore-eos", "--json", env=env
    )
    assert code == 0
    assert json.loads(out)["token_ids"] == via_flags["token_ids"]
    assert via_flags["prompt_tokens"] > 3


def test_upload_and_adapters_commands(env, lora_dir, name):
    code, out, err = run_cli(
        "upload", str(lora_dir), "--name", name, "--description", "cli test", "--json", env=env
    )
    assert code == 0, err
    uploaded = json.loads(out)
    assert uploaded["adapter"]["name"] == name and uploaded["adapter"]["kind"] == "lora"
    assert "100.0%" in err  # the progress bar's final line

    code, out, _ = run_cli("adapters", "list", "--json", env=env)
    assert code == 0
    assert name in [a["name"] for a in json.loads(out)]
    code, table, _ = run_cli("adapters", "list", "--prefix", name, env=env)
    header, row = table.splitlines()
    assert header.split()[:4] == ["NAME", "KIND", "PEFT_TYPE", "SHAPE"]
    assert row.split()[:4] == [name, "lora", "LORA", "r=4"]

    code, out, _ = run_cli("adapters", "show", name, "--json", env=env)
    assert code == 0 and json.loads(out)["description"] == "cli test"
    code, out, _ = run_cli("adapters", "show", name, env=env)
    assert "target_modules" in out and "adapter_model.safetensors" in out

    code, out, _ = run_cli("adapters", "pin", name, "--json", env=env)
    assert code == 0 and json.loads(out)["pinned"] is True
    code, out, _ = run_cli("adapters", "unpin", name, env=env)
    assert code == 0 and out == f"unpinned adapter '{name}' (version 1)\n"

    code, out, err = run_cli("upload", str(lora_dir), "--name", name, "-q", env=env)
    assert code == cli.EXIT_EXISTS
    assert "ALREADY_EXISTS" in err and "--overwrite" in err and len(err.splitlines()) == 1
    code, out, _ = run_cli("upload", str(lora_dir), "--name", name, "--overwrite", "-q", env=env)
    assert code == 0 and out.startswith(f"replaced adapter '{name}' version 2")

    code, out, _ = run_cli("generate", "hello", "--adapter", name, "-n", "2", "--json", env=env)
    assert code == 0 and json.loads(out)["adapter"] == name

    code, out, _ = run_cli("adapters", "delete", name, env=env)
    assert code == 0 and out.startswith(f"deleted adapter '{name}'")
    code, _, err = run_cli("adapters", "show", name, env=env)
    assert code == cli.EXIT_NOT_FOUND and "NOT_FOUND" in err and name in err


def test_refused_uploads_print_why(env, lora_dir, tmp_path, name):
    pickled = tmp_path / "pickled"
    shutil.copytree(lora_dir, pickled)
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K.")
    code, out, err = run_cli("upload", str(pickled), "--name", name, env=env)
    assert code == cli.EXIT_INVALID and out == ""
    assert err.startswith("adapterserve upload: error (INVALID_ARGUMENT):")
    assert "adapter_model.bin" in err and "safetensors" in err

    unsupported = tmp_path / "unsupported"
    shutil.copytree(lora_dir, unsupported)
    (unsupported / "adapter_config.json").write_text('{"peft_type": "LOHA", "task_type": "CAUSAL_LM"}')
    code, _, err = run_cli("upload", str(unsupported), "--name", name, "-q", env=env)
    assert code == cli.EXIT_INVALID and "LOHA" in err

    big = tmp_path / "big"
    shutil.copytree(lora_dir, big)
    (big / "adapter_model.safetensors").write_bytes(b"\0" * (MAX_UPLOAD_BYTES + 1))
    code, _, err = run_cli("upload", str(big), "--name", name, "-q", env=env)
    assert code == cli.EXIT_EXHAUSTED and "max_upload_bytes" in err


def test_exit_codes_for_auth_args_and_unreachable(env, server):
    no_token = {"ADAPTERSERVE_TARGET": server.target}
    code, _, err = run_cli("adapters", "list", env=no_token)
    assert code == cli.EXIT_AUTH and "UNAUTHENTICATED" in err
    code, _, err = run_cli("adapters", "list", "--admin-token", "wrong", env=no_token)
    assert code == cli.EXIT_AUTH and "PERMISSION_DENIED" in err
    code, _, err = run_cli("adapters", "list", "--target", server.target, "--admin-token", ADMIN_TOKEN)
    assert code == 0
    code, _, err = run_cli("generate", "hi", "--temperature", "-1", env=env)
    assert code == cli.EXIT_INVALID and "temperature" in err
    code, _, err = run_cli("generate", "hi", "--adapter", "no-such-adapter", env=env)
    assert code == cli.EXIT_NOT_FOUND
    code, _, err = run_cli("generate", "hi", "--target", "127.0.0.1:1", "--retries", "0", "--timeout", "5")
    assert code == cli.EXIT_UNAVAILABLE and "UNAVAILABLE" in err
    code, _, err = run_cli("generate", "hi", "-n", "48", "--ignore-eos", "--timeout", "0.001", env=env)
    assert code == cli.EXIT_DEADLINE
    code, _, _ = run_cli("generate", env=env)
    assert code == cli.EXIT_INVALID
    code, _, _ = run_cli("adapters", "frobnicate", env=env)
    assert code == cli.EXIT_USAGE


def test_health_and_info(env):
    code, out, _ = run_cli("health", "--json", env=env)
    assert code == 0 and json.loads(out) == {"service": "", "status": "SERVING"}
    code, out, _ = run_cli("info", "--json", env=env)
    assert code == 0 and json.loads(out)["limits"]["max_upload_bytes"] == MAX_UPLOAD_BYTES
    code, out, _ = run_cli("info", env=env)
    assert code == 0 and "model_type" in out


def test_console_script_exit_codes(env, server):
    """The installed `adapterserve` script itself (a real process, real exit status)."""
    exe = shutil.which("adapterserve", path=os.path.dirname(sys.executable))
    assert exe is not None
    full_env = {**os.environ, **env}
    done = subprocess.run(
        [exe, "adapters", "show", "no-such-adapter"], env=full_env, capture_output=True, text=True
    )
    assert done.returncode == cli.EXIT_NOT_FOUND
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    done = subprocess.run([exe, "health"], env=full_env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "SERVING\n"
