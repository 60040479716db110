"""Continuous batching (librarian/inference/batching.py) in-process: the SlotCache, and the Engine against generate_ids."""

from __future__ import annotations

import threading

import pytest
import torch

from librarian.inference.batching import FINISH_CANCELLED, Engine
from librarian.inference.generate import GenerationOptions, generate_ids
from librarian.model.gpt import GPT
from tests.helpers import tiny_config


@pytest.fixture(scope="module", params=["learned", "rope"])
def model(request):
    torch.manual_seed(0)
    return GPT(tiny_config(position=request.param, context_length=32)).eval()


@torch.inference_mode()
def test_slot_rows_at_their_own_lengths_match_each_sequence_alone(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16]]
    slots = model.new_slot_cache(8)
    alone = []
    for row, prompt in enumerate(prompts):
        cache = model.new_cache()
        model.hidden(torch.tensor([prompt]), cache)
        slots.rows = row + 1
        slots.load(row, cache)
        alone.append(cache)
    nxt = torch.tensor([[20], [21], [22], [23]])
    together = model.hidden(nxt, slots)[:, 0]
    for row, cache in enumerate(alone):
        single = model.hidden(nxt[row : row + 1], cache)[0, 0]
        torch.testing.assert_close(together[row], single, rtol=1e-5, atol=1e-6)
    assert slots.lengths[:4].tolist() == [len(p) + 1 for p in prompts]
    slots.move(3, 1)  # the last row over a finished one: it goes on from there
    slots.rows = 3
    after = model.hidden(torch.tensor([[30], [31], [32]]), slots)[:, 0]
    torch.testing.assert_close(after[1], model.hidden(torch.tensor([[31]]), alone[3])[0, 0], rtol=1e-5, atol=1e-6)


def run_engine(model, requests, slots=64):
    """Submit every (prompt, options) at once; their token lists, in order."""
    engine = Engine(model, slots=slots)
    outs = [[] for _ in requests]
    done = threading.Semaphore(0)

    def emitter(i):
        return lambda token: done.release() if token is None else outs[i].append(token)

    try:
        jobs = [engine.submit(p, o, (0,), emitter(i)) for i, (p, o) in enumerate(requests)]
        for _ in requests:
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    return outs, jobs, engine


def test_engine_gives_each_sequence_the_tokens_it_gets_alone_past_the_context(model):
    # 90 tokens in a context of 32: every sequence's window slides (a refill) several times mid-batch.
    requests = [([1 + i, 2 + i, 3 + i], GenerationOptions(temperature=0 if i % 3 == 0 else 1.0, top_k=(0, 20)[i % 2],
                                                         top_p=(1.0, 0.9)[i % 2 == 0], max_new_tokens=90, seed=i))
                for i in range(7)]
    outs, jobs, engine = run_engine(model, requests, slots=3)  # fewer slots than requests: some wait their turn
    for (prompt, options), out in zip(requests, outs):
        assert out == list(generate_ids(model, prompt, options, (0,)))
    assert engine.peak_rows == 3 and engine.steps < sum(len(o) for o in outs)


def test_a_cancelled_sequence_frees_its_row_and_the_others_go_on(model):
    engine = Engine(model, slots=2)
    got = {0: [], 1: []}
    ended = {0: threading.Event(), 1: threading.Event()}
    gate = threading.Event()

    def emitter(i):
        def emit(token):
            if token is None:
                ended[i].set()
            else:
                got[i].append(token)
                if i == 0 and len(got[0]) == 3:
                    gate.set()
        return emit

    options = GenerationOptions(temperature=1.0, max_new_tokens=400, seed=1)
    try:
        first = engine.submit([1, 2], options, (), emitter(0))
        second = engine.submit([3, 4], options, (), emitter(1))
        assert gate.wait(30)
        engine.cancel(first)
        assert ended[0].wait(30) and first.finish_reason == FINISH_CANCELLED and len(got[0]) < 400
        assert ended[1].wait(60) and second.finish_reason == "length" and len(got[1]) == 400
        assert engine.cancelled == 1
    finally:
        engine.close()


def test_closing_the_engine_ends_every_sequence(model):
    engine = Engine(model, slots=4)
    ended = threading.Event()
    job = engine.submit([1], GenerationOptions(max_new_tokens=10_000, seed=0), (),
                        lambda token: ended.set() if token is None else None)
    engine.close()
    assert ended.wait(10) and job.finish_reason == FINISH_CANCELLED
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit([1], GenerationOptions(), (), lambda token: None)


def test_guided_decoding_in_the_engine_equals_guided_generate_ids(model):
    """A guided sequence is two rows of the same step (its prompt's, its negative prompt's): with 3 slots
    for 7 requests, guided and not, greedy and sampled, past the context, each gets generate_ids' tokens."""
    requests = [([1 + i, 2 + i, 3 + i], GenerationOptions(
        temperature=0 if i % 3 == 0 else 1.0, top_k=(0, 20)[i % 2], max_new_tokens=50, seed=i,
        guidance=(1.0, 2.0, 3.5)[i % 3], negative=((), (7, 8), (9,) * 40)[i % 3]))
        for i in range(7)]
    outs, _, engine = run_engine(model, requests, slots=3)
    for (prompt, options), out in zip(requests, outs):
        assert out == list(generate_ids(model, prompt, options, (0,)))
    assert engine.peak_rows == 3
    guided = [out for (_, o), out in zip(requests, outs) if o.guidance != 1]
    free = [list(generate_ids(model, p, GenerationOptions(**{**o.__dict__, "guidance": 1.0, "negative": ()}), (0,)))
            for p, o in requests if o.guidance != 1]
    assert guided != free  # guidance changed the text


def test_guidance_one_is_plain_decoding_and_a_guided_sequence_needs_two_slots(model):
    plain = GenerationOptions(temperature=1.0, max_new_tokens=30, seed=5)
    one = GenerationOptions(temperature=1.0, max_new_tokens=30, seed=5, guidance=1.0, negative=(3, 4))
    assert list(generate_ids(model, [1, 2], one, (0,))) == list(generate_ids(model, [1, 2], plain, (0,)))
    engine = Engine(model, slots=1)
    try:
        with pytest.raises(ValueError, match="takes 2 rows"):
            engine.submit([1, 2], GenerationOptions(guidance=2.0), (0,), lambda token: None)
    finally:
        engine.close()
