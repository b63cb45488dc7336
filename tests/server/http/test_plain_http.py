"""The HTTP API with plain HTTP (httpx): OpenAI's error shape and statuses, SSE framing, metrics with a
protocol label, health, and the graceful drain shared with gRPC."""

from __future__ import annotations

import json
import re
import signal

import httpx
import pytest

from tests.helpers.server_process import start_server
from tests.server.http.conftest import GENERATE_TOKEN, SERVED_NAME

AUTH = {"Authorization": f"Bearer {GENERATE_TOKEN}"}


@pytest.fixture(scope="module")
def http(http_server):
    with httpx.Client(base_url=http_server.http_url, headers=AUTH, timeout=60) as client:
        yield client


def assert_openai_error(response: httpx.Response, status: int, *, code: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error["message"]


def test_completion_with_the_ignore_eos_extra(http):
    body = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    reply = http.post("/completions", json=body).json()
    assert reply["usage"]["completion_tokens"] == 20
    assert reply["choices"][0]["finish_reason"] == "length"


def test_unknown_model_is_404_in_openai_shape(http):
    response = http.post(
        "/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
    )
    assert "gpt-4o" in assert_openai_error(response, 404, code="model_not_found")


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"n": 9}, "max_n"),
        ({"n": 0}, "n"),
        ({"logprobs": 21}, "max_logprobs"),
        ({"suffix": "x"}, "suffix"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"min_tokens": 5}, "min_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"prompt": []}, "empty"),
        ({"prompt": ["a", 5]}, "not a mix"),
        ({"prompt": ["a", ""]}, "prompt[1]"),
    ],
)
def test_unsupported_or_invalid_fields_are_a_clear_400(http, extra, named):
    body = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 4, **extra}
    message = assert_openai_error(http.post("/completions", json=body), 400)
    assert named in message


def test_body_that_is_not_json_is_a_400(http):
    response = http.post("/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert "JSON" in assert_openai_error(response, 400)


def test_missing_key_is_401(http_server):
    response = httpx.post(f"{http_server.http_url}/completions", json={"model": SERVED_NAME, "prompt": "x"})
    assert "Authorization: Bearer" in assert_openai_error(response, 401)
    response = httpx.get(f"{http_server.http_url}/models", headers={"Authorization": "Basic abc"})
    assert_openai_error(response, 403)


def test_stream_is_server_sent_events_ending_in_done(http):
    body = {"model": "demo-lora", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True}
    with http.stream("POST", "/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    frames = [json.loads(line[6:]) for line in lines[:-1]]
    assert {f["object"] for f in frames} == {"text_completion"}
    assert frames[-1]["choices"][0]["finish_reason"] == "length"


def test_refused_stream_is_a_json_error_not_an_event_stream(http):
    body = {"model": "nope", "prompt": "Hello", "stream": True}
    with http.stream("POST", "/completions", json=body) as response:
        response.read()
    assert response.headers["content-type"].startswith("application/json")
    assert_openai_error(response, 404, code="model_not_found")


def test_metrics_carry_the_protocol_label(http, http_server):
    http.post("/completions", json={"model": "demo-ia3", "prompt": "Hi", "max_tokens": 2})
    text = httpx.get(http_server.metrics_url).text
    lines = [line for line in text.splitlines() if line.startswith("adapterserve_requests_total{")]
    assert any(
        'protocol="http"' in line and 'adapter="demo-ia3"' in line and 'status="OK"' in line for line in lines
    )
    assert any('protocol="http"' in line and 'status="NOT_FOUND"' in line for line in lines)


def test_health(http_server):
    assert httpx.get(http_server.http_url.removesuffix("/v1") + "/health").json() == {"status": "serving"}


def test_sigterm_lets_a_running_stream_finish_and_refuses_new_requests(tiny_model_dir, tmp_path):
    server = start_server(tiny_model_dir, tmp_path / "store", extra_args=("--http-port", "0"))
    try:
        base = httpx.get(f"{server.http_url}/models").json()["data"][0]["id"]
        body = {"model": base, "prompt": "Hello", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.http_url, timeout=60) as client:
            with client.stream("POST", "/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                server.signal(signal.SIGTERM)
                server.wait_for(re.compile("draining"), 30)
                refused = client.post("/completions", json={**body, "stream": False})
                assert_openai_error(refused, 503)
                rest = [line for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            frames = [json.loads(line[6:]) for line in rest[:-1]]
            assert frames[-1]["choices"][0]["finish_reason"] == "length"
        assert server.wait(60) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
