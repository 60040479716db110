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

from librarian.inference.generate import FINISH_LENGTH, Decoding, GenerationOptions, choose
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


class Engine:
    """Decode many sequences together on a thread of its own."""

    def __init__(self, model: GPT, slots: int = 64):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = model.eval()
        self.cache = model.new_slot_cache(slots)
        self.slots = slots
        self.device = model.tok_emb.weight.device
        self.rows: list[Job] = []  # row i of the cache holds rows[i]
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
        return len(self.rows) + len(self.waiting)

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
                for job in self.rows + list(self.waiting):
                    job.error = f"{type(exc).__name__}: {exc}"
                    self._end(job, FINISH_ERROR)
                self.rows, self.cache.rows = [], 0
                self.waiting.clear()
        for job in self.rows + list(self.waiting):
            self._end(job, FINISH_CANCELLED)
        self.rows, self.cache.rows = [], 0
        self.waiting.clear()

    def step(self) -> None:
        """One step for every sequence: drop the ended ones, refill slid windows, decode the rest
        together, then admit waiting requests."""
        self._drop_ended()
        refilled = set()
        for row, job in enumerate(self.rows):
            window = job.decoding.refill()
            if window is not None:  # the window slid: run it alone, as generate_ids does
                self._prefill(job, window, row)
                refilled.add(row)
        if len(refilled) < len(self.rows):
            self._decode_rows(refilled)
        self._admit()

    def _drop_ended(self) -> None:
        for row in range(len(self.rows) - 1, -1, -1):
            job = self.rows[row]
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
        then delays the running sequences by a few prefills a step, not by all of them at once."""
        admitted = 0
        while len(self.rows) < self.slots and admitted < ADMIT_PER_STEP:
            admitted += 1
            with self.wake:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            if job.cancelled:
                self._end(job, FINISH_CANCELLED)
                continue
            row = len(self.rows)
            self.rows.append(job)
            self.cache.rows = len(self.rows)
            self._prefill(job, job.decoding.refill(), row)

    def _prefill(self, job: Job, window: list[int], row: int) -> None:
        cache = self.model.new_cache()
        hidden = self.model.hidden(torch.tensor([window], device=self.device), cache)
        self._accept([job], self.model.next_logits(hidden[0, -1]).cpu().unsqueeze(0))  # as generate_ids: the same bits
        self.cache.load(row, cache)

    def _decode_rows(self, skip: set[int]) -> None:
        """One forward pass over every row; rows in `skip` (refilled this step) are fed and then undone."""
        last = torch.tensor([[job.decoding.ids[-1]] for job in self.rows], device=self.device)
        hidden = self.model.hidden(last, self.cache)[:, 0]
        # One row takes generate_ids' matrix-vector product for the head: a lone request's tokens are then
        # generate's, bit for bit.
        logits = (self.model.next_logits(hidden[0]).unsqueeze(0) if len(self.rows) == 1
                  else self.model.next_logits(hidden)).cpu()
        self.steps += 1
        self.peak_rows = max(self.peak_rows, len(self.rows))
        for row in skip:  # their key and value went past their length: masked, and overwritten next
            self.cache.take_back(row)
        rows = [row for row in range(len(self.rows)) if row not in skip]
        self._accept([self.rows[row] for row in rows], logits[rows] if skip else logits)

    def _accept(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Sample a token for each job from its row of logits (len(jobs), V), and pass it on."""
        decodings = [job.decoding for job in jobs]
        tokens = choose(logits, [d.options for d in decodings], [d.generator for d in decodings])
        for row, (job, token) in enumerate(zip(jobs, tokens)):
            if job.cancelled:
                continue
            if job.decoding.accept(token) is not None:
                job.tokens += 1
                if job.logprobs is not None:  # from the raw logits, before the sampling settings touch them
                    job.scores.append(token_scores(logits[row], token, job.logprobs))
                job.emit(token)
            if job.decoding.finish_reason is not None:
                self._end(job, job.decoding.finish_reason)

    def _end(self, job: Job, reason: str) -> None:
        if job.finish_reason is None:
            job.finish_reason = reason
            job.emit(None)


__all__ = ["Engine", "Job", "FINISH_CANCELLED", "FINISH_ERROR", "FINISH_LENGTH"]
