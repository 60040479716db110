"""librarian serve: a real server on 127.0.0.1, driven with the official `openai` client and httpx.

The model is build_tiny's (untrained: its words are noise, which is all an API test needs); every
test talks HTTP to a `librarian serve` subprocess, as a user's tools do.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import build_tiny

KEY = "test-key"
CONTEXT = 128
HEADERS = {"Authorization": f"Bearer {KEY}"}


class Served:
    """A `librarian serve` subprocess and where it listens."""

    def __init__(self, model: Path, tokenizer: Path, *extra: str, key: str | None = None):
        env = {k: v for k, v in os.environ.items() if k != "LIBRARIAN_API_KEY"}
        if key is not None:  # the way the docs recommend: in the environment, not on the command line
            env["LIBRARIAN_API_KEY"] = key
        self.process = subprocess.Popen(
            [sys.executable, "-m", "librarian.cli.main", "serve", "--model", str(model), "--tokenizer", str(tokenizer),
             "--port", "0", "--max-tokens-limit", "512", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**env, "PYTHONUNBUFFERED": "1"})
        self.lines = []
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"serve did not start: {self.process.stderr.read()}")
            self.lines.append(line)
            if match := re.match(r"serve: http://127\.0\.0\.1:(\d+)/ .* for the model '([^']+)'", line):
                self.url, self.model = f"http://127.0.0.1:{match[1]}", match[2]
                break
        threading.Thread(target=self.process.stdout.read, daemon=True).start()  # never block its prints
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("serve did not answer /health")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def post(self, path: str, body, headers=HEADERS, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json", **headers}, **kw)

    def stop(self) -> tuple[int, str]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode, self.process.stderr.read()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("serve"), context_length=CONTEXT, record_tokenizer=True)


@pytest.fixture(scope="module")
def served(files):
    server = Served(*files, key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def generator(files):
    from librarian.inference.generate import Generator

    return Generator.load(*files)


@pytest.fixture
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def chat_body(served, content="Tell me a story about a cat.", **fields):
    return {"model": served.model, "messages": [{"role": "user", "content": content}], **fields}


# --- the official client --------------------------------------------------------------------------------


def test_openai_client_chat_streamed_and_not_and_a_completion(client, served, generator):
    from librarian.inference.chat import STOP_STRINGS, ReplyTrim
    from librarian.inference.generate import GenerationOptions

    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    whole = client.chat.completions.create(model=served.model, messages=messages, seed=7, max_tokens=40)
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == len(generator.encode("User: Tell me a story about a cat.\nAssistant:"))
    assert 1 <= whole.usage.completion_tokens <= 40
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(model=served.model, messages=messages, seed=7, max_tokens=40,
                                                 stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content  # the same seed, the same text, streamed or not
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert len(chunks) > 3  # piece by piece, not all at the end

    # What `librarian chat` would show for the same prompt and options (a lone request: generate's tokens).
    options = GenerationOptions(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=40, seed=7)
    trim = ReplyTrim()
    alone = "".join(trim.push(p) for p in generator.stream("User: Tell me a story about a cat.\nAssistant:",
                                                           options, STOP_STRINGS))
    assert choice.message.content == alone

    completion = client.completions.create(model=served.model, prompt="Once upon a time", max_tokens=30, seed=3,
                                           temperature=0)
    assert completion.choices[0].text == generator.complete("Once upon a time", GenerationOptions(
        temperature=0, top_k=50, top_p=0.95, max_new_tokens=30, seed=3))
    assert [m.id for m in client.models.list().data] == [served.model]


def test_same_seed_same_text_and_n_choices_use_the_next_seeds(served):
    body = chat_body(served, seed=11, max_tokens=30, temperature=1.0)
    first, again = (served.post("/v1/chat/completions", body).json() for _ in range(2))
    assert first["choices"] == again["choices"]
    several = served.post("/v1/chat/completions", {**body, "n": 3}).json()
    assert [c["index"] for c in several["choices"]] == [0, 1, 2]
    assert several["choices"][0]["message"] == first["choices"][0]["message"]
    next_seed = served.post("/v1/chat/completions", {**body, "seed": 12}).json()
    assert several["choices"][1]["message"] == next_seed["choices"][0]["message"]


def test_stop_strings_and_the_length_limit_set_finish_reason(served, generator):
    from librarian.inference.generate import GenerationOptions

    options = GenerationOptions(temperature=0, top_k=50, top_p=0.95, max_new_tokens=40, seed=1)
    text = generator.complete("Once upon a time", options)
    words = text.split()
    assert len(words) > 3, text
    stop = words[2]
    body = {"model": served.model, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 40, "seed": 1}
    cut = served.post("/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]
    short = served.post("/v1/completions", {**body, "max_tokens": 2}).json()
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 2


def test_a_system_message_is_accepted_and_left_out_of_the_prompt(served):
    plain = chat_body(served, seed=5, max_tokens=20)
    with_system = {**plain, "messages": [{"role": "system", "content": "You are a pirate."}, *plain["messages"]]}
    a, b = (served.post("/v1/chat/completions", body).json() for body in (plain, with_system))
    assert a["choices"] == b["choices"] and a["usage"] == b["usage"]


def test_the_history_is_fitted_as_librarian_chat_fits_it(generator):
    from librarian.inference.chat import ChatSession, Turn
    from librarian.inference.generate import GenerationOptions
    from librarian.inference.server import ChatRequest, Server, ServeSettings

    turns = [Turn(f"where is the cat {i}", f"the cat is in the house {i}") for i in range(12)]
    messages = [m for t in turns for m in ({"role": "user", "content": t.user.strip()},
                                           {"role": "assistant", "content": t.assistant.strip()})]
    messages.append({"role": "user", "content": "the last one"})
    options = GenerationOptions(max_new_tokens=60)
    session = ChatSession(generator, options)
    session.history = [Turn(t.user.strip(), t.assistant.strip()) for t in turns]
    expected, kept, _ = session.build_prompt("the last one")
    assert 0 < kept < len(turns)  # some history fits, not all: the fitting is exercised
    server = Server(generator, engine=None, settings=ServeSettings(model_id="m"))
    request = ChatRequest.model_validate({"model": "m", "messages": messages})
    assert server.chat_prompt(request, options) == (expected, options)  # unguided: the options as they were


# --- batching ---------------------------------------------------------------------------------------------


def test_concurrent_requests_share_steps_and_give_the_texts_they_give_alone(served, generator):
    from librarian.inference.generate import GenerationOptions

    bodies = [{"model": served.model, "prompt": f"Once upon a time there was a {w}", "max_tokens": 48, "seed": i,
               "temperature": 0 if i % 2 else 0.9, "top_k": 40, "top_p": 0.9}
              for i, w in enumerate(["cat", "dog", "girl", "boy", "tree", "ball", "boat", "bird"])]
    before = served.health()["steps"]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: served.post("/v1/completions", b).json(), bodies))
    health = served.health()
    assert health["peak_batch"] > 1, health  # the requests did decode together
    # Fewer steps than tokens: they shared forward passes.
    assert health["steps"] - before < sum(r["usage"]["completion_tokens"] for r in replies)
    for body, reply in zip(bodies, replies):
        options = GenerationOptions(temperature=body["temperature"], top_k=40, top_p=0.9, max_new_tokens=48,
                                    seed=body["seed"])
        assert reply["choices"][0]["text"] == generator.complete(body["prompt"], options), body


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    body = {"model": served.model, "prompt": "Once upon a time", "max_tokens": 500, "stream": True, "seed": 2,
            "stop": ["\u2603\u2603\u2603"]}
    cancelled = served.health()["cancelled"]
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", served.url + "/v1/completions", json=body, headers=HEADERS) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            events = [line for line in (next(lines) for _ in range(8)) if line.startswith("data:")]
            assert events and served.health()["active"] == 1
    deadline = time.monotonic() + 5
    while served.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    health = served.health()
    assert health["active"] == 0 and health["cancelled"] == cancelled + 1  # stopped, long before its 500 tokens


def test_32_concurrent_streams_all_finish_and_memory_comes_back(served):
    server = psutil.Process(served.process.pid)
    served.post("/v1/chat/completions", chat_body(served, max_tokens=20))  # warm: lazy imports and first allocations
    start = server.memory_info().rss

    def stream(i: int) -> tuple[int, bool, str]:
        body = chat_body(served, f"Tell me about number {i}.", max_tokens=64, seed=i, stream=True)
        pieces, done = [], False
        with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, headers=HEADERS, timeout=60) as r:
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    pieces.append(event["choices"][0]["delta"].get("content") or "")
        return r.status_code, done, "".join(pieces)

    began = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream, range(32)))
    assert time.monotonic() - began < 120
    assert all(status == 200 and done for status, done, _ in results)
    assert served.health()["active"] == 0
    assert server.memory_info().rss <= 1.10 * start, (start, server.memory_info().rss)


# --- bad requests: OpenAI's error shape, and the server answers the next request ------------------------------

BIG = "word " * 220_000  # about 1 MB


@pytest.mark.parametrize("path, body, headers, status, code", [
    ("/v1/chat/completions", b'{"model": "x", "messages": [', HEADERS, 400, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "\xff\xfe", "messages": []}', HEADERS, 400, "invalid_utf8"),
    ("/v1/chat/completions", b'[1, 2]', HEADERS, 400, "invalid_json"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, HEADERS, 404,
     "model_not_found"),
    ("/v1/chat/completions", {"model": None, "messages": []}, HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:messages=[]", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:max_tokens=-5", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:max_tokens=1000000", HEADERS, 400, "max_tokens_too_large"),
    ("/v1/chat/completions", "MODEL:temperature=-0.5", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:top_p=0", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:top_p=1.5", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:seed=1180591620717411303424", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:n=100", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:big", HEADERS, 400, "request_too_large"),
    ("/v1/chat/completions", "MODEL:assistant_last", HEADERS, 400, "no_user_message"),
    ("/v1/completions", "MODEL:empty_prompt", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:", {}, 401, "missing_api_key"),
    ("/v1/chat/completions", "MODEL:", {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ("/v1/chat/completions", "MODEL:", {"Authorization": KEY}, 401, "invalid_api_key"),
    ("/v1/chat/completions", "MODEL:top_logprobs=3", HEADERS, 400, "logprobs_required"),
    ("/v1/chat/completions", "MODEL:top_logprobs=21", HEADERS, 422, "invalid_value"),
    ("/v1/completions", "MODEL:completion_logprobs=6", HEADERS, 422, "invalid_value"),
    ("/v1/chat/completions", "MODEL:image", HEADERS, 400, "unsupported_content"),
    ("/v1/nothing", "MODEL:", HEADERS, 404, "not_found"),
])
def test_bad_requests_get_openai_errors_and_the_server_goes_on(served, path, body, headers, status, code):
    if isinstance(body, str) and body.startswith("MODEL:"):
        body = bad_body(served, body.removeprefix("MODEL:"))
    response = served.post(path, body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in response.text and len(error["message"].splitlines()) == 1
    good = served.post("/v1/chat/completions", chat_body(served, max_tokens=5))
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["role"] == "assistant"


def bad_body(served, case: str) -> dict:
    body = chat_body(served, max_tokens=5)
    if case == "big":
        body["messages"][0]["content"] = BIG
    elif case == "assistant_last":
        body["messages"].append({"role": "assistant", "content": "hello"})
    elif case == "empty_prompt":
        body = {"model": served.model, "prompt": "  "}
    elif case == "image":
        body["messages"][0]["content"] = [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    elif case.startswith("completion_"):
        field, value = case.removeprefix("completion_").split("=", 1)
        body = {"model": served.model, "prompt": "Once upon a time", "max_tokens": 5, field: json.loads(value)}
    elif "=" in case:
        field, value = case.split("=", 1)
        body[field] = json.loads(value)
    return body


def test_error_messages_name_the_fix(served):
    big = served.post("/v1/chat/completions", chat_body(served, max_tokens=100_000)).json()["error"]["message"]
    assert "512" in big and "--max-tokens-limit" in big
    key = httpx.get(served.url + "/v1/models").json()["error"]["message"]
    assert "Authorization: Bearer" in key
    bare = httpx.get(served.url + "/v1/models", headers={"Authorization": KEY}).json()["error"]["message"]
    assert "`Authorization: Bearer <key>`" in bare and "wrong" not in bare  # how to send it, not that it is wrong
    image = served.post("/v1/chat/completions", bad_body(served, "image")).json()["error"]["message"]
    assert "this model reads text only" in image and "messages.0.content.1" in image
    assert httpx.get(served.url + "/health").status_code == 200  # health and the page need no key
    assert httpx.get(served.url + "/").status_code == 200


# --- what the API cannot do is refused by name; what only tunes still passes -------------------------------------

TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("path, field, value", [
    ("/v1/chat/completions", "tools", [TOOL]),
    ("/v1/chat/completions", "functions", [TOOL["function"]]),
    ("/v1/chat/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "tool_choice", {"type": "function", "function": {"name": "weather"}}),
    ("/v1/chat/completions", "response_format", {"type": "json_object"}),
    ("/v1/chat/completions", "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("/v1/completions", "echo", True),
])
def test_fields_this_model_cannot_honour_get_a_400_naming_them(served, path, field, value):
    body = chat_body(served, max_tokens=5) if "chat" in path else {"model": served.model, "prompt": "Once",
                                                                    "max_tokens": 5}
    response = served.post(path, {**body, field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert error["message"].startswith(f"{field}: ")
    assert len(error["message"].splitlines()) == 1 and "Traceback" not in response.text


def test_fields_that_ask_for_nothing_or_only_tune_still_pass(served):
    quiet = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "user": "someone",
             "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "parallel_tool_calls": False,
             "store": False, "metadata": {"a": "b"}, "service_tier": "auto", "logprobs": False}
    body = chat_body(served, max_tokens=8, seed=4)
    plain, tuned = (served.post("/v1/chat/completions", b).json() for b in (body, {**body, **quiet}))
    assert tuned["choices"][0]["message"] == plain["choices"][0]["message"]
    assert tuned["choices"][0]["logprobs"] is None
    echo = served.post("/v1/completions", {"model": served.model, "prompt": "Once", "max_tokens": 3, "echo": False})
    assert echo.status_code == 200, echo.text
    # Text parts are read as the same text in a string (joined with a space).
    parts = [{"type": "text", "text": "Tell me a story"}, {"type": "text", "text": "about a cat."}]
    split = served.post("/v1/chat/completions", chat_body(served, parts, max_tokens=8, seed=4)).json()
    assert split["choices"][0]["message"] == plain["choices"][0]["message"]


# --- logprobs -------------------------------------------------------------------------------------------------


def model_logprobs(generator, prompt: str, reply: list[int]):
    """The model's own log-probabilities (len(reply), V) of each next token of `reply` after `prompt`: one forward
    pass over both, as training scores text, independent of the server's decoding."""
    import torch

    ids = generator.encode(prompt)
    with torch.inference_mode():
        logits, _ = generator.model(torch.tensor([ids + reply]))
    return torch.log_softmax(logits[0].float(), -1)[len(ids) - 1 : -1]


