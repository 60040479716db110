"""Benchmark `librarian serve` over real HTTP: tokens/s, time to first token and per-token latency
at 1, 4, 16 and 64 concurrent streams, and whether batching changes the texts.

    python benchmarks/serve_throughput.py [--model data/chat_model/model.safetensors --tokenizer data/tokenizer.json]
    python benchmarks/serve_throughput.py --model /tmp/srv/chat.safetensors --tokenizer /tmp/srv/tokenizer.json \\
        --requests-per-stream 1 --max-tokens 64          # a quicker run
    python benchmarks/serve_throughput.py --url http://127.0.0.1:8000   # a server already running

The server is started as `python -m librarian.cli.main serve --port 0` in a process of its own (stopped
at the end, also on Ctrl-C or an error), unless --url names one. The client is asyncio with
httpx, one connection per stream. At each level of --streams, every stream sends
--requests-per-stream chat requests one after the other (POST /v1/chat/completions, stream: true,
temperature 0.8, top_k 50, top_p 0.95, max_tokens --max-tokens, a seed of its own and a prompt
"Write a story about a WORD." over a list of words). A reply may end before max_tokens (the
model's end-of-text token, or "User:"): the figures count the tokens actually streamed.

Per level: tokens = content chunks that carry text (one per token but where a character's bytes
span tokens), cross-checked with the completion_tokens of `usage` (stream_options.include_usage);
tokens/s = all streams' tokens over the level's wall time, and its ratio to the 1-stream figure
of the same round (or to the first level given, if 1 is not one); time to first token (TTFT:
from sending a request to its first content chunk) and per-token latency (the gap between
consecutive content chunks of a stream), p50 and p95 over every request of the level; errors
(a status other than 200, an error in the stream, no [DONE], a timeout: must be 0); batch, the
mean number of sequences one decoding step advanced (from the steps /health counts, if it does).
The levels run in --repeats interleaved rounds: tokens/s and the ratio are medians over rounds,
the percentiles pool every round. The CPU the server and other processes used meanwhile is
shown, in cores: the machine may be shared, and the client, on the same machine, takes some too.

--check-solo N: N requests sent alone, one at a time, then the same N all at once (half greedy,
half sampled with a seed); the texts should be identical, since each sequence keeps its own seeded
generator (librarian/inference/batching.py says why the last bits of a float, and so rarely a near-tie
token, may still differ).

Goal: 16 streams >= 6x one stream in tokens/s, p95 time to first token < 1 s (at 16 streams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
CHAT_MODEL = ROOT / "data" / "chat_model" / "model.safetensors"
BASE_MODEL = ROOT / "data" / "model" / "model.safetensors"
TOKENIZER = ROOT / "data" / "tokenizer.json"

WORDS = ["dog", "cat", "bird", "tree", "ball", "boat", "star", "frog", "cake", "train", "flower", "bear", "fish",
         "hat", "moon", "rabbit", "car", "duck", "kite", "lion", "apple", "garden", "dragon", "robot", "river",
         "princess", "puppy", "park", "castle", "bunny", "turtle", "monkey"]
SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
SERVE_LINE = re.compile(r"serve: (http://\S+?)/ \(chat page\), API at \S+ for the model '(.*)'; Ctrl-C stops")
GOAL_RATIO, GOAL_LEVEL, GOAL_TTFT_S = 6.0, 16, 1.0
HEADERS: dict[str, str] = {}  # Authorization, for a --url server that wants a key (--api-key)

from common import cpu_name  # noqa: E402  (benchmarks/common.py)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default); nan if empty."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --- the server --------------------------------------------------------------------------------------


class ServerProcess:
    """`librarian serve` in a session of its own (a Ctrl-C in the terminal reaches only us, and we stop it)."""

    def __init__(self, model: Path, tokenizer: Path, threads: int, slots: int):
        command = [sys.executable, "-m", "librarian.cli.main", "serve", "--model", str(model), "--tokenizer",
                   str(tokenizer), "--port", "0", "--threads", str(threads), "--slots", str(slots)]
        self.lines: list[str] = []  # everything it printed (stdout and stderr)
        self.startup_lines = self.stop_lines = 0
        self.found = threading.Event()
        self.url = self.model_id = None
        env = {k: v for k, v in os.environ.items() if k != "LIBRARIAN_API_KEY"}  # no key: the client sends none
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, start_new_session=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # drained to the end, so the server never blocks on a full pipe
            line = line.rstrip("\n")
            self.lines.append(line)
            if (m := SERVE_LINE.search(line)) and not self.found.is_set():
                self.url, self.model_id = m.group(1), m.group(2)
                self.found.set()
        self.found.set()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if not self.found.wait(timeout) or self.url is None:
            raise SystemExit(f"the server did not start (exit code {self.proc.poll()}):\n" + self.tail())
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with code {self.proc.returncode}:\n" + self.tail())
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.startup_lines = len(self.lines)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.url}/health did not answer 200 within {timeout:.0f} s:\n" + self.tail())

    def tail(self, n: int = 20) -> str:
        return "\n".join("  | " + line for line in self.lines[-n:])

    def later_lines(self) -> list[str]:
        """What the server printed from when it was ready until we stopped it: warnings, errors, tracebacks."""
        return self.lines[self.startup_lines:self.stop_lines]

    def stop(self, timeout: float = 15.0) -> None:
        self.stop_lines = len(self.lines)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"the server did not stop within {timeout:.0f} s of SIGTERM: killed", file=sys.stderr)
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the group is it and its children
                self.proc.wait()
        self.reader.join(2)


# --- the client --------------------------------------------------------------------------------------


@dataclass
class Reply:
    text: str = ""
    chunks: int = 0  # content chunks with text
    usage_tokens: int | None = None
    finish_reason: str | None = None
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


async def chat(client: httpx.AsyncClient, model_id: str, prompt: str, max_tokens: int, seed: int,
               sampling: dict) -> Reply:
    """One streamed chat request, timed chunk by chunk."""
    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}, **sampling}
    reply, pieces, done, last = Reply(), [], False, None
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                reply.error = f"HTTP {response.status_code}: {text[:200]}"
                return reply
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    reply.error = f"in the stream: {event['error'].get('message')}"
                    return reply
                if event.get("usage"):
                    reply.usage_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        now = time.perf_counter()
                        if last is None:
                            reply.ttft = now - start
                        else:
                            reply.gaps.append(now - last)
                        last = now
                        reply.chunks += 1
                        pieces.append(piece)
                    if choice.get("finish_reason"):
                        reply.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
        return reply
    reply.text = "".join(pieces)
    if not done:
        reply.error = "the stream ended without [DONE]"
    elif reply.finish_reason is None:
        reply.error = "no chunk had a finish_reason"
    return reply


def new_client(url: str, connections: int, timeout: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # read: the longest wait for the next chunk; pool: for a free connection (there is one per stream)
    timeouts = httpx.Timeout(timeout, connect=10.0, pool=timeout)
    return httpx.AsyncClient(base_url=url, limits=limits, timeout=timeouts, headers=HEADERS)


class CpuMeter:
    """The CPU, in cores, the server and every other process used over a block (the client's own apart)."""

    def __init__(self, server_pid: int | None):
        self.me = psutil.Process()
        self.server = psutil.Process(server_pid) if server_pid else None

    @staticmethod
    def _cpu(process: psutil.Process | None) -> float:
        if process is None:
            return 0.0
        try:
            t = process.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def start(self):
        self.at = (time.perf_counter(), self._busy(), self._cpu(self.me), self._cpu(self.server))

    def stop(self) -> dict:
        wall = time.perf_counter() - self.at[0]
        busy = self._busy() - self.at[1]
        me, server = self._cpu(self.me) - self.at[2], self._cpu(self.server) - self.at[3]
        return {"client_cores": me / wall, "server_cores": server / wall if self.server else math.nan,
                "others_cores": max(0.0, busy - me - server) / wall if self.server else math.nan}


async def health_of(client: httpx.AsyncClient) -> dict:
    """GET /health, or {} if it fails (the level's requests then say what went wrong)."""
    try:
        return (await client.get("/health")).json()
    except (httpx.HTTPError, ValueError):
        return {}


async def run_level(url: str, model_id: str, streams: int, per_stream: int, max_tokens: int, timeout: float,
                    round_no: int, meter: CpuMeter) -> dict:
    """`streams` concurrent streams, each sending `per_stream` requests in turn."""

    async def stream(client: httpx.AsyncClient, s: int) -> list[Reply]:
        replies = []
        for r in range(per_stream):
            i = s * per_stream + r
            seed = 1_000_000 * round_no + 1000 * streams + i
            word = WORDS[(i + streams + round_no) % len(WORDS)]
            replies.append(await chat(client, model_id, f"Write a story about a {word}.", max_tokens, seed, SAMPLING))
        return replies

    async with new_client(url, streams, timeout) as client:
        before = await health_of(client)
        meter.start()
        start = time.perf_counter()
        results = await asyncio.gather(*(stream(client, s) for s in range(streams)))
        wall = time.perf_counter() - start
        cpu = meter.stop()
        health = await health_of(client)
    replies = [reply for replies in results for reply in replies]
    ok = [r for r in replies if r.error is None]
    chunks = sum(r.chunks for r in ok)
    usage = [r.usage_tokens for r in ok if r.usage_tokens is not None]
    # the engine's decoding steps (if /health counts them): the first token of a reply comes from its
    # prefill, every other one from a shared step, so this is the mean number of sequences a step decoded
    steps = health["steps"] - before["steps"] if "steps" in health and "steps" in before else None
    batch = (sum(usage) - len(usage)) / steps if steps and len(usage) == len(ok) else math.nan
    return {"mean_batch": batch, "streams": streams, "requests": len(replies), "errors": len(replies) - len(ok),
            "error_messages": sorted({r.error for r in replies if r.error})[:5], "wall_s": wall,
            "tokens": chunks, "usage_tokens": sum(usage) if len(usage) == len(ok) else None,
            "tokens_per_s": chunks / wall, "finish_length": sum(r.finish_reason == "length" for r in ok),
            "ttft": [r.ttft for r in ok if r.ttft is not None], "gaps": [g for r in ok for g in r.gaps],
            "no_token": sum(r.ttft is None for r in ok), "active_after": health.get("active"), **cpu}


async def warm_up(url: str, model_id: str, streams: int, timeout: float) -> None:
    """One request alone, then `streams` at once (the batch at its widest), short and untimed."""
    async with new_client(url, streams, timeout) as client:
        await chat(client, model_id, "Write a story about a cat.", 16, 0, SAMPLING)
        await asyncio.gather(*(chat(client, model_id, f"Write a story about a {WORDS[i % len(WORDS)]}.", 8, i,
                                    SAMPLING) for i in range(streams)))


async def check_solo(url: str, model_id: str, n: int, max_tokens: int, timeout: float) -> dict:
    """n requests one at a time, then the same n concurrently: how many texts are the same."""
    def sampling(i):  # even: greedy; odd: sampled with a seed
        return {"temperature": 0} if i % 2 == 0 else SAMPLING

    requests = [(f"Write a story about a {WORDS[(3 * i) % len(WORDS)]}.", 500 + i, sampling(i)) for i in range(n)]
    async with new_client(url, n, timeout) as client:
        solo = [await chat(client, model_id, p, max_tokens, seed, s) for p, seed, s in requests]
        together = await asyncio.gather(*(chat(client, model_id, p, max_tokens, seed, s) for p, seed, s in requests))
    same = [a.error is None and b.error is None and a.text == b.text for a, b in zip(solo, together)]
    differ = []
    for i, (a, b) in enumerate(zip(solo, together)):
        if not same[i]:
            at = next((k for k, (x, y) in enumerate(zip(a.text, b.text)) if x != y), min(len(a.text), len(b.text)))
            differ.append({"request": i, "greedy": i % 2 == 0, "first_difference_at_char": at,
                           "solo": a.error or a.text[max(0, at - 30):at + 40],
                           "concurrent": b.error or b.text[max(0, at - 30):at + 40]})
    return {"requests": n, "identical": sum(same), "greedy_identical": sum(same[0::2]), "greedy": len(same[0::2]),
            "sampled_identical": sum(same[1::2]), "sampled": len(same[1::2]),
            "errors": sum(r.error is not None for r in solo + together), "differences": differ}


# --- the report --------------------------------------------------------------------------------------


def summarize(rounds: list[list[dict]], baseline: int) -> list[dict]:
    """Per level: the median over rounds of tokens/s and of its ratio to the baseline level's in the same
    round; percentiles over every round's requests."""
    rows = []
    for level_runs in zip(*rounds):
        ratios = [run["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else math.nan
                  for run, base in zip(level_runs, (r[baseline] for r in rounds))]
        ttft = [t for run in level_runs for t in run["ttft"]]
        gaps = [g for run in level_runs for g in run["gaps"]]
        usage = [run["usage_tokens"] for run in level_runs]
        tokens = sum(run["tokens"] for run in level_runs)
        rows.append({
            "streams": level_runs[0]["streams"],
            "requests": sum(run["requests"] for run in level_runs),
            "errors": sum(run["errors"] for run in level_runs),
            "error_messages": sorted({m for run in level_runs for m in run["error_messages"]})[:5],
            "tokens": tokens,
            "usage_tokens": sum(usage) if None not in usage else None,
            "tokens_per_request": tokens / max(1, sum(run["requests"] - run["errors"] for run in level_runs)),
            "finish_length": sum(run["finish_length"] for run in level_runs),
            "requests_without_a_token": sum(run["no_token"] for run in level_runs),
            "wall_s": [round(run["wall_s"], 3) for run in level_runs],
            "tokens_per_s": statistics.median(run["tokens_per_s"] for run in level_runs),
            "tokens_per_s_rounds": [round(run["tokens_per_s"], 1) for run in level_runs],
            "ratio": statistics.median(ratios),
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p95_ms": 1000 * percentile(ttft, 95),
            "ttft_max_ms": 1000 * max(ttft, default=math.nan),
            "token_gap_p50_ms": 1000 * percentile(gaps, 50), "token_gap_p95_ms": 1000 * percentile(gaps, 95),
            "token_gap_max_ms": 1000 * max(gaps, default=math.nan),
            "mean_batch": statistics.median(run["mean_batch"] for run in level_runs),
            "server_cores": statistics.median(run["server_cores"] for run in level_runs),
            "others_cores": statistics.median(run["others_cores"] for run in level_runs),
            "client_cores": statistics.median(run["client_cores"] for run in level_runs),
            "active_after": [run["active_after"] for run in level_runs],
        })
    return rows


def print_table(rows: list[dict], baseline_streams: int) -> None:
    columns = [("streams", "streams", "{:d}"), ("requests", "reqs", "{:d}"), ("errors", "errors", "{:d}"),
               ("tokens", "tokens", "{:d}"), ("usage_tokens", "usage", "{}"),
               ("tokens_per_s", "tok/s", "{:.1f}"), ("ratio", f"x{baseline_streams}", "{:.2f}"),
               ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"), ("ttft_p95_ms", "TTFT p95 ms", "{:.0f}"),
               ("token_gap_p50_ms", "gap p50 ms", "{:.1f}"), ("token_gap_p95_ms", "gap p95 ms", "{:.1f}"),
               ("token_gap_max_ms", "gap max ms", "{:.0f}"), ("mean_batch", "batch", "{:.1f}"),
               ("server_cores", "server cores", "{:.2f}"), ("others_cores", "others cores", "{:.2f}"),
               ("client_cores", "client cores", "{:.2f}")]
    cells = [[fmt.format(row[key]) for key, _, fmt in columns] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title, _) in enumerate(columns)]
    print("  ".join(title.rjust(w) for (_, title, _), w in zip(columns, widths)))
    for c in cells:
        print("  ".join(cell.rjust(w) for cell, w in zip(c, widths)))


def goal_line(rows: list[dict], baseline_streams: int) -> tuple[str, bool | None]:
    text = (f"goal: {GOAL_LEVEL} streams >= {GOAL_RATIO:g}x one stream in tokens/s, "
            f"p95 time to first token < {GOAL_TTFT_S:g} s")
    row = next((r for r in rows if r["streams"] == GOAL_LEVEL), None)
    if row is None or baseline_streams != 1:
        return f"{text}: not measured (--streams must include 1 and {GOAL_LEVEL})", None
    met = row["ratio"] >= GOAL_RATIO and row["ttft_p95_ms"] < 1000 * GOAL_TTFT_S and row["errors"] == 0
    return (f"{text}: {'met' if met else 'missed'} ({row['ratio']:.2f}x, p95 TTFT {row['ttft_p95_ms'] / 1000:.2f} s, "
            f"{row['errors']} errors)"), met


def rounded(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=CHAT_MODEL if CHAT_MODEL.exists() else BASE_MODEL)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER)
    parser.add_argument("--threads", type=int, default=0, help="serve --threads (default: 0 = auto)")
    parser.add_argument("--slots", type=int, default=64, help="serve --slots (default: 64)")
    parser.add_argument("--url", help="an already running server (e.g. http://127.0.0.1:8000) instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("LIBRARIAN_API_KEY"),
                        help="the key of a --url server started with --api-key (default: $LIBRARIAN_API_KEY)")
    parser.add_argument("--streams", default="1,4,16,64", help="concurrency levels (default: 1,4,16,64)")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--guidance", type=float, default=None,
                        help="send guidance_scale with every request (a guided request takes two rows of a step); "
                             "compare with a run without it")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every level (default: 3)")
    parser.add_argument("--check-solo", type=int, default=8, metavar="N",
                        help="N requests alone, then concurrently: are the texts the same (0: skip; default: 8)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a chunk (default: 120)")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.guidance is not None:
        SAMPLING["guidance_scale"] = args.guidance
    levels = [int(s) for s in args.streams.split(",")]
    if not levels or min(levels) < 1 or args.requests_per_stream < 1 or args.max_tokens < 1 or args.repeats < 1:
        parser.error("--streams, --requests-per-stream, --max-tokens and --repeats must be >= 1")
    baseline = levels.index(1) if 1 in levels else 0

    # Ctrl-C, and SIGTERM made into one, raise KeyboardInterrupt (asyncio.run cancels its tasks first):
    # the finally below stops the server whichever way the run ends
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (cmd &)
    signal.signal(signal.SIGTERM, lambda sig, frame: os.kill(os.getpid(), signal.SIGINT))
    server = None
    try:
        if args.url:
            url = args.url.rstrip("/").removesuffix("/v1")
            if args.api_key:
                HEADERS["Authorization"] = f"Bearer {args.api_key}"
            models = httpx.get(f"{url}/v1/models", headers=HEADERS, timeout=10)
            if models.status_code != 200:
                raise SystemExit(f"{url}/v1/models answered {models.status_code}: {models.text[:200]}")
            model_id = models.json()["data"][0]["id"]
            model = f"{model_id} at {url}"
        else:
            for path in (args.model, args.tokenizer):
                if not path.exists():
                    raise SystemExit(f"{path} not found; pass --model and --tokenizer (or --url)")
            server = ServerProcess(args.model.resolve(), args.tokenizer.resolve(), args.threads, args.slots)
            started = time.perf_counter()
            server.wait_ready(args.startup_timeout)
            url, model_id, model = server.url, server.model_id, str(args.model)
            print(f"server: {url} model {model_id!r}, ready in {time.perf_counter() - started:.1f} s "
                  f"(pid {server.proc.pid})", file=sys.stderr, flush=True)
        health = httpx.get(f"{url}/health", timeout=10).json()
        meter = CpuMeter(server.proc.pid if server else None)
        asyncio.run(warm_up(url, model_id, max(levels), args.timeout))
        rounds = []
        for round_no in range(args.repeats):
            runs = []
            for streams in levels:
                run = asyncio.run(run_level(url, model_id, streams, args.requests_per_stream, args.max_tokens,
                                            args.timeout, round_no, meter))
                runs.append(run)
                print(f"round {round_no + 1}/{args.repeats}, {streams} streams: {run['tokens_per_s']:.1f} tokens/s, "
                      f"{run['errors']} errors, {run['wall_s']:.1f} s", file=sys.stderr, flush=True)
            rounds.append(runs)
        rows = summarize(rounds, baseline)
        solo = asyncio.run(check_solo(url, model_id, args.check_solo, args.max_tokens, args.timeout)) \
            if args.check_solo > 0 else None
    finally:
        if server is not None:
            server.stop()

    print(f"cpu: {cpu_name()}, {psutil.cpu_count()} cores; model {model} ({model_id!r}), server threads "
          f"{args.threads or 'auto'}, slots {health.get('slots')}, context {health.get('context_length')}")
    print(f"work: {args.requests_per_stream} chat request(s) per stream, max_tokens {args.max_tokens}, "
          f"temperature {SAMPLING['temperature']}, top_k {SAMPLING['top_k']}, top_p {SAMPLING['top_p']}; "
          f"{args.repeats} round(s); ratio x{levels[baseline]} = tokens/s over the {levels[baseline]}-stream "
          "figure of the same round")
    print()
    print_table(rows, levels[baseline])
    print()
    for row in rows:
        notes = [f"{row['tokens_per_request']:.0f} tokens a request", f"{row['finish_length']} hit max_tokens"]
        if row["requests_without_a_token"]:
            notes.append(f"{row['requests_without_a_token']} streamed no text")
        if any(a not in (0, None) for a in row["active_after"]):
            notes.append(f"/health active after the level: {row['active_after']} (should be 0)")
        notes += [f"error: {m}" for m in row["error_messages"]]
        print(f"{row['streams']:>3} streams: " + "; ".join(notes))
    if solo:
        print(f"solo vs concurrent: {solo['identical']}/{solo['requests']} texts identical "
              f"(greedy {solo['greedy_identical']}/{solo['greedy']}, seeded sampling "
              f"{solo['sampled_identical']}/{solo['sampled']}), {solo['errors']} errors")
        for d in solo["differences"]:
            print(f"  request {d['request']} ({'greedy' if d['greedy'] else 'sampled'}) differs at char "
                  f"{d['first_difference_at_char']}: solo {d['solo']!r} / concurrent {d['concurrent']!r}")
    line, met = goal_line(rows, levels[baseline])
    print(line)
    said = server.later_lines() if server else []
    if said:
        print(f"the server printed {len(said)} line(s) during the run:")
        for text in said[-20:]:
            print("  | " + text)
    if args.json:
        report = {"cpu": cpu_name(), "cores": psutil.cpu_count(), "model": model, "model_id": model_id,
                  "threads": args.threads, "slots": health.get("slots"),
                  "requests_per_stream": args.requests_per_stream,
                  "max_tokens": args.max_tokens, "sampling": SAMPLING, "repeats": args.repeats,
                  "baseline_streams": levels[baseline], "levels": rows, "check_solo": solo, "goal": line,
                  "goal_met": met, "server_log": said}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rounded(report), indent=2) + "\n")
    errors = sum(r["errors"] for r in rows) + (solo["errors"] if solo else 0)
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; the server was stopped", file=sys.stderr)
        sys.exit(130)
