"""Chat fine-tuning: the chat format's tokens, the assistant-only loss, the reply windows, the finetune run."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from librarian.inference.chat import render_prompt
from librarian.data.chat_tokens import chat_token_file, conversations, encode_conversations, render_conversation, reply_nats
from librarian.data.windows import IGNORE, Windows
from librarian.core.errors import LibrarianError
from librarian.model.gpt import GPT
from librarian.data.tokenizer import EOT, load_tokenizer
from tests.helpers import TINY_CONTEXT, build_tiny, fixture_stories, set_dotted, tiny_config
from tests.dvc_project import code_env


def chat_table(turns: list[list[tuple[str, str]]]) -> pd.DataFrame:
    """A chat_data table: one row per turn."""
    rows = [{"conversation": c, "turn": t, "kind": "plain", "request": request, "reply": reply, "words": [],
             "character": "", "story": c}
            for c, conversation in enumerate(turns) for t, (request, reply) in enumerate(conversation)]
    return pd.DataFrame(rows)


STORY = ("Once upon a time, there was a little cat named Tom. Tom liked to jump on the big bed. One day he "
         "jumped so high that he saw the moon. He was very happy and told his friend the dog all about it.")
TABLE = chat_table([
    [("Tell me a story about Tom.", STORY)],
    [("Tell me a story.", "Lily had a red ball. She played with it all day."),
     ("Write a story that uses the words ball, jump and happy.", STORY)],
    [("Continue this story: Sam went out.", "He saw a bird. The bird sang a song, and Sam was glad.")],
])


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny[1])


def masked_text(tokenizer, tokens, mask) -> str:
    return tokenizer.decode([int(t) for t, m in zip(tokens, mask) if m], skip_special_tokens=False)


def test_the_text_is_what_chat_renders_and_the_mask_covers_the_replies_and_their_end_markers(tokenizer):
    turns = conversations(TABLE)[1]
    text, spans = render_conversation(turns)
    # Exactly chat's prompt for the last request, then the reply and the end of the conversation.
    assert text.startswith(render_prompt(turns[:1], turns[1].user))
    assert text == render_prompt(turns[:1], turns[1].user) + f" {turns[1].assistant}\n{EOT}"
    assert [text[a:b] for a, b in spans] == [f" {turns[0].assistant}\n", f" {turns[1].assistant}\n{EOT}"]

    chat = encode_conversations(tokenizer, [turns])
    assert tokenizer.decode(chat.tokens.tolist(), skip_special_tokens=False) == text
    # The assistant's tokens are the replies with their end markers, nothing of the requests or labels.
    assert masked_text(tokenizer, chat.tokens, chat.loss_mask) == "".join(text[a:b] for a, b in spans)
    assert [tokenizer.decode(chat.tokens[a:b].tolist(), skip_special_tokens=False) for a, b in chat.reply_spans] == \
        [text[a:b] for a, b in spans]


@pytest.mark.parametrize("stride", [TINY_CONTEXT, TINY_CONTEXT // 2, 5])
def test_every_reply_token_is_scored_once_and_a_first_window_sees_its_request(tokenizer, stride):
    chat_file = chat_token_file(TABLE, tokenizer, TINY_CONTEXT, stride)
    windows = Windows(chat_file.tokens, TINY_CONTEXT, TINY_CONTEXT, chat_file.loss_mask, chat_file.plan)
    x, y = windows.batch(np.arange(len(windows)))
    scored = np.zeros(len(chat_file.tokens), dtype=int)
    plan = chat_file.plan
    for i in range(len(windows)):
        positions = plan.starts[i] + 1 + np.flatnonzero((y[i] != IGNORE).numpy())
        scored[positions] += 1
        assert (chat_file.tokens[positions] == y[i][y[i] != IGNORE].numpy()).all()
    assert (scored == chat_file.loss_mask).all(), "every assistant token exactly once, nothing else"
    # Each reply's first window starts at its conversation (short requests) with the request in view.
    chat = encode_conversations(tokenizer, conversations(TABLE))
    for conv_start, (first, _) in zip(chat.conversation_starts, chat.reply_spans):
        window = np.flatnonzero(plan.score_from == first)[0]
        assert plan.starts[window] == max(conv_start, first - TINY_CONTEXT // 2)
        assert first - plan.starts[window] <= TINY_CONTEXT // 2 or plan.starts[window] == conv_start


def test_first_only_keeps_one_window_per_reply_the_one_with_its_request(tokenizer):
    every = chat_token_file(TABLE, tokenizer, TINY_CONTEXT, TINY_CONTEXT)
    first = chat_token_file(TABLE, tokenizer, TINY_CONTEXT, TINY_CONTEXT, first_only=True)
    chat = encode_conversations(tokenizer, conversations(TABLE))
    assert len(first.plan.starts) == len(chat.reply_spans) < len(every.plan.starts)
    assert first.plan.score_from.tolist() == chat.reply_spans[:, 0].tolist()
    kept = np.isin(every.plan.score_from, chat.reply_spans[:, 0])  # the first window of each reply, in both
    assert every.plan.starts[kept].tolist() == first.plan.starts.tolist()
    assert every.plan.score_to[kept].tolist() == first.plan.score_to.tolist()


def test_a_stride_beyond_the_context_is_refused(tokenizer):
    with pytest.raises(LibrarianError, match="finetune.stride"):
        chat_token_file(TABLE, tokenizer, TINY_CONTEXT, TINY_CONTEXT + 1)


def tiny_gpt(vocab_size: int) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size=vocab_size, dropout=0.0))


def test_the_request_targets_do_not_change_the_loss_and_get_no_gradient(tokenizer):
    chat_file = chat_token_file(TABLE, tokenizer, TINY_CONTEXT, TINY_CONTEXT)
    windows = Windows(chat_file.tokens, TINY_CONTEXT, TINY_CONTEXT, chat_file.loss_mask, chat_file.plan)
    x, y = windows.batch(np.arange(len(windows)))
    model = tiny_gpt(tokenizer.get_vocab_size())
    logits = model(x)[0].detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    masked = y == IGNORE
    assert masked.any() and (~masked).any()
    assert logits.grad[masked].abs().max() == 0, "a masked position got a gradient"
    assert logits.grad[~masked].abs().sum(-1).min() > 0

    # Other request ids (the original targets behind the mask) leave the loss as it was.
    raw = torch.from_numpy(chat_file.tokens[chat_file.plan.starts[:, None] + np.arange(1, TINY_CONTEXT + 1)]
                           .astype(np.int64))
    changed = torch.where(masked, (raw + 7) % tokenizer.get_vocab_size(), raw)
    assert not torch.equal(changed[masked], raw[masked])
    kept = torch.where(masked, torch.full_like(raw, IGNORE), changed)
    assert torch.equal(kept, y)
    again = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), kept.flatten())
    assert again.item() == pytest.approx(loss.item(), abs=0)


def test_reply_nats_is_the_mean_over_assistant_tokens_only(tokenizer):
    chat_file = chat_token_file(TABLE, tokenizer, TINY_CONTEXT, TINY_CONTEXT)
    model = tiny_gpt(tokenizer.get_vocab_size())
    nats, count = reply_nats(model, chat_file, batch_size=2)
    assert count == int(chat_file.loss_mask.sum()) == chat_file.meta["reply_tokens"]
    windows = Windows(chat_file.tokens, TINY_CONTEXT, TINY_CONTEXT, chat_file.loss_mask, chat_file.plan)
    x, y = windows.batch(np.arange(len(windows)))
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), reduction="sum")
    assert nats == pytest.approx(expected.item(), rel=1e-5)


# --- the finetune run ---------------------------------------------------------------------------

FINETUNE = {"finetune.max_steps": 24, "finetune.batch_size": 4, "finetune.stride": TINY_CONTEXT,
            "finetune.warmup_steps": 2, "finetune.max_epochs": 3, "finetune.lr": 3.0e-3, "finetune.min_lr": 3.0e-4,
            "finetune.reply_windows": "all", "train.threads": 1, "train.checkpoint_every": 2,
            "eval.batch_size": 8}


@pytest.fixture
def finetune_project(tmp_path, raw_params):
    """A project folder with what finetune reads: a base model, its tokenizer and chat conversations."""

    data = tmp_path / "data"
    (data / "chat").mkdir(parents=True)
    model, tokenizer = build_tiny(data, record_tokenizer=True)
    model.rename(data / "base.safetensors")
    stories = fixture_stories()
    requests = ["Tell me a story.", "Write a story about a dog.", "Tell me a story about a girl."]
    for split, chosen in (("train", stories[:48]), ("val", stories[48:56])):
        turns = [[(requests[i % 3], story)] for i, story in enumerate(chosen)]
        chat_table(turns).to_parquet(data / "chat" / f"{split}.parquet", index=False)
    for key, value in FINETUNE.items():
        set_dotted(raw_params, key, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    assert tokenizer == data / "tokenizer.json"
    return tmp_path


STAGE_ARGS = ["data/base.safetensors", "data/chat", "data/tokenizer.json", "data/chat_model", "metrics/finetune",
              "metrics/finetune_speed", "data/finetune_state"]


def run_stage(project, **kw):
    return subprocess.Popen([sys.executable, "-m", "stages.finetune", *STAGE_ARGS], cwd=project, env=code_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_finetune_starts_from_the_base_model_learns_the_replies_and_keeps_the_architecture(finetune_project):
    from librarian.model.checkpoint import load_weights

    proc = run_stage(finetune_project)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    summary = json.loads((finetune_project / "data/chat_model/train.json").read_text())
    base = load_weights(finetune_project / "data/base.safetensors")
    tuned = load_weights(finetune_project / "data/chat_model/model.safetensors")
    assert tuned.config.model_dump() == {**base.config.model_dump(), "dropout": 0.0}
    assert summary["global_step"] == 24 and summary["stop_reason"] == "max_steps"
    curves = json.loads((finetune_project / "metrics/finetune/metrics.json").read_text())
    assert curves["val_loss"] == pytest.approx(summary["best_val_loss"]) and "train_loss" in curves
    # The chat val loss, on the replies only, fell from the base model's.
    from librarian.data.chat_tokens import read_chat

    val = chat_token_file(read_chat(finetune_project / "data/chat", "val"),
                          load_tokenizer(finetune_project / "data/tokenizer.json"), TINY_CONTEXT, TINY_CONTEXT)
    before, after = (reply_nats(m, val, 8) for m in (base, tuned))
    assert before[1] == after[1] and after[0] / after[1] < before[0] / before[1] - 0.1
    assert after[0] / after[1] == pytest.approx(summary["best_val_loss"], rel=1e-4)
    assert "finetune: stopped (max_steps)" in out
    assert not (finetune_project / "data/finetune_state").exists()


def test_finetune_resumes_bit_identical_after_kill_9(finetune_project, tmp_path):
    # Long enough that the kill, right after the first checkpoint, lands mid-run.
    raw = yaml.safe_load((finetune_project / "params.yaml").read_text())
    set_dotted(raw, "finetune.max_steps", 150)
    (finetune_project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    straight = tmp_path / "straight"
    shutil.copytree(finetune_project, straight)
    assert run_stage(straight).wait(timeout=300) == 0
    proc = run_stage(finetune_project)
    state = finetune_project / "data/finetune_state/state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill: make it longer"
    assert not (finetune_project / "data/chat_model").exists()
    again = run_stage(finetune_project)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "resuming at" in out, (out, err)
    for name in ("model.safetensors", "last.safetensors"):
        assert (straight / "data/chat_model" / name).read_bytes() == \
            (finetune_project / "data/chat_model" / name).read_bytes()


@pytest.mark.parametrize("case,fix", [
    ("no base model", "run `dvc repro train` first"),
    ("no chat data", "run `dvc repro chat_data` first"),
])
def test_bad_input_is_one_line_and_leaves_nothing(finetune_project, case, fix):
    if case == "no base model":
        (finetune_project / "data/base.safetensors").unlink()
    else:
        (finetune_project / "data/chat/val.parquet").unlink()
    proc = run_stage(finetune_project)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.count("\n") == 1 and err.startswith("error:") and fix in err, err
    assert not (finetune_project / "data/chat_model").exists() and not (finetune_project / "metrics/finetune").exists()


def test_a_rope_model_fine_tunes_at_a_longer_context_and_learned_positions_are_refused(finetune_project):
    """finetune.context_length: RoPE has no position table, so the chat model may see more than the base did."""
    from librarian.model.checkpoint import load_weights, save_weights
    from librarian.core.config import load_params
    from librarian.training.finetune import finetune
    from librarian.data.tokenizer import file_sha256
    from librarian.training.train import TrainPaths

    data = finetune_project / "data"
    learned = load_weights(data / "base.safetensors")
    rope = GPT(learned.config.model_copy(update={"position": "rope"}))
    save_weights(rope, data / "rope.safetensors", file_sha256(data / "tokenizer.json"))
    raw = yaml.safe_load((finetune_project / "params.yaml").read_text())
    set_dotted(raw, "model.position", "rope")
    set_dotted(raw, "finetune.context_length", 2 * TINY_CONTEXT)
    set_dotted(raw, "finetune.max_steps", 4)
    (finetune_project / "long.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(finetune_project / "long.yaml")

    def paths(name):
        root = finetune_project / name
        return TrainPaths(model=root / "model", curves=root / "live", speed=root / "speed", state=root / "state")

    finetune(params, data / "rope.safetensors", data / "chat", data / "tokenizer.json", paths("long"))
    tuned = load_weights(finetune_project / "long" / "model" / "model.safetensors")
    assert tuned.config.context_length == 2 * TINY_CONTEXT and tuned.config.position == "rope"
    # A base model with a learned table (params.yaml said rope, the file says otherwise) is refused at start.
    with pytest.raises(LibrarianError, match=r"beyond the base model's learned position table \(32 positions\)"):
        finetune(params, data / "base.safetensors", data / "chat", data / "tokenizer.json", paths("refused"))
    assert not (finetune_project / "refused" / "model").exists()