def sampled_ids(generator, prompt: str, max_tokens: int, seed: int) -> list[int]:
    """The tokens a lone request samples for `prompt` (the server's tokens, as the tests above show)."""
    from librarian.inference.generate import GenerationOptions, generate_ids

    options = GenerationOptions(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=max_tokens, seed=seed)
    return list(generate_ids(generator.model, generator.encode(prompt), options, (generator.eot,)))


def check_scored(generator, prompt: str, seed: int, max_tokens: int, top: int, tokens: list[str],
                 raw: list[bytes | None], logprobs: list[float], tops: list[list[tuple[str, float]]]):
    """The returned log-probabilities are the model's own for the sampled tokens; the alternatives, its likeliest."""
    ids = sampled_ids(generator, prompt, max_tokens, seed)
    assert 1 <= len(tokens) <= len(ids)  # fewer only where a stop string cut the reply
    ids = ids[: len(tokens)]
    own = model_logprobs(generator, prompt, ids)
    expected = [float(own[i, t]) for i, t in enumerate(ids)]
    assert abs(sum(logprobs) - sum(expected)) < 1e-4, (sum(logprobs), sum(expected))
    assert logprobs == pytest.approx(expected, abs=1e-4)
    for i, token in enumerate(ids):
        alone = generator.decode([token])
        if "\ufffd" not in alone:  # a whole character or more: its text and bytes are plain
            assert tokens[i] == alone and (raw[i] is None or raw[i] == alone.encode())
        names, values = [t for t, _ in tops[i]], [v for _, v in tops[i]]
        assert len(tops[i]) == top and values == sorted(values, reverse=True)
        likeliest = own[i].topk(top)
        assert values == pytest.approx(likeliest.values.tolist(), abs=1e-4)
        if top and logprobs[i] >= values[-1] + 1e-6:
            assert tokens[i] in names
    if raw[0] is not None and "\ufffd" not in generator.decode(ids):
        assert b"".join(raw) == generator.decode(ids).encode()


