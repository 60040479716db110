"""Continuous batching: many sequences share each decoding step's forward pass (for `librarian serve`).

A 1.3M-parameter model leaves the CPU mostly idle on one sequence: a decoding step costs its
~60 small ops' overhead, not FLOPs, and the output head's 8000 x d_model weights are read again
for every token. One step for many sequences pays that once, so the engine keeps up to `slots`
sequences in one SlotCache and advances them all together. A request that arrives while others
decode joins at the next step: its prompt is run alone (a prefill, as in generate_ids), its cache
loaded into a free row, and from then on it moves with the batch. Each sequence keeps its own
Decoding (librarian/inference/generate.py): its window, its sampling settings and its own seeded random
generator, so the sampled tokens do not depend on which other requests share the batch.

Not bit for bit: MKL picks its matrix kernel by the number of rows, so a row's logits in a batch
of 16 can differ from a batch of one in the last bits of a float. A token can only change where
two candidates are that close (a near-tie in argmax, or a random draw on the edge between two
tokens); tests/inference/test_serve.py and benchmarks/serve_throughput.py compare batched texts with solo
ones.

The engine runs on one thread of its own; submit, cancel and close may be called from any other.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from librarian.inference.generate import FINISH_LENGTH, Decoding, GenerationOptions, Window, choose, guided_logits
from librarian.inference.logprobs import Scores, token_scores
from librarian.model.gpt import GPT

log = logging.getLogger("librarian.serve")

ADMIT_PER_STEP = 4
FINISH_CANCELLED = "cancelled"  # the client went away, or the server stops
FINISH_ERROR = "error"


@dataclass(eq=False)
class Job:
    """One sequence in the engine, and where its tokens go.

    emit(token) receives each new token id, then emit(None) once at the end; job.finish_reason
    says why it ended. Both are called on the engine's thread and must not block. With `logprobs`
    set (k >= 0), each token's scores (its log-probability and the k likeliest tokens') are appended
    to `scores` before the token is emitted (librarian/inference/logprobs.py).
    """

    decoding: Decoding
    emit: Callable[[int | None], None]
    cancelled: bool = False
    finish_reason: str | None = None
    tokens: int = 0  # tokens emitted
    error: str | None = field(default=None, repr=False)
    logprobs: int | None = None
    scores: list[Scores] = field(default_factory=list, repr=False)


@dataclass(eq=False)
class _Row:
    """What a row of the cache decodes: a job's own window, or (guidance) its negative prompt's."""

    job: Job
    window: Window


def _rows_of(job: Job) -> int:
    return 1 if job.decoding.negative is None else 2


class Engine:
    """Decode many sequences together on a thread of its own."""

    def __init__(self, model: GPT, slots: int = 64):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = model.eval()
        self.cache = model.new_slot_cache(slots)
        self.slots = slots
        self.device = model.tok_emb.weight.device
        self.rows: list[_Row] = []  # row i of the cache holds rows[i]
        self.waiting: collections.deque[Job] = collections.deque()
        self.wake = threading.Condition()
        self.closing = False
        self.steps = 0  # decoding steps run
        self.cancelled = 0  # sequences stopped before their end (a client went away)
        self.peak_rows = 0  # the most sequences one step has decoded: tests see that requests shared steps
        self.thread = threading.Thread(target=self._run, name="librarian-decode", daemon=True)
        self.thread.start()

    # --- any thread ---

    def submit(self, prompt: list[int], options: GenerationOptions, stop_ids: tuple[int, ...],
               emit: Callable[[int | None], None], logprobs: int | None = None) -> Job:
        job = Job(Decoding(prompt, options, stop_ids, self.model.config.context_length), emit, logprobs=logprobs)
        if _rows_of(job) > self.slots:
            raise ValueError(f"a guided sequence takes 2 rows, and this engine has {self.slots} slot")
        with self.wake:
            if self.closing:
                raise RuntimeError("the engine is closed")
            self.waiting.append(job)
            self.wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Stop a job at the next step; its row is free for the next request then."""
        job.cancelled = True
        with self.wake:
            self.wake.notify()

    @property
    def active(self) -> int:
        return len(self._jobs())

    def _jobs(self) -> list[Job]:
        """Every job decoding or waiting, once each (a guided job has two rows)."""
        return list({id(e.job): e.job for e in self.rows}.values()) + list(self.waiting)

    def stop(self) -> None:
        """End every job (finish reason `cancelled`) at the next step and refuse new ones; returns at once
        (a signal handler calls it)."""
        self.closing = True
        if self.wake.acquire(blocking=False):  # never wait for the lock inside a signal handler
            try:
                self.wake.notify()
            finally:
                self.wake.release()

    def close(self, timeout: float = 10.0) -> None:
        """stop(), and wait for the thread to end."""
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join(timeout)

    # --- the engine's thread ---

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wake:
                while not (self.rows or self.waiting or self.closing):
                    self.wake.wait(timeout=0.5)  # stop() may not get the lock to notify
                if self.closing:
                    break
            try:
                with torch.inference_mode():
                    self.step()
            except Exception as exc:  # noqa: BLE001 - a bug must end the requests, not hang them
                log.exception("decoding failed")
                for job in self._jobs():
                    job.error = f"{type(exc).__name__}: {exc}"
                    self._end(job, FINISH_ERROR)
                self.rows, self.cache.rows = [], 0
                self.waiting.clear()
        for job in self._jobs():
            self._end(job, FINISH_CANCELLED)
        self.rows, self.cache.rows = [], 0
        self.waiting.clear()

    def step(self) -> None:
        """One step for every sequence: drop the ended ones, refill slid windows, decode the rest
        together, sample, then admit waiting requests."""
        self._drop_ended()
        logits = {}
        for row, entry in enumerate(self.rows):
            window = entry.window.refill()
            if window is not None:  # the window slid: run it alone, as generate_ids does
                logits[row] = self._prefill(window, row)
        if len(logits) < len(self.rows):
            logits |= self._decode_rows(set(logits))
        self._accept(logits)
        self._admit()

    def _drop_ended(self) -> None:
        for row in range(len(self.rows) - 1, -1, -1):
            entry = self.rows[row]
            job = entry.job
            if job.cancelled or job.finish_reason is not None or job.decoding.finish_reason is not None:
                if job.finish_reason is None:
                    self.cancelled += job.cancelled
                    self._end(job, FINISH_CANCELLED if job.cancelled else job.decoding.finish_reason)
                last = len(self.rows) - 1
                if row != last:
                    self.cache.move(last, row)
                    self.rows[row] = self.rows[last]
                self.rows.pop()
                self.cache.rows = len(self.rows)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows, at most ADMIT_PER_STEP a step: a burst of arrivals
        then delays the running sequences by a few prefills a step, not by all of them at once.
        A guided request takes two rows: its prompt's and its negative prompt's."""
        admitted = 0
        while admitted < ADMIT_PER_STEP:
            with self.wake:
                if not self.waiting or len(self.rows) + _rows_of(self.waiting[0]) > self.slots:
                    return
                job = self.waiting.popleft()
            admitted += 1
            if job.cancelled:
                self._end(job, FINISH_CANCELLED)
                continue
            logits = {}
            for window in filter(None, (job.decoding.window, job.decoding.negative)):
                row = len(self.rows)
                self.rows.append(_Row(job, window))
                self.cache.rows = len(self.rows)
                logits[row] = self._prefill(window.refill(), row)
            self._accept(logits)

    def _prefill(self, window: list[int], row: int) -> torch.Tensor:
        """Run `window` alone from an empty cache, load the cache into `row`; its next-token logits (V,)."""
        cache = self.model.new_cache()
        hidden = self.model.hidden(torch.tensor([window], device=self.device), cache)
        self.cache.load(row, cache)
        return self.model.next_logits(hidden[0, -1]).cpu()  # as generate_ids: the same bits

    def _decode_rows(self, skip: set[int]) -> dict[int, torch.Tensor]:
        """One forward pass over every row; rows in `skip` (refilled this step) are fed and then undone.
        The logits (V,) of every other row."""
        last = torch.tensor([[entry.window.ids[-1]] for entry in self.rows], device=self.device)
        hidden = self.model.hidden(last, self.cache)[:, 0]
        # One row takes generate_ids' matrix-vector product for the head: a lone request's tokens are then
        # generate's, bit for bit.
        logits = (self.model.next_logits(hidden[0]).unsqueeze(0) if len(self.rows) == 1
                  else self.model.next_logits(hidden)).cpu()
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(self.rows))
        for row in skip:  # their key and value went past their length: masked, and overwritten next
            self.cache.take_back(row)
        return {row: logits[row] for row in range(len(self.rows)) if row not in skip}

    def _accept(self, logits: dict[int, torch.Tensor]) -> None:
        """Sample a token for each job from its rows' logits (row -> (V,)), and pass it on. A guided
        job's two rows make one distribution (guided_logits), as in generate_ids."""
        jobs, rows = [], []
        negative_rows = {id(e.job): r for r, e in enumerate(self.rows) if e.window is e.job.decoding.negative}
        for row, entry in enumerate(self.rows):
            if row in logits and entry.window is entry.job.decoding.window:
                jobs.append(entry.job)
                rows.append(row)
        if not jobs:
            return
        chosen = torch.stack([self._distribution(job, logits[row], logits, negative_rows) for job, row in zip(jobs, rows)])
        decodings = [job.decoding for job in jobs]
        tokens = choose(chosen, [d.options for d in decodings], [d.generator for d in decodings])
        for job, row, token in zip(jobs, rows, tokens):
            if job.cancelled:
                continue
            if job.decoding.accept(token) is not None:
                job.tokens += 1
                if job.logprobs is not None:  # from the raw logits, before guidance and the sampling settings
                    job.scores.append(token_scores(logits[row], token, job.logprobs))
                job.emit(token)
            if job.decoding.finish_reason is not None:
                self._end(job, job.decoding.finish_reason)

    @staticmethod
    def _distribution(job: Job, own: torch.Tensor, logits: dict[int, torch.Tensor], negative_rows: dict) -> torch.Tensor:
        if job.decoding.negative is None:
            return own
        return guided_logits(own, logits[negative_rows[id(job)]], job.decoding.options.guidance)

    def _end(self, job: Job, reason: str) -> None:
        if job.finish_reason is None:
            job.finish_reason = reason
            job.emit(None)


__all__ = ["Engine", "Job", "FINISH_CANCELLED", "FINISH_ERROR", "FINISH_LENGTH"]
