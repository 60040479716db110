"""The chat page of `librarian serve` in a real browser: headless Chromium loads it from a real server.

Chromium (Debian's chromium package; .ci/run installs it) is driven over the DevTools protocol on
--remote-debugging-pipe: JSON messages ended by NUL, commands on the browser's fd 3 and replies and
events on its fd 4, with only the standard library. The server is `librarian serve` on a free port
with a tiny untrained model, so replies are gibberish; the page streams them all the same. Without
Chromium the tests skip and say so. Every wait is bounded, and no Chromium process outlives the tests.
"""

import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT, build_tiny

PAGE = ROOT / "librarian" / "inference" / "web" / "chat.html"


def chromium_path() -> str | None:
    found = Path("/usr/bin/chromium")
    return str(found) if found.exists() else shutil.which("chromium")


# --- the server ------------------------------------------------------------------------------------


class Server:
    """`librarian serve` on 127.0.0.1:<any free port>, its banner's port parsed from stdout."""

    def __init__(self, model: Path, tokenizer: Path, directory: Path, *options: str, key: str | None = None,
                 timeout: float = 30.0):
        self.key = key
        if key:
            options += ("--api-key", key)
        self.out, self.err = directory / "serve.out", directory / "serve.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "librarian.cli.main", "serve", "--model", str(model), "--tokenizer", str(tokenizer),
                 "--port", "0", "--threads", "1", *options], stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=ROOT)
        try:
            self.port = self._wait_for_banner(timeout)
            self.url = f"http://127.0.0.1:{self.port}"
            self._wait_for_health(timeout)
        except BaseException:
            self.stop()
            raise

    def logs(self) -> str:
        return f"stdout:\n{self.out.read_text()}\nstderr:\n{self.err.read_text()}"

    def _wait_for_banner(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"^serve: http://127\.0\.0\.1:(\d+)/ \(chat page\)", self.out.read_text(), re.M)
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                pytest.fail(f"librarian serve exited with {self.process.returncode}:\n{self.logs()}")
            time.sleep(0.1)
        pytest.fail(f"librarian serve printed no `serve: http://...` line within {timeout} s:\n{self.logs()}")

    def _wait_for_health(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/health")["status"] == "ok":
                    return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"GET /health did not answer within {timeout} s:\n{self.logs()}")

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=self.headers()), timeout=5) as r:
            return json.load(r)

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(),
                                         {"Content-Type": "application/json", **self.headers()})
        with urllib.request.urlopen(request, timeout=20) as response:
            return json.load(response)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# --- the browser -----------------------------------------------------------------------------------


class CDPError(Exception):
    pass


TRAMPOLINE = """import os, sys
commands, events = int(sys.argv[1]), int(sys.argv[2])
os.dup2(commands, 3)
os.dup2(events, 4)
os.close(commands)
os.close(events)
os.execv(sys.argv[3], sys.argv[3:])
"""


