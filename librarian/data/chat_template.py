"""The chat template: how a conversation is written as text, for training (chat_tokens) and for
chatting (inference.chat). One definition, so that the model is asked in the very format it learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

USER, ASSISTANT = "User:", "Assistant:"
# A request that asks for nothing in particular: chat_data's first `plain` phrasing (a test keeps them
# equal). Guidance's negative prompt replaces the user's last request with it (librarian/inference/chat.py).
NEUTRAL_REQUEST = "Tell me a story."


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


def render_turn(turn: Turn) -> str:
    reply = f" {turn.assistant}" if turn.assistant else ""
    return f"{USER} {turn.user}\n{ASSISTANT}{reply}\n"


def render_prompt(history: list[Turn], message: str) -> str:
    return "".join(render_turn(t) for t in history) + f"{USER} {message}\n{ASSISTANT}"
