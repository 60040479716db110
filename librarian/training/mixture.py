"""Pretraining on stories and conversations: which windows each epoch trains on (train.chat_share).

An epoch has as many windows as a plain run over the stories (so epochs, token caps and schedules
compare with a plain run's), of which round(chat_share x windows) are conversation windows and the
rest story windows:

- **Conversations** come from the chat_tokens stage: the train split's conversations rendered
  exactly as `librarian chat` renders them (librarian/data/chat_tokens.py), in chat_data.variants
  variants. Epoch e uses variant e mod V, so each story's request is re-drawn from epoch to epoch.
- **Which windows.** Stories and each variant's conversations are taken in turn from an endless
  sequence of seeded permutations: an epoch takes the next ones, so every story window is trained
  on once before any is repeated, and likewise each variant's conversation windows.
- **Where conversation windows lie** (train.chat_windows): `stream` cuts the conversations' token
  stream every train.stride tokens, as stories are cut; `aligned` starts one window at every
  conversation's start (nanochat's document-aligned rows), so the model always sees the request it
  is answering.
- **What they teach** (train.chat_mask): `all` scores every token, requests too (TinyStories-
  Instruct's way); `replies` scores the assistant's tokens only, as fine-tuning does.

The order of an epoch is a function of the seed and the epoch alone, so a resumed run, and every
process of a distributed one, computes the same order.
"""

from __future__ import annotations

import numpy as np
import torch

from librarian.core.config import TrainParams
from librarian.core.rng import rng_for
from librarian.data.chat_tokens import ChatTokens
from librarian.data.tokens import DTYPE
from librarian.data.windows import WindowPlan, Windows


def cyclic_take(n: int, start: int, count: int, seed: int, purpose: str) -> np.ndarray:
    """Items start .. start + count of the endless sequence of seeded permutations of range(n)."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    first, last = start // n, (start + count - 1) // n
    stream = np.concatenate([rng_for(seed, f"{purpose}-{k}").permutation(n) for k in range(first, last + 1)])
    return stream[start - first * n:][:count]


def chat_windows(chat: ChatTokens, context_length: int, tp: TrainParams, eot: int) -> Windows:
    """One variant's conversations as training windows, placed and scored as train.chat_windows and
    train.chat_mask say."""
    mask = chat.loss_mask if tp.chat_mask == "replies" else None  # None: every target
    if tp.chat_windows == "stream":
        return Windows(chat.tokens, context_length, tp.stride, mask)
    mask = np.ones_like(chat.loss_mask) if mask is None else mask
    # A context of <|endoftext|> padding (never scored) makes the last conversation's window whole.
    pad = context_length + 1
    tokens = np.concatenate([chat.tokens, np.full(pad, eot, dtype=DTYPE)])
    mask = np.concatenate([mask, np.zeros(pad, dtype=np.uint8)])
    starts = np.unique(chat.conversation_starts)
    return Windows(tokens, context_length, context_length, mask, WindowPlan(starts, starts, starts + pad))


class Mixture:
    """The windows of a pretraining epoch on stories and conversations; Windows' interface."""

    def __init__(self, stories: Windows, chats: list[Windows], share: float):
        self.stories, self.chats = stories, chats
        self.n = len(stories)
        self.n_chat = round(share * self.n)
        # Window i < n is story window i; then each variant's windows, one after the other.
        self.offsets = np.cumsum([0, self.n] + [len(c) for c in chats])[:-1]
        self.context_length = stories.context_length

    def __len__(self) -> int:
        return self.n

    @property
    def masked(self) -> bool:
        return self.stories.masked or any(chat.masked for chat in self.chats)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's windows in training order: its share of conversations from variant epoch mod V."""
        v = epoch % len(self.chats)
        n_story = self.n - self.n_chat
        story = cyclic_take(self.n, epoch * n_story, n_story, seed, "mixture-stories")
        chat = cyclic_take(len(self.chats[v]), epoch // len(self.chats) * self.n_chat, self.n_chat, seed,
                           f"mixture-variant-{v}")
        windows = np.concatenate([story, self.offsets[v + 1] + chat])
        return windows[rng_for(seed, f"mixture-epoch-{epoch}").permutation(len(windows))]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        indices = np.asarray(indices)
        x = torch.empty(len(indices), self.context_length, dtype=torch.int64)
        y = torch.empty_like(x)
        source = np.searchsorted(self.offsets, indices, side="right") - 1  # 0: stories, v + 1: variant v
        for s in np.unique(source):
            rows = np.flatnonzero(source == s)
            windows = self.stories if s == 0 else self.chats[s - 1]
            x[rows], y[rows] = windows.batch(indices[rows] - self.offsets[s])
        return x, y