class Browser:
    """Headless Chromium in its own process group, spoken to over --remote-debugging-pipe."""

    def __init__(self, executable: str, profile: Path, window: tuple[int, int] = (900, 700)):
        self.profile = profile
        self.log = profile.parent / f"{profile.name}.log"
        # Our pipe ends, moved above 9 so that putting them on fds 3 and 4 in the child cannot clobber them.
        commands_r, commands_w = os.pipe()
        events_r, events_w = os.pipe()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_r, events_w)]
        for fd in (commands_r, events_w):
            os.close(fd)
        self.commands, self.events = commands_w, events_r
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
                 "--remote-debugging-pipe", f"--window-size={window[0]},{window[1]}", "--hide-scrollbars",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--no-default-browser-check", "--mute-audio", "about:blank"]
        with open(self.log, "wb") as log:
            # A Python trampoline puts the two ends on fds 3 and 4, where Chromium reads and writes the
            # protocol, and becomes Chromium: the process started here is the browser, leading its group.
            self.process = subprocess.Popen(
                [sys.executable, "-c", TRAMPOLINE, str(high[0]), str(high[1]), executable, *flags],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=high, start_new_session=True)
        for fd in high:
            os.close(fd)
        self.next_id, self.buffer, self.received = 0, b"", []
        try:
            self.version = self.call("Browser.getVersion", timeout=30)
        except BaseException:
            self.close()
            raise

    # The protocol: each message one JSON object ended by a NUL byte.
    def _read(self, deadline: float) -> dict | None:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.events], [], [], left)
            if not ready:
                return None
            data = os.read(self.events, 1 << 20)
            if not data:
                raise CDPError(f"Chromium closed the pipe (exit {self.process.poll()}):\n{self.logs()}")
            self.buffer += data
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 10.0):
        self.next_id += 1
        ident = self.next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.commands, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply is None:
                raise CDPError(f"{method}: no answer from Chromium within {timeout} s")
            if reply.get("id") == ident:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.received.append(reply)

    def pump(self, seconds: float) -> None:
        """Read the events that arrive within `seconds`."""
        deadline = time.monotonic() + seconds
        while (event := self._read(deadline)) is not None:
            if "method" in event:
                self.received.append(event)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def processes(self) -> list[int]:
        """Every live process of this browser: its process group, or anything naming its profile."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                pgid = os.getpgid(int(entry.name))
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state != "Z" and (pgid == self.process.pid or str(self.profile).encode() in cmdline):
                found.append(int(entry.name))
        return found

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.call("Browser.close", timeout=5)
                except (CDPError, OSError):
                    pass
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
            deadline = time.monotonic() + 10
            while (left := self.processes()) and time.monotonic() < deadline:
                for pid in left:  # a renderer or zygote that did not go with the browser
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.1)
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=10)
        finally:
            for fd in (self.commands, self.events):
                try:
                    os.close(fd)
                except OSError:
                    pass


class Tab:
    """A page in a browser context of its own (its own localStorage), attached with its own session and
    its network recorded; with `key`, the page finds that API key stored, as if typed in before."""

    def __init__(self, browser: Browser, key: str | None = None):
        self.browser = browser
        self.context = browser.call("Target.createBrowserContext")["browserContextId"]
        self.target = browser.call("Target.createTarget", {"url": "about:blank",
                                                           "browserContextId": self.context})["targetId"]
        self.session = browser.call("Target.attachToTarget", {"targetId": self.target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.call(f"{domain}.enable")
        if key:
            self.call("Page.addScriptToEvaluateOnNewDocument",
                      {"source": f"localStorage.setItem('librarian.api_key', {json.dumps(key)})"})

    def call(self, method: str, params: dict | None = None, timeout: float = 10.0):
        return self.browser.call(method, params, self.session, timeout)

    def open(self, url: str, timeout: float = 20.0) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'", timeout, "the page did not load")

    def eval(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str, every: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.eval(expression)
            if value:
                return value
            self.browser.pump(every)
        pytest.fail(f"{what} within {timeout} s; the page's log reads:\n{self.eval(LOG_TEXT)}")

    def events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.received
                if e["method"] == method and e.get("sessionId") == self.session]

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target})
        self.browser.call("Target.disposeBrowserContext", {"browserContextId": self.context})


LOG_TEXT = "document.getElementById('log').innerText"
REPLIED = "!!document.querySelector('#log .assistant.done, #log .assistant.stopped, #log .error')"
STATE = """(() => { const a = [...document.querySelectorAll('#log .assistant')].map(e => ({
    text: e.textContent, classes: e.className, note: e.dataset.note || null}));
  const u = [...document.querySelectorAll('#log .user')].map(e => e.textContent);
  const errors = [...document.querySelectorAll('#log .error')].map(e => e.textContent);
  return {assistant: a, user: u, errors, send: document.getElementById('send').disabled,
          stop: document.getElementById('stop').disabled, model: document.getElementById('model').textContent}; })()"""


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed: apt-get install chromium (the CI script does this); "
                    "neither /usr/bin/chromium nor `chromium` on PATH was found")
    return path


@pytest.fixture(scope="module")
def server(chromium, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve_page")
    model, tokenizer = build_tiny(directory, context_length=128)
    # Replies may be long enough that Stop surely comes before their end (test_stop_aborts_a_long_reply).
    running = Server(model, tokenizer, directory, "--max-tokens-limit", str(LONG), key=KEY)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    started = Browser(chromium, tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield started
    finally:
        started.close()
        left = started.processes()
        assert not left, f"Chromium processes outlived the tests: {left}"


@pytest.fixture
def tab(browser, server):
    opened = Tab(browser, key=server.key)
    try:
        yield opened
    finally:
        opened.close()


KEY = "sesame"  # the server's --api-key; a tab finds it stored, but in test_page_sends_the_api_key
LONG = 100_000  # tokens: the tiny model's greedy reply runs that long, some 100 s at full speed


def page_options(seed: int, max_tokens: int) -> dict:
    """The sampling the page sends by default (its settings' initial values), with a seed."""
    return {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "max_tokens": max_tokens, "seed": seed}


def a_seed_that_replies(server: Server, message: str, max_tokens: int) -> tuple[int, str]:
    """(seed, reply) for the first seed whose reply is not empty: the untrained model often ends at once."""
    for seed in range(50):
        body = {"model": server.get("/health")["model"], "messages": [{"role": "user", "content": message}],
                **page_options(seed, max_tokens)}
        reply = server.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
        if reply.strip():
            return seed, reply
    pytest.fail("the tiny model gave an empty reply for 50 seeds")


def chat_requests(tab: Tab) -> list[dict]:
    return [json.loads(r["request"]["postData"]) for r in tab.events("Network.requestWillBeSent")
            if r["request"]["url"].endswith("/v1/chat/completions") and r["request"]["method"] == "POST"]


# --- the tests -------------------------------------------------------------------------------------


def test_page_streams_a_reply_and_sends_the_history(server, tab):
    seed, expected = a_seed_that_replies(server, "Hello", max_tokens=40)
    tab.open(f"{server.url}/?send=Hello&seed={seed}&max_tokens=40")
    tab.wait_for(REPLIED, 20, "no reply (nor error) arrived in the page")
    state = tab.eval(STATE)
    assert state["errors"] == []
    assert state["model"] == server.get("/health")["model"]  # the header names the model
    assert state["user"] == ["Hello"]
    [reply] = state["assistant"]
    assert reply["text"].strip(), state
    assert "done" in reply["classes"]
    assert reply["text"] == expected  # the streamed pieces, joined: what the API gives for the same seed
    assert (state["send"], state["stop"]) == (False, True)  # idle again: Send on, Stop off

    [request] = chat_requests(tab)
    assert request["stream"] is True
    assert request["messages"] == [{"role": "user", "content": "Hello"}]
    assert request["seed"] == seed and request["max_tokens"] == 40
    [response] = [r["response"] for r in tab.events("Network.responseReceived")
                  if r["response"]["url"].endswith("/v1/chat/completions")]
    assert response["mimeType"] == "text/event-stream"

    # A second turn, typed and sent with Enter: the whole history goes with it; seed + 1.
    tab.eval("document.getElementById('message').focus()")
    tab.call("Input.insertText", {"text": "Tell me more"})
    for kind in ("keyDown", "keyUp"):
        tab.call("Input.dispatchKeyEvent", {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13})
    tab.wait_for("document.querySelectorAll('#log .assistant.done, #log .assistant.stopped, #log .error').length == 2",
                 20, "no second reply arrived")
    tab.browser.pump(0.2)
    second = chat_requests(tab)[-1]
    assert second["messages"] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": expected},
                                  {"role": "user", "content": "Tell me more"}]
    assert second["seed"] == seed + 1
    assert tab.eval(STATE)["user"] == ["Hello", "Tell me more"]

    # Reset forgets the conversation.
    tab.eval("document.getElementById('reset').click()")
    assert tab.eval("document.querySelectorAll('#log .user, #log .assistant').length") == 0


