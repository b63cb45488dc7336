"""CLI behaviour that needs no server: help, usage errors, delegates that are not installed."""

from __future__ import annotations

import io

import pytest

from adapterserve import cli, cli_delegates


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return cli.main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()


def test_help_and_version_exit_zero(capsys):
    assert _run("--help")[0] == 0
    assert "generate" in capsys.readouterr().out
    assert _run("--version")[0] == 0


def test_usage_error_exits_two():
    assert _run("generate", "--temperature", "hot")[0] == cli.EXIT_USAGE
    assert _run()[0] == cli.EXIT_USAGE


@pytest.mark.parametrize(
    "module, reason",
    [
        ("adapterserve.no_such_part.cli", "this installation has no adapterserve.no_such_part"),
        ("adapterserve.cli", "lacks add_x_arguments/run_x"),
    ],
)
def test_missing_delegate_prints_one_line_and_exits_ten(monkeypatch, module, reason):
    fake = cli_delegates.Delegate("bench", module, "add_x_arguments", "run_x", "benchmark")
    monkeypatch.setitem(cli_delegates.DELEGATES, "bench", fake)
    code, out, err = _run("bench", "--help")
    assert code == cli.EXIT_MISSING_COMPONENT
    assert out == "" and len(err.splitlines()) == 1 and reason in err
    assert "pip install 'adapterserve[server]'" in err


def test_missing_third_party_dependency_is_named(monkeypatch):
    fake = cli_delegates.Delegate("train", "tests.clients.needs_missing_dep", "add", "run", "train")
    monkeypatch.setitem(cli_delegates.DELEGATES, "train", fake)
    code, _, err = _run("train")
    assert code == cli.EXIT_MISSING_COMPONENT and "surely_not_installed_pkg" in err


def test_delegate_gets_its_parser_and_its_exit_code(monkeypatch):
    fake = cli_delegates.Delegate("serve", "tests.clients.fake_delegate", "add_arguments", "run", "serve")
    monkeypatch.setitem(cli_delegates.DELEGATES, "serve", fake)
    assert _run("serve", "--answer", "7")[0] == 7
    assert _run("serve", "--bogus")[0] == cli.EXIT_USAGE


def test_local_refusal_needs_no_server(tmp_path):
    d = tmp_path / "a"
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    (d / "adapter_model.pt").write_bytes(b"x")
    code, out, err = _run("upload", str(d), "--name", "x", "--target", "127.0.0.1:1")
    assert code == cli.EXIT_INVALID and "adapter_model.pt" in err


def test_dependency_missing_at_run_time_is_one_line(monkeypatch):
    fake = cli_delegates.Delegate(
        "serve", "tests.clients.fake_delegate", "add_arguments", "run_needing_torch", "s"
    )
    monkeypatch.setitem(cli_delegates.DELEGATES, "serve", fake)
    code, _, err = _run("serve", "--answer", "1")
    assert code == cli.EXIT_MISSING_COMPONENT
    assert len(err.splitlines()) == 1 and "surely_not_installed_torch" in err
