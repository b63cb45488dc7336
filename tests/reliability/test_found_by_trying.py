"""What a new user tripped on when first trying the project, each pinned by a test against the real server or CLI."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from adapterserve import AsyncClient, Client, cli
from adapterserve.errors import AdapterServeError, AlreadyExists, InvalidArgument
from adapterserve.retry import RetryPolicy
from tests.reliability.conftest import ADMIN_TOKEN, metric_sum, scrape

pytestmark = pytest.mark.timeout(240)

NO_RETRY = RetryPolicy(max_attempts=1)
# A port nothing listens on: a client-side refusal must come before any connection attempt.
NOWHERE = "127.0.0.1:1"

# (keyword arguments, the field the error must name): values the wire cannot carry.
NUMERIC_CASES = [
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"max_new_tokens": 1 << 32}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"top_k": -1}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 1 << 64}, "seed"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 1e39}, "top_p"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"stop": ["ok", 3]}, "stop[1]"),
    ({"adapter": 7}, "adapter"),
]


@pytest.mark.parametrize(("kwargs", "field"), NUMERIC_CASES)
def test_sdk_refuses_unsendable_values_with_its_own_error(kwargs, field):
    with Client(NOWHERE, retry=NO_RETRY, timeout=5) as client:
        for call in (client.generate, lambda p, **kw: list(client.stream(p, **kw))):
            with pytest.raises(InvalidArgument) as info:
                call("hello", **kwargs)
            assert isinstance(info.value, AdapterServeError)
            assert info.value.code == "INVALID_ARGUMENT"
            assert info.value.message.startswith(field + ":"), info.value.message


async def test_async_sdk_refuses_unsendable_values_with_its_own_error():
    async with AsyncClient(NOWHERE, retry=NO_RETRY, timeout=5) as client:
        for kwargs, field in NUMERIC_CASES:
            with pytest.raises(InvalidArgument) as info:
                await client.generate("hello", **kwargs)
            assert info.value.message.startswith(field + ":")


def test_server_answers_values_in_wire_range_but_out_of_its_range(shared):
    with Client(shared.target, retry=NO_RETRY, timeout=30) as client:
        for kwargs, field in (
            ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
            ({"max_new_tokens": 65}, "sampling.max_new_tokens"),
            ({"temperature": -1.0}, "sampling.temperature"),
            ({"top_p": 0.0}, "sampling.top_p"),
        ):
            with pytest.raises(InvalidArgument) as info:
                client.generate("hello", **kwargs)
            assert info.value.message.startswith(field), info.value.message
        with pytest.raises(InvalidArgument) as info:
            client.generate("hello", max_new_tokens=65)
        assert "--max-new-tokens" in info.value.message


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_missing_token_error_names_the_one_flag_the_command_needs(shared, monkeypatch):
    monkeypatch.delenv("ADAPTERSERVE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("ADAPTERSERVE_TOKEN", raising=False)
    # The admin token passed with the generation flag: the server sees no admin token.
    code, _, err = run_cli(
        "adapters", "list", "--target", shared.target, "--token", ADMIN_TOKEN, "--retries", "0"
    )
    assert code == cli.EXIT_AUTH
    assert "pass --admin-token or set ADAPTERSERVE_ADMIN_TOKEN" in err
    assert "--token" not in err.replace("--admin-token", "") and "ADAPTERSERVE_TOKEN" not in err
    code, _, err = run_cli(
        "adapters", "list", "--target", shared.target, "--admin-token", "wrong", "--retries", "0"
    )
    assert code == cli.EXIT_AUTH
    assert "check --admin-token (or ADAPTERSERVE_ADMIN_TOKEN)" in err
    code, _, err = run_cli("adapters", "list", "--target", shared.target, "--admin-token", ADMIN_TOKEN)
    assert code == 0, err
    # A generation command names the generation token.
    hint = cli.hint_for("generate", AdapterServeError("x", code="UNAUTHENTICATED"))
    assert hint == "pass --token or set ADAPTERSERVE_TOKEN"


def test_upload_name_and_overwrite_are_checked_before_the_first_byte(shared, kind_dirs):
    lora = kind_dirs["LORA"]
    with Client(shared.target, admin_token=ADMIN_TOKEN, retry=NO_RETRY, timeout=60) as client:
        client.upload_adapter(lora, "taken-name")
        before = scrape(shared.server)
        assert metric_sum(before, "adapterserve_uploads_total") >= 1
        sent: list[int] = []
        with pytest.raises(AlreadyExists) as info:
            client.upload_adapter(lora, "taken-name", progress=lambda p: sent.append(p.sent_bytes))
        assert info.value.message.count("overwrite") == 0  # the CLI adds the one hint
        for bad in (
            "",
            "../escape",
            "a" * 10_000,
            "nul\x00name",
            "-looks-like-a-flag",
            "a..b",
            "spaced name",
        ):
            with pytest.raises(InvalidArgument) as info:
                client.upload_adapter(lora, bad, progress=lambda p: sent.append(p.sent_bytes))
            assert "adapter name" in info.value.message
        assert sent == [], "bytes of the adapter were sent before the refusal"
        after = scrape(shared.server)
        # No upload call reached the server at all.
        assert metric_sum(after, "adapterserve_uploads_total") == metric_sum(
            before, "adapterserve_uploads_total"
        )
        replaced = client.upload_adapter(lora, "taken-name", overwrite=True)
        assert replaced.replaced


def test_cli_taken_name_gives_its_hint_once(shared, kind_dirs, monkeypatch):
    monkeypatch.delenv("ADAPTERSERVE_ADMIN_TOKEN", raising=False)
    base = ("--target", shared.target, "--admin-token", ADMIN_TOKEN, "--quiet")
    code, _, err = run_cli("upload", str(kind_dirs["IA3"]), "--name", "cli-taken", *base)
    assert code == 0, err
    code, _, err = run_cli("upload", str(kind_dirs["IA3"]), "--name", "cli-taken", *base)
    assert code == cli.EXIT_EXISTS
    assert err.count("overwrite") == 1 and "--overwrite" in err, err


def test_a_too_long_prompt_names_the_flag_that_raises_the_limit(shared):
    with Client(shared.target, retry=NO_RETRY, timeout=30) as client:
        with pytest.raises(InvalidArgument) as info:
            client.generate("The capital of France is Paris. " * 40, max_new_tokens=1)
    assert "max_prompt_tokens=48" in info.value.message
    assert "--max-prompt-tokens" in info.value.message


def test_serve_help_shows_text_and_default_for_every_engine_and_limit_flag():
    from adapterserve.server.api.app import _SECTION_FLAGS
    from adapterserve.server.settings import ServerSettings

    text = subprocess.run(
        [sys.executable, "-m", "adapterserve.server.api.app", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    flat = " ".join(text.split())
    defaults = ServerSettings()
    assert len(_SECTION_FLAGS) >= 16
    for dest, (section, field) in _SECTION_FLAGS.items():
        flag = "--" + dest.replace("_", "-")
        node: object = defaults
        for part in section.split("."):  # a section may be nested: "engine.cpu"
            node = getattr(node, part)
        value = getattr(node, field)
        # a number (N, MS), one of a setting's choices ({paged,dense}), or a switch (no value)
        match = re.search(
            re.escape(flag) + r"(?: (?:[A-Z]+|\{[a-z0-9,_]+\}))? (.*?)(?: --|$)", flat.split("options:")[-1]
        )
        assert match is not None, f"{flag} is not in serve --help"
        described = match.group(1)
        if value is None:  # a default that depends on the machine: its description says which
            assert "(default:" in described, f"{flag}: {described!r}"
        else:
            assert f"(default {value};" in described, f"{flag}: {described!r}"
        assert len(described.split("(default")[0].strip()) > 5, f"{flag} has no help text"


# -- the admin token kept in the store -------------------------------------------------------------


def token_cli(store: Path) -> subprocess.CompletedProcess:
    """Exactly what scripts/serve.sh runs."""
    return subprocess.run(
        [sys.executable, "-m", "adapterserve.server.api.token_file", str(store)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_generated_admin_token_survives_restarts_with_mode_0600(tmp_path):
    store = tmp_path / "store"
    first = token_cli(store)
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert len(token) >= 24 and "made a new" in first.stderr
    path = store / ".admin-token"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    second = token_cli(store)
    assert second.returncode == 0 and second.stdout.strip() == token and "reusing" in second.stderr
    assert "token_file" in (Path(__file__).resolve().parents[2] / "scripts" / "serve.sh").read_text()


def test_an_unsafe_token_file_is_refused_not_replaced(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    path = store / ".admin-token"
    path.write_text("readable-by-all\n")
    path.chmod(0o644)
    refused = token_cli(store)
    assert refused.returncode == 1 and "chmod 600" in refused.stderr and refused.stdout == ""
    assert path.read_text() == "readable-by-all\n"
    path.unlink()
    (tmp_path / "elsewhere").write_text("planted\n")
    path.symlink_to(tmp_path / "elsewhere")
    refused = token_cli(store)
    assert refused.returncode == 1 and refused.stdout == ""
    assert (tmp_path / "elsewhere").read_text() == "planted\n"


def test_the_generated_token_is_what_the_server_accepts(tiny_model_dir, tmp_path):
    """serve.sh's flow: the token from the store file, exported, opens admin calls after a restart."""
    from tests.helpers.server_process import start_server

    store = tmp_path / "store"
    token = token_cli(store).stdout.strip()
    for _ in range(2):  # start, stop, start again: the same token keeps working
        again = token_cli(store).stdout.strip()
        assert again == token
        server = start_server(tiny_model_dir, store, env={"ADAPTERSERVE_ADMIN_TOKEN": again})
        try:
            with Client(server.target, admin_token=token, retry=NO_RETRY, timeout=30) as client:
                assert client.list_adapters() == []
        finally:
            assert server.stop() == 0
