"""librarian serve answers its own page and its clients only: the Host, Origin and Content-Type checks
(librarian/inference/guard.py), against a real server on 127.0.0.1 started without a key, the case where
another web page could otherwise read its replies."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from librarian.inference.guard import Access
from tests.helpers import build_tiny
from tests.inference.test_serve import Served, serve_fails

ALLOWED_HOST = "my-box.test"
ALLOWED_ORIGIN = "http://app.example:3000"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("guard"), record_tokenizer=True)


@pytest.fixture(scope="module")
def served(files):
    server = Served(*files, "--allow-host", ALLOWED_HOST, "--allow-origin", ALLOWED_ORIGIN)
    yield server
    server.stop()


def completion(served, headers: dict, content: bytes | None = None) -> httpx.Response:
    body = {"model": served.model, "prompt": "Once upon a time", "max_tokens": 3, "seed": 1}
    return httpx.post(served.url + "/v1/completions", content=json.dumps(body) if content is None else content,
                      headers={"Content-Type": "application/json", **headers}, timeout=30)


def one_line_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and len(error["message"].splitlines()) == 1 and "Traceback" not in response.text
    return error["message"]


# --- Host ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "127.0.0.1", "localhost:{port}", "LocalHost", "[::1]:{port}",
                                  "[::1]", f"{ALLOWED_HOST}:{{port}}", ALLOWED_HOST.upper()])
def test_the_servers_own_names_and_allowed_ones_are_answered(served, host):
    port = served.url.rsplit(":", 1)[1]
    headers = {"Host": host.format(port=port)}
    assert httpx.get(served.url + "/", headers=headers).status_code == 200
    assert completion(served, headers).status_code == 200


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:{port}", "localhost.attacker.example",
                                  "127.0.0.1.attacker.example:{port}"])
def test_another_host_name_gets_421_naming_the_flag(served, host):
    port = served.url.rsplit(":", 1)[1]
    headers = {"Host": host.format(port=port)}
    for response in (httpx.get(served.url + "/", headers=headers), httpx.get(served.url + "/health", headers=headers),
                     completion(served, headers)):
        message = one_line_error(response, 421, "host_not_allowed")
        name = host.split(":")[0]
        assert f"--allow-host {name}" in message and "DNS rebinding" in message
    assert completion(served, {}).status_code == 200  # and it goes on


def test_which_hosts_a_bind_accepts():
    loopback = Access.of("127.0.0.1")
    assert all(loopback.host_allowed(h) for h in ("127.0.0.1:8000", "localhost", "[::1]:8000", "10.1.2.3"))
    assert not loopback.host_allowed("attacker.example") and not loopback.host_allowed(socket.gethostname() + ".x")
    named = Access.of("my-box.lan")
    assert named.host_allowed("my-box.lan:8000") and not named.host_allowed("other.lan")
    everywhere = Access.of("0.0.0.0")
    assert everywhere.host_allowed(socket.gethostname()) and everywhere.host_allowed("192.168.1.5:8000")
    assert not everywhere.host_allowed("attacker.example")
    assert Access.of("::", allow_hosts=["*"]).host_allowed("attacker.example")


# --- Origin ----------------------------------------------------------------------------------------------------


def test_a_foreign_page_gets_403_naming_the_flag_and_the_servers_own_page_passes(served):
    message = one_line_error(completion(served, {"Origin": "http://evil.example"}), 403, "origin_not_allowed")
    assert "--allow-origin http://evil.example" in message
    one_line_error(completion(served, {"Origin": "null"}), 403, "origin_not_allowed")  # a sandboxed frame, a file
    one_line_error(httpx.get(served.url + "/v1/models", headers={"Origin": "http://evil.example"}), 403,
                   "origin_not_allowed")
    assert completion(served, {"Origin": served.url}).status_code == 200  # the chat page, at this very origin
    port = served.url.rsplit(":", 1)[1]
    assert completion(served, {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}).status_code == 200
    # Same host, another port: another origin (another program on this machine).
    one_line_error(completion(served, {"Origin": "http://127.0.0.1:1"}), 403, "origin_not_allowed")


def test_an_allowed_origin_passes_with_cors_headers_and_its_preflight_is_answered(served):
    reply = completion(served, {"Origin": ALLOWED_ORIGIN})
    assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    preflight = {"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    answer = httpx.options(served.url + "/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    foreign = httpx.options(served.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
    one_line_error(foreign, 403, "origin_not_allowed")


# --- Content-Type ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_a_body_that_is_not_declared_json_gets_415(served, content_type):
    body = json.dumps({"model": served.model, "prompt": "Once", "max_tokens": 3}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = httpx.post(served.url + "/v1/completions", content=body, headers=headers)
    message = one_line_error(response, 415, "unsupported_media_type")
    assert "Content-Type: application/json" in message


def test_a_simple_cross_origin_post_is_refused_before_it_is_read(served):
    """A page elsewhere may send text/plain without a preflight: the browser's "simple" request."""
    body = json.dumps({"model": served.model, "prompt": "Once", "max_tokens": 3})
    response = httpx.post(served.url + "/v1/completions", content=body,
                          headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": "http://evil.example"})
    one_line_error(response, 403, "origin_not_allowed")
    assert completion(served, {"Content-Type": "application/json; charset=utf-8"}).status_code == 200


# --- the command -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--allow-origin", "app.example"], "error: --allow-origin wants an origin"),
    (["--allow-origin", "http://app.example/page"], "error: --allow-origin wants an origin"),
    (["--allow-host", "http://my-box.lan"], "error: --allow-host wants a host name"),
    (["--allow-host", "my-box.lan:8000"], "error: --allow-host wants a host name"),
])
def test_bad_access_flags_get_one_line(files, capsys, args, message):
    assert serve_fails(capsys, files, *args).startswith(message)