CHAT_PROMPT = "User: Tell me a story about a cat.\nAssistant:"


def chat_entries(logprobs: dict) -> tuple[list, list, list, list]:
    content = logprobs["content"]
    return ([e["token"] for e in content], [bytes(e["bytes"]) for e in content], [e["logprob"] for e in content],
            [[(t["token"], t["logprob"]) for t in e["top_logprobs"]] for e in content])


def completion_entries(logprobs: dict) -> tuple[list, list, list, list]:
    return (logprobs["tokens"], [None] * len(logprobs["tokens"]), logprobs["token_logprobs"],
            [list(top.items()) for top in logprobs["top_logprobs"]])


def stream_events(served, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", served.url + path, json={**body, "stream": True}, headers=HEADERS, timeout=60) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert all("error" not in e for e in events), events
    return events


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_are_the_models_own_log_likelihood_of_the_reply(served, generator, stream):
    body = chat_body(served, seed=21, max_tokens=24, temperature=0.9, logprobs=True, top_logprobs=5, n=2)
    if stream:
        events = stream_events(served, "/v1/chat/completions", body)
        merged_logprobs = {0: {"content": []}, 1: {"content": []}}
        for event in events:
            for choice in event["choices"]:
                if choice["logprobs"]:
                    merged_logprobs[choice["index"]]["content"] += choice["logprobs"]["content"]
        choices = [{"index": i, "logprobs": merged_logprobs[i]} for i in (0, 1)]
    else:
        reply = served.post("/v1/chat/completions", body).json()
        choices = reply["choices"]
        assert sum(len(c["logprobs"]["content"]) for c in choices) == reply["usage"]["completion_tokens"]
    for choice in choices:  # choice i samples with seed + i
        check_scored(generator, CHAT_PROMPT, 21 + choice["index"], 24, 5, *chat_entries(choice["logprobs"]))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_logprobs_are_the_models_own_log_likelihood_and_offsets_index_the_text(served, generator, stream):
    body = {"model": served.model, "prompt": "Once upon a time", "max_tokens": 24, "seed": 8, "temperature": 0.9,
            "logprobs": 3}
    if stream:
        events = stream_events(served, "/v1/completions", body)
        text = "".join(e["choices"][0]["text"] for e in events)
        logprobs = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for event in events:
            for field, values in (event["choices"][0]["logprobs"] or {}).items():
                logprobs[field] += values
    else:
        choice = served.post("/v1/completions", body).json()["choices"][0]
        text, logprobs = choice["text"], choice["logprobs"]
    check_scored(generator, "Once upon a time", 8, 24, 3, *completion_entries(logprobs))
    offsets = logprobs["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for token, start, end in zip(logprobs["tokens"], offsets, offsets[1:] + [len(text)]):
        if not token.startswith("bytes:"):
            assert text[start:end] == token


def test_logprobs_stop_with_the_text_at_a_stop_string(served, generator):
    from librarian.inference.generate import GenerationOptions

    text = generator.complete("Once upon a time", GenerationOptions(temperature=0, max_new_tokens=40))
    stop = text.split()[3]
    body = {"model": served.model, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 40, "stop": [stop],
            "logprobs": 0}
    choice = served.post("/v1/completions", body).json()["choices"][0]
    cut, logprobs = choice["text"], choice["logprobs"]
    assert choice["finish_reason"] == "stop" and cut == text[: text.index(stop)]
    # The tokens that make the text are there, and none that begins inside the stop string.
    assert "".join(logprobs["tokens"]).startswith(cut) and all(o < len(cut) for o in logprobs["text_offset"])
    assert logprobs["top_logprobs"] == [{}] * len(logprobs["tokens"])  # logprobs 0: the tokens' own only


def test_openai_client_reads_logprobs(client, served, generator):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    chunks = list(client.chat.completions.create(model=served.model, messages=messages, seed=30, max_tokens=16,
                                                 temperature=0.9, logprobs=True, top_logprobs=2, stream=True))
    content = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    check_scored(generator, CHAT_PROMPT, 30, 16, 2, [e.token for e in content], [bytes(e.bytes) for e in content],
                 [e.logprob for e in content], [[(t.token, t.logprob) for t in e.top_logprobs] for e in content])
    whole = client.chat.completions.create(model=served.model, messages=messages, seed=30, max_tokens=16,
                                           temperature=0.9, logprobs=True)
    assert [e.logprob for e in whole.choices[0].logprobs.content] == [e.logprob for e in content]
    assert all(e.top_logprobs == [] for e in whole.choices[0].logprobs.content)
    completion = client.completions.create(model=served.model, prompt="Once upon a time", max_tokens=16, seed=31,
                                           temperature=0.9, logprobs=4)
    lp = completion.choices[0].logprobs
    check_scored(generator, "Once upon a time", 31, 16, 4, lp.tokens, [None] * len(lp.tokens), lp.token_logprobs,
                 [list(top.items()) for top in lp.top_logprobs])


# --- the command ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal, line", [(signal.SIGTERM, "error: terminated (SIGTERM); the server stopped"),
                                               (signal.SIGINT, "error: interrupted; the server stopped")])
