"""Pretraining on stories and conversations (train.chat_share): the mixture of each epoch, and a mixed
run's determinism, resume after kill -9 and refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from librarian.data.chat_tokens import load_chat_tokens
from librarian.data.windows import IGNORE, Windows, epoch_order
from librarian.core.errors import LibrarianError
from librarian.training.mixture import Mixture, chat_windows, cyclic_take
from librarian.training.train import TrainPaths, build_trainer, train
from tests.helpers import TINY_MODEL, VOCAB, chat_variants, set_dotted, stories, write_chat_variants, write_tokens
from tests.dvc_project import code_env

MIXED = {"train.chat_share": 0.5, "train.chat_windows": "stream", "train.chat_mask": "all"}


@pytest.fixture
def data(tmp_path):
    """Story token files and a chat_tokens output of two variants, in one folder."""
    write_tokens(tmp_path / "tokens", "train", stories(150, seed=1), VOCAB)
    write_tokens(tmp_path / "tokens", "val", stories(30, seed=2), VOCAB)
    write_chat_variants(tmp_path / "chat_tokens", n_variants=2)
    return tmp_path


@pytest.fixture
def mixed(make_params):
    def make(**overrides):
        return make_params(**{**TINY_MODEL, **MIXED, **overrides})

    return make


def paths(root):
    return TrainPaths(model=root / "model", curves=root / "live", speed=root / "speed", state=root / "state")


def story_windows(n: int = 100, ctx: int = 8) -> Windows:
    return Windows(np.arange(n * ctx + 1, dtype=np.uint16) % VOCAB, ctx, ctx)


def mixture(share: float, variants: int = 3, mode: str = "stream", mask: str = "all", make_params=None) -> Mixture:
    tp = make_params(**{**TINY_MODEL, "train.chat_windows": mode, "train.chat_mask": mask}).train
    chats = [chat_windows(c, 8, tp, eot=0) for c in chat_variants(variants, 60, seed=5)]
    return Mixture(story_windows(), chats, share)


@pytest.mark.parametrize("share", [0.1, 0.25, 0.5, 0.77, 1.0])
def test_the_share_of_conversation_windows_holds_to_within_rounding(share, make_params):
    mix = mixture(share, make_params=make_params)
    for epoch in range(4):
        order = mix.order(1337, epoch)
        chat = int((order >= mix.n).sum())
        assert len(order) == mix.n == 100 and chat == round(share * 100)
        assert abs(chat / len(order) - share) <= 0.5 / len(order)


def test_each_epoch_takes_the_next_variant_and_variants_differ(make_params):
    mix = mixture(0.5, variants=3, make_params=make_params)
    for epoch in range(6):
        order = mix.order(1337, epoch)
        chat = order[order >= mix.n]
        v = epoch % 3
        assert ((chat >= mix.offsets[v + 1]) & (chat < mix.offsets[v + 1] + len(mix.chats[v]))).all(), epoch
    # The variants are other conversations, so their windows hold other tokens.
    assert not np.array_equal(mix.chats[0].tokens[:200], mix.chats[1].tokens[:200])


def test_every_story_window_is_taken_once_before_any_repeats(make_params):
    mix = mixture(0.3, make_params=make_params)  # 70 story windows an epoch, of 100
    first, second = ((o := mix.order(7, e))[o < mix.n] for e in range(2))
    assert len(set(first)) == 70 and set(first) | set(second) == set(range(100))
    # The endless sequence of permutations: consecutive takes, across a permutation's end, hold each item once.
    assert np.array_equal(np.sort(np.concatenate([cyclic_take(10, 0, 4, 1, "x"), cyclic_take(10, 4, 6, 1, "x")])),
                          np.arange(10))
    assert len(set(cyclic_take(10, 5, 10, 1, "x")[:5]) | set(cyclic_take(10, 0, 5, 1, "x"))) == 10


def test_the_order_depends_on_seed_and_epoch_only(make_params):
    a, b = mixture(0.5, make_params=make_params), mixture(0.5, make_params=make_params)
    assert np.array_equal(a.order(1, 2), b.order(1, 2))
    assert not np.array_equal(a.order(1, 2), a.order(2, 2)) and not np.array_equal(a.order(1, 2), a.order(1, 5))


def test_a_batch_holds_each_window_as_its_own_source_gives_it(make_params):
    mix = mixture(0.5, mask="replies", make_params=make_params)
    order = mix.order(1337, 1)
    x, y = mix.batch(order[:16])
    for row, index in enumerate(order[:16]):
        s = int(np.searchsorted(mix.offsets, index, side="right") - 1)
        source = mix.stories if s == 0 else mix.chats[s - 1]
        sx, sy = source.batch([index - mix.offsets[s]])
        assert (x[row] == sx[0]).all() and (y[row] == sy[0]).all()


def test_aligned_windows_start_at_conversations_and_replies_mask_the_requests(make_params):
    tp = make_params(**{**TINY_MODEL, "train.chat_windows": "aligned", "train.chat_mask": "replies"}).train
    chat = chat_variants(1, 30, seed=2)[0]
    windows = chat_windows(chat, 16, tp, eot=0)
    assert len(windows) == 30 and np.array_equal(windows.plan.starts, chat.conversation_starts)
    x, y = windows.batch(np.arange(30))
    assert (x[:, 0] == 40).all()  # every window opens with its request
    scored = y != IGNORE
    targets = windows.plan.starts[:, None] + np.arange(1, 17)
    assert np.array_equal(scored.numpy(), chat.loss_mask[np.minimum(targets, len(chat.loss_mask) - 1)].astype(bool)
                          & (targets < len(chat.loss_mask)))
    every = chat_windows(chat, 16, tp.model_copy(update={"chat_mask": "all"}), eot=0)
    assert (every.batch(np.arange(29))[1] != IGNORE).all()  # all tokens are targets (but the end's padding)


def test_share_zero_is_the_plain_run(tiny_params, data):
    trainer = build_trainer(tiny_params(), data / "tokens", paths(data / "run"), chat_tokens_dir=data / "chat_tokens")
    assert type(trainer.train_windows) is Windows
    assert np.array_equal(trainer.train_windows.order(1337, 3), epoch_order(len(trainer.train_windows), 1337, 3))


@pytest.fixture
def tiny_params(make_params):
    return lambda **o: make_params(**{**TINY_MODEL, **o})


def test_a_mixed_run_is_deterministic_and_learns_the_conversations(mixed, data):
    runs = {}
    for name, seed in (("a", 1337), ("b", 1337), ("other", 7)):
        params = mixed(**{"seed": seed, "train.max_epochs": 2})
        train(params, data / "tokens", paths(data / name), data / "chat_tokens")
        runs[name] = (data / name / "model" / "model.safetensors").read_bytes()
    assert runs["a"] == runs["b"] != runs["other"]
    plain = paths(data / "plain")
    train(mixed(**{"train.chat_share": 0.0, "train.max_epochs": 2}), data / "tokens", plain)
    assert (plain.model / "model.safetensors").read_bytes() != runs["a"]


def test_a_mixed_run_without_conversations_is_refused(mixed, data, tmp_path):
    with pytest.raises(LibrarianError, match="no chat tokens folder was given"):
        build_trainer(mixed(), data / "tokens", paths(data / "run"))
    from librarian.data.chat_tokens import build_chat_tokens

    build_chat_tokens(tmp_path / "nothing", tmp_path / "no-tokenizer.json", tmp_path / "empty", 0.0)
    with pytest.raises(LibrarianError, match=r"holds no conversations .*rerun `dvc repro chat_tokens`"):
        build_trainer(mixed(), data / "tokens", paths(data / "run"), chat_tokens_dir=tmp_path / "empty")


def test_chat_tokens_of_another_tokenizer_or_damaged_are_refused(mixed, data):
    manifest = data / "chat_tokens" / "chat_tokens.json"
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**meta, "tokenizer_sha256": "other"}))
    with pytest.raises(LibrarianError, match="another tokenizer"):
        load_chat_tokens(data / "chat_tokens", "test", VOCAB)
    manifest.write_text(json.dumps(meta))
    tokens = data / "chat_tokens" / "variant-1.tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2] + b"\x01\x00")
    with pytest.raises(LibrarianError, match="does not match its manifest"):
        load_chat_tokens(data / "chat_tokens", "test", VOCAB)


# --- the stage, killed ------------------------------------------------------------------------------


def stage(project, params):
    return subprocess.Popen([sys.executable, "-m", "stages.train", "data/tokens", "data/chat_tokens", "data/model",
                             "metrics/train", "metrics/train_speed", "data/train_state", "--params", str(params)],
                            cwd=project, env=code_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_mixed_run_resumes_bit_identical_after_kill_9(raw_params, tmp_path):
    for key, value in {**TINY_MODEL, **MIXED, "train.chat_mask": "replies", "train.max_epochs": 8,
                       "train.checkpoint_every": 3}.items():
        set_dotted(raw_params, key, value)
    projects = {}
    for name in ("straight", "killed"):
        project = projects[name] = tmp_path / name
        write_tokens(project / "data" / "tokens", "train", stories(150, seed=1), VOCAB)
        write_tokens(project / "data" / "tokens", "val", stories(30, seed=2), VOCAB)
        write_chat_variants(project / "data" / "chat_tokens", n_variants=3)
        (project / "metrics").mkdir()
        (project / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    straight = stage(projects["straight"], "params.yaml")
    assert straight.wait(timeout=300) == 0, straight.stderr.read()
    killed = projects["killed"]
    proc = stage(killed, "params.yaml")
    state, deadline = killed / "data" / "train_state" / "state.pt", time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: make it longer"
    again = stage(killed, "params.yaml")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "resuming at" in out, (out, err)
    for name in ("model.safetensors", "last.safetensors"):
        assert (projects["straight"] / "data/model" / name).read_bytes() == (killed / "data/model" / name).read_bytes()
