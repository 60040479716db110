from dataclasses import replace

import pytest
import torch

from librarian.core.errors import LibrarianError
from librarian.inference.generate import GenerationOptions, Generator, TextStream, filter_logits, generate_ids, window_start
from librarian.model.gpt import GPT
from tests.helpers import gpt_config, tiny_config

CTX = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=40, context_length=CTX, n_layer=2, dropout=0.1)).eval()


@pytest.mark.parametrize("options", [{}, {"attention": "sdpa"}, {"position": "rope"}])
@pytest.mark.parametrize("new_tokens", [5, 60])  # within the context, and far past it (sliding window)
def test_kv_cache_gives_the_same_tokens_as_the_uncached_path(options, new_tokens):
    torch.manual_seed(1)
    m = GPT(tiny_config(vocab_size=40, context_length=CTX, n_layer=2, **options))
    prompt = [3, 1, 4, 1, 5]
    greedy = GenerationOptions(temperature=0, max_new_tokens=new_tokens)
    cached = list(generate_ids(m, prompt, greedy))
    uncached = list(generate_ids(m, prompt, replace(greedy, use_cache=False)))
    assert cached == uncached and len(cached) == new_tokens
    sampling = GenerationOptions(0.9, 10, 0.9, max_new_tokens=new_tokens, seed=5)
    sampled = [list(generate_ids(m, prompt, replace(sampling, use_cache=c))) for c in (True, False)]
    assert sampled[0] == sampled[1]


def test_cached_logits_match_a_full_forward(model):
    x = torch.randint(0, 40, (1, CTX))
    full, _ = model(x)
    cache = model.new_cache()
    first, _ = model(x[:, :10], cache=cache)
    steps = [model(x[:, t : t + 1], cache=cache)[0] for t in range(10, CTX)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


def test_window_jumps_by_half_a_context():
    assert window_start(16, 0, 16) == 0
    assert window_start(17, 0, 16) == 9  # full: keep the last half context
    assert window_start(20, 9, 16) == 9
    assert window_start(26, 9, 16) == 18


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_context_of_one_token_generates(use_cache):
    """model.context_length 1 (every stride 1) trains; its window then slides to the last token, never to none."""
    assert window_start(2, 0, 1) == 1
    torch.manual_seed(0)
    m = GPT(tiny_config(vocab_size=40, context_length=1)).eval()
    sampled = list(generate_ids(m, [3, 1, 4], GenerationOptions(0.9, 10, 0.9, max_new_tokens=20, seed=2,
                                                                use_cache=use_cache)))
    assert len(sampled) == 20 and all(0 <= t < 40 for t in sampled)


def test_prompt_longer_than_the_context_keeps_its_end(model):
    long_prompt = list(range(1, 40)) * 3
    greedy = GenerationOptions(temperature=0, max_new_tokens=8)
    assert list(generate_ids(model, long_prompt, greedy)) == list(generate_ids(model, long_prompt[-CTX:], greedy))


def test_top_k_one_is_greedy(model):
    prompt = [7, 8, 9]
    greedy = list(generate_ids(model, prompt, GenerationOptions(temperature=0, max_new_tokens=20)))
    for seed in range(3):
        top_one = GenerationOptions(temperature=1.3, top_k=1, max_new_tokens=20, seed=seed)
        assert list(generate_ids(model, prompt, top_one)) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = lambda p: torch.isfinite(filter_logits(logits, GenerationOptions(top_p=p))).tolist()
    assert kept(0.5) == [True, False, False, False]
    assert kept(0.51) == [True, True, False, False]
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True, True, True, True]


def test_top_k_and_top_p_compose():
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    kept = torch.isfinite(filter_logits(logits, GenerationOptions(top_k=2, top_p=0.95))).tolist()
    assert kept == [True, True, False, False]  # top-k cut first, then the nucleus of what is left


def test_temperature_scales_the_logits():
    logits = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(filter_logits(logits, GenerationOptions(temperature=2.0)), (logits - 4.0) / 2)
    tiny = filter_logits(logits, GenerationOptions(temperature=1e-40)).softmax(-1)  # no overflow to nan
    assert tiny.tolist() == [0.0, 0.0, 1.0]
    hot = filter_logits(logits, GenerationOptions(temperature=5.0)).softmax(-1)
    cold = filter_logits(logits, GenerationOptions(temperature=0.5)).softmax(-1)
    assert hot.max() < logits.softmax(-1).max() < cold.max()