def test_page_requests_nothing_but_the_server(server, tab):
    tab.open(f"{server.url}/?send=Hi&max_tokens=8&seed=1")
    tab.wait_for(REPLIED, 20, "no reply (nor error) arrived in the page")
    tab.browser.pump(0.3)
    urls = [r["request"]["url"] for r in tab.events("Network.requestWillBeSent")]
    assert any(u.endswith("/v1/chat/completions") for u in urls) and any(u.endswith("/v1/models") for u in urls)
    outside = [u for u in urls if not (u.startswith(server.url + "/") or u.startswith(("data:", "about:")))]
    assert outside == [], f"the page asked for things elsewhere than its server: {outside}"
    # And the file names no other host at all: no CDN, no fonts, no scripts from elsewhere.
    html = PAGE.read_text()
    assert re.findall(r"https?://", html) == []
    assert not re.search(r"<script[^>]+src=|<link[^>]+stylesheet|@import|url\(", html, re.I)


def test_stop_aborts_a_long_reply(server, tab):
    # Greedy decoding from the untrained model does not pick <|endoftext|>: it runs to max_tokens, here
    # LONG tokens, which the server would take a minute or more to decode.
    body = {"model": server.get("/health")["model"], "messages": [{"role": "user", "content": "Go on"}],
            "temperature": 0, "max_tokens": 300}
    start = server.post("/v1/chat/completions", body)
    assert start["choices"][0]["finish_reason"] == "length", "greedy decoding ended early: pick another prompt"
    start = start["choices"][0]["message"]["content"]
    before = server.get("/health")

    tab.open(f"{server.url}/?temperature=0&max_tokens={LONG}&send=Go%20on")
    tab.wait_for("(document.querySelector('#log .assistant.streaming') || {}).textContent", 20,
                 "the long reply did not start")
    tab.eval("document.getElementById('stop').click()")
    tab.wait_for(REPLIED, 10, "Stop did not end the reply")
    state = tab.eval(STATE)
    [reply] = state["assistant"]
    assert "stopped" in reply["classes"] and reply["note"] == "stopped", state
    assert state["errors"] == []
    assert (state["send"], state["stop"]) == (False, True)
    shown = reply["text"]
    assert shown.startswith(start) or start.startswith(shown)  # the greedy reply, cut where Stop came
    tab.browser.pump(0.5)
    assert tab.eval("document.querySelector('#log .assistant').textContent") == shown  # nothing more came

    # The server stopped decoding it (long before its LONG tokens): nothing is active, and (if the
    # server counts them) one more sequence was cancelled.
    deadline = time.monotonic() + 10
    while (health := server.get("/health"))["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0, "the server still decodes the reply the page stopped"
    if "cancelled" in before:
        assert health["cancelled"] == before["cancelled"] + 1

    # The stopped reply stays in the history the next request sends.
    tab.eval("document.getElementById('message').value = 'Again'; document.getElementById('send').click()")
    deadline = time.monotonic() + 10
    while len(chat_requests(tab)) < 2 and time.monotonic() < deadline:
        tab.browser.pump(0.05)
    assert chat_requests(tab)[-1]["messages"] == [{"role": "user", "content": "Go on"},
                                                   {"role": "assistant", "content": shown},
                                                   {"role": "user", "content": "Again"}]

    # Reset in the middle of that reply stops it too, and leaves nothing of it on the page.
    tab.wait_for("(document.querySelector('#log .assistant.streaming') || {}).textContent", 20,
                 "the second reply did not start")
    tab.eval("document.getElementById('reset').click()")
    tab.browser.pump(0.5)
    state = tab.eval(STATE)
    assert (state["assistant"], state["user"], state["errors"]) == ([], [], [])
    assert (state["send"], state["stop"]) == (False, True)
    deadline = time.monotonic() + 10
    while (health := server.get("/health"))["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["active"] == 0, "the server still decodes the reply Reset stopped"


def test_page_shows_the_servers_error(server, tab):
    tab.open(f"{server.url}/?send=Hello&max_tokens={2 * LONG}")
    tab.wait_for("!!document.querySelector('#log .error')", 20, "no error shown")
    state = tab.eval(STATE)
    [error] = state["errors"]
    assert error.startswith(f"Error 400: max_tokens is {2 * LONG}, but this server gives at most {LONG}"), error
    assert state["assistant"] == [] and state["user"] == []
    # The turn is taken back: the message is in the box again, to edit and send again.
    assert tab.eval("document.getElementById('message').value") == "Hello"


def test_page_sends_the_api_key(server, browser):
    tab = Tab(browser)  # no key stored
    try:
        tab.open(f"{server.url}/")
        tab.wait_for("document.getElementById('status').textContent.includes('API key')", 10,
                     "the page did not say the server needs a key")
        model = server.get("/health")["model"]
        assert tab.eval("document.getElementById('model').textContent") == model  # from /health: it needs no key
        tab.eval("document.getElementById('message').value = 'Hello'; document.getElementById('send').click()")
        tab.wait_for("!!document.querySelector('#log .error')", 10, "no error shown")
        [error] = tab.eval(STATE)["errors"]
        assert error.startswith("Error 401: no API key"), error

        tab.eval(f"const k = document.getElementById('api_key'); k.value = '{KEY}';"
                 "k.dispatchEvent(new Event('change')); document.getElementById('send').click()")
        tab.wait_for("!!document.querySelector('#log .assistant.done')", 20, "no reply with the key")
        tab.browser.pump(0.2)
        sent = [r["request"]["headers"] for r in tab.events("Network.requestWillBeSent")
                if r["request"]["url"].endswith("/v1/chat/completions")]
        assert [h.get("Authorization") for h in sent] == [None, f"Bearer {KEY}"]
        assert tab.eval("localStorage.getItem('librarian.api_key')") == KEY
    finally:
        tab.close()