def test_a_stop_signal_ends_the_replies_in_flight_cleanly_with_one_line(files, stop_signal, line):
    server = Served(*files)
    # Seed 2: the tiny model writes all 500 tokens without <|endoftext|>, so only the signal can end the reply.
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 500, "stream": True, "seed": 2,
            "stop": ["\u2603\u2603\u2603"]}
    events = []
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 3:
                        server.process.send_signal(stop_signal)
        server.process.wait(timeout=30)  # it stops by itself
    finally:
        code, stderr = server.stop()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert len(events) < 500
    assert code == 128 + stop_signal
    assert stderr.strip().splitlines() == [stderr.strip().splitlines()[0]] and stderr.startswith(line), stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "error: --port must be between 0 and 65535, got 70000"),
    (["--slots", "0"], "error: --slots must be >= 1, got 0"),
    (["--api-key", " "], "error: --api-key is empty"),
    (["--host", "no.such.host.invalid"], "error: --host no.such.host.invalid is not an address of this machine"),
])
def test_bad_command_lines_get_one_line(files, capsys, args, message):
    assert serve_fails(capsys, files, *args).startswith(message)


def test_the_key_is_read_from_the_environment_and_one_on_the_command_line_is_warned_about(files, served):
    assert served.health()["auth"]  # the fixture's key came from LIBRARIAN_API_KEY alone
    assert httpx.get(served.url + "/v1/models", headers=HEADERS).status_code == 200
    server = Served(*files, "--api-key", "visible")
    try:
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer visible"}).status_code == 200
    finally:
        _, stderr = server.stop()
    assert stderr.startswith("warning: --api-key shows the key to every user of this machine (ps); "
                             "set LIBRARIAN_API_KEY instead\n"), stderr