def test_same_seed_same_tokens_other_seed_differs(model):
    run = lambda seed: list(generate_ids(model, [1, 2, 3], GenerationOptions(max_new_tokens=30, seed=seed)))
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_stops_at_a_stop_id(model):
    options = GenerationOptions(temperature=0, max_new_tokens=10)
    greedy = list(generate_ids(model, [1, 2], options))
    stop = greedy[3]
    cut = list(generate_ids(model, [1, 2], options, stop_ids=(stop,)))
    assert cut == greedy[: greedy.index(stop)]


@pytest.mark.parametrize("bad,message", [(dict(temperature=-0.1), "temperature must be >= 0"),
                                         (dict(top_p=0.0), r"top-p must be in \(0, 1\]"),
                                         (dict(top_p=1.5), r"top-p must be in \(0, 1\]"),
                                         (dict(top_k=-1), "top-k must be a whole number >= 0"),
                                         (dict(temperature=float("inf")), "temperature must be >= 0"),
                                         (dict(top_k=2.5), "top-k must be a whole number >= 0"),
                                         (dict(max_new_tokens=0), "--max-new-tokens must be >= 1, got 0"),
                                         (dict(max_new_tokens=1.5), "--max-new-tokens must be >= 1, got 1.5")])
def test_invalid_generation_options(bad, message):
    with pytest.raises(LibrarianError, match=message):
        GenerationOptions(**bad)
    with pytest.raises(LibrarianError, match=message):  # a change is validated too: options never go bad
        replace(GenerationOptions(), **bad)


def test_empty_prompt_is_refused(model):
    with pytest.raises(LibrarianError, match="prompt is empty"):
        list(generate_ids(model, [], GenerationOptions(max_new_tokens=5)))


def test_text_stream_holds_back_split_characters_and_stop_strings():
    # A fake byte-level decoder: token i is byte i.
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")
    stream = TextStream(decode, stop_strings=("User:",))
    pieces = [stream.push(b) for b in "Hé! Us".encode()]
    assert "".join(pieces) == "Hé! "  # "é" released only when whole; "Us" held: it may become "User:"
    assert [stream.push(b) for b in "er: more".encode()][-1] == ""
    assert stream.stopped and stream.finish() == ""
    other = TextStream(decode, stop_strings=("User:",))
    assert "".join(other.push(b) for b in "Use it".encode()) + other.finish() == "Use it"


def test_generator_streams_text_with_a_real_tokenizer(tmp_path, make_params):
    from librarian.data.tokenizer import train_tokenizer
    from tests.helpers import fixture_stories

    tokenizer = train_tokenizer(fixture_stories()[:100], make_params().tokenizer.model_copy(update={"vocab_size": 400}))
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=tokenizer.get_vocab_size(), context_length=32))
    gen = Generator(model, tokenizer)
    options = GenerationOptions(0.8, 50, 0.95, max_new_tokens=40, seed=5)  # a seed whose first token is not <|endoftext|>
    pieces = list(gen.stream("Once upon a time", options))
    assert len(pieces) > 1  # streamed, not delivered at the end
    assert "".join(pieces) == gen.complete("Once upon a time", options)


# --- threads: --threads, samples.threads and the auto rule ---------------------------------------


def test_auto_threads_is_one_for_the_card_model_and_more_for_wide_ones(monkeypatch):
    from librarian.core import threads
    from librarian.core.errors import LibrarianError

    # Measured on the 2-core EPYC (benchmarks/generate_throughput.py, evaluate_throughput.py --sweep-widths).
    assert threads.auto_threads(gpt_config().d_model) == 1
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    assert threads.auto_threads(gpt_config().d_model) == 1  # decoding: one thread, however many cores
    assert threads.auto_threads(2048) == 1 and threads.auto_threads(2049) == 4
    assert threads.auto_threads(gpt_config().d_model, batched=True) == 4  # evaluation: whole batches per thread
    monkeypatch.setattr(threads, "available_cores", lambda: 64)
    assert threads.auto_threads(4096) == threads.MAX_AUTO_THREADS
    assert threads.resolve_threads(3, 128) == 3 and threads.resolve_threads(0, 128) == 1
    with pytest.raises(LibrarianError, match=r"--threads must be a whole number >= 0 \(0 = auto\), got -1"):
        threads.resolve_threads(-1, 128, "--threads")


