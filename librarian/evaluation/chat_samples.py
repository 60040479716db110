"""How the chat_samples stage lays out the chat model's replies (metrics/chat_samples.md).

Each request is the first turn of a chat, sent and stopped as `librarian chat` does. A module of its
own, not part of librarian/evaluation/samples.py, so that the samples stage does not depend on librarian/inference/chat.py.
"""

from librarian.data.chat_template import render_prompt
from librarian.evaluation.samples import Layout
from librarian.inference.chat import STOP_STRINGS

CHAT_SAMPLES = Layout(
    section="chat_samples",
    title="Chat samples",
    prompt="request",
    prompt_label="Request:",
    output_label="Reply:",
    to_model=lambda request: render_prompt([], request),
    stop_strings=STOP_STRINGS,
    tidy=str.strip,  # as the chat shows and keeps a reply
    notes=("format: each request is a new chat's first turn, `User: <request>` then `Assistant:` on the next "
           "line, as `librarian chat` sends it",),
    missing_model="fine-tune the chat model first (`dvc repro finetune`)",
)