def test_an_empty_key_in_the_environment_is_one_line(files, capsys, monkeypatch):
    monkeypatch.setenv("LIBRARIAN_API_KEY", " ")
    assert serve_fails(capsys, files).startswith("error: LIBRARIAN_API_KEY is empty")


def test_a_port_in_use_is_one_line(files, capsys, served):
    port = served.url.rsplit(":", 1)[1]
    err = serve_fails(capsys, files, "--port", port)
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in err


def serve_fails(capsys, files, *args) -> str:
    from librarian.cli.main import main

    model, tokenizer = files
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", str(model), "--tokenizer", str(tokenizer), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1, err
    return err


# --- guidance: guidance_scale and negative_prompt, an extension of the API ------------------------------------


def test_guidance_through_the_openai_client_is_guided_chat_and_scale_1_is_plain(client, served, generator):
    """extra_body carries the extension. The server's reply equals `librarian chat`'s, guided the same way
    (the negative prompt: the conversation, its last request replaced by a neutral one); scale 1 is today's."""
    from librarian.data.chat_template import NEUTRAL_REQUEST, render_prompt
    from librarian.inference.chat import STOP_STRINGS, ReplyTrim
    from librarian.inference.generate import GenerationOptions

    messages = [{"role": "user", "content": "Tell me a story about a cat."}]

    def reply(**extra):
        return client.chat.completions.create(model=served.model, messages=messages, seed=11, max_tokens=40,
                                              temperature=1.0, top_p=1.0, extra_body={"top_k": 0, **extra}
                                              ).choices[0].message.content

    guided, plain = reply(guidance_scale=3.0), reply()
    assert reply(guidance_scale=1) == plain and guided != plain
    negative = tuple(generator.encode(render_prompt([], NEUTRAL_REQUEST)))
    options = GenerationOptions(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=40, seed=11, guidance=3.0,
                                negative=negative)
    trim = ReplyTrim()
    expected = "".join(trim.push(p) for p in generator.stream(render_prompt([], messages[0]["content"]), options,
                                                              STOP_STRINGS)).strip()
    assert guided == expected
    assert reply(guidance_scale=3.0, negative_prompt="Tell me a story about a dog.") != guided


@pytest.mark.parametrize("fields, words", [
    ({"guidance_scale": "two"}, "guidance_scale must be a number above 0 and at most 20"),
    ({"guidance_scale": 0}, "guidance_scale must be a number above 0"),
    ({"guidance_scale": 21}, "at most 20"),
    ({"guidance_scale": True}, "guidance_scale must be a number"),
    ({"guidance_scale": 2, "negative_prompt": 5}, "negative_prompt must be a string"),
    ({"negative_prompt": "a story"}, "negative_prompt needs guidance_scale"),
    ({"guidance_scale": 2, "negative_prompt": "dog " * 400}, "more than the model's context"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_guidance_gets_a_400_with_one_line(served, path, fields, words):
    body = {"model": served.model, "max_tokens": 5, **fields}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "Once upon a time"}
    response = served.post(path, body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert words in message and "\n" not in message
    assert served.health()["status"] == "ok"