@pytest.fixture
def threads_seen(monkeypatch):
    """The torch thread count every generate_ids call ran on."""
    from librarian.inference import generate

    seen, real = [], generate.generate_ids

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        yield from real(*args, **kwargs)

    monkeypatch.setattr(generate, "generate_ids", spy)
    before = torch.get_num_threads()
    yield seen
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    from tests.helpers import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("flag, expected", [(["--threads", "2"], 2), ([], 1)])
def test_generate_runs_on_the_threads_asked_for_or_auto(tiny_files, threads_seen, capsys, flag, expected):
    from librarian.cli.main import main

    torch.set_num_threads(3)  # neither value: the command must set its own
    main(["generate", "--prompt", "Once", "--max-new-tokens", "3", "--seed", "0", "--model", str(tiny_files[0]),
          "--tokenizer", str(tiny_files[1]), *flag])
    assert threads_seen == [expected]  # auto: one thread for a model this small
    assert capsys.readouterr().out.startswith("Once")


def test_chat_runs_on_the_threads_asked_for(tiny_files, threads_seen, monkeypatch, capsys):
    import io

    from librarian.cli.main import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/quit\n"))
    main(["chat", "--threads", "2", "--max-new-tokens", "3", "--seed", "0", "--model", str(tiny_files[0]),
          "--tokenizer", str(tiny_files[1])])
    assert threads_seen == [2]


def test_negative_threads_is_one_error_line(tiny_files, capsys):
    from librarian.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "Once", "--threads", "-1", "--model", str(tiny_files[0]),
              "--tokenizer", str(tiny_files[1])])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err == "error: --threads must be a whole number >= 0 (0 = auto), got -1\n"


@pytest.mark.parametrize("setting, expected", [(2, 2), (0, 1)])
def test_samples_stage_applies_samples_threads(tiny_files, threads_seen, tmp_path, raw_params, monkeypatch, setting,
                                               expected):
    import os

    import yaml

    from stages.samples import main as samples

    raw_params["samples"].update(max_new_tokens=3, threads=setting)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for path in tiny_files:
        os.link(path, tmp_path / "data" / path.name)
    torch.set_num_threads(3)
    samples(["data/model.safetensors", "data/tokenizer.json", "metrics/samples.md"])
    assert threads_seen == [expected] * len(raw_params["samples"]["prompts"])
    assert torch.get_num_threads() == 3  # restored: a library call leaves the process as it found it


# --- the options travel whole: one object from the command line to generate_ids -----------------


@pytest.fixture
def options_seen(monkeypatch):
    """The GenerationOptions every generate_ids call received."""
    from librarian.inference import generate

    seen, real = [], generate.generate_ids

    def spy(model, prompt, options, *args, **kwargs):
        seen.append(options)
        yield from real(model, prompt, options, *args, **kwargs)

    monkeypatch.setattr(generate, "generate_ids", spy)
    return seen


def test_generate_command_passes_every_option_and_a_seed_per_sample(tiny_files, options_seen, capsys):
    from librarian.cli.main import main

    main(["generate", "--prompt", "Once", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.9", "--seed", "4",
          "--max-new-tokens", "3", "--no-cache", "--num-samples", "2", "--model", str(tiny_files[0]),
          "--tokenizer", str(tiny_files[1])])
    asked = GenerationOptions(0.5, 7, 0.9, max_new_tokens=3, seed=4, use_cache=False)
    assert options_seen == [asked, replace(asked, seed=5)]


def test_chat_command_keeps_the_other_options_when_one_changes(tiny_files, options_seen, monkeypatch, capsys):
    import io

    from librarian.cli.main import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/topk 3\nAgain\n/quit\n"))
    main(["chat", "--temperature", "0.7", "--seed", "2", "--max-new-tokens", "4", "--no-cache",
          "--model", str(tiny_files[0]), "--tokenizer", str(tiny_files[1])])
    from librarian.cli.main import CHAT_GUIDANCE

    asked = GenerationOptions(0.7, 50, 0.95, max_new_tokens=4, seed=2, use_cache=False, guidance=CHAT_GUIDANCE)
    # chat guides by default: each reply carries its negative prompt (the conversation, its request made neutral)
    assert all(options.negative for options in options_seen)
    seen = [replace(options, negative=()) for options in options_seen]
    assert seen == [asked, replace(asked, top_k=3, seed=3)]  # reply i samples with seed + i
