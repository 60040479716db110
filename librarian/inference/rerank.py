"""Best of n, ranked by the request: the signal of classifier-free guidance, used to rerank instead of to steer.

Guidance samples each token from log p(w | negative) + γ (log p(w | conversation) − log p(w | negative)).
Reranking samples n whole replies freely and keeps the one with the highest log-likelihood ratio

    log p(reply | conversation) − log p(reply | negative)

the reply the request explains best, compared with any story (the negative prompt is guidance's: the
conversation with its last request replaced by a neutral one). Each reply stays a free sample, so its
text is as fluent as free sampling's; the price is n replies' decoding and two scoring passes each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from librarian.model.gpt import GPT


@torch.no_grad()
def log_likelihood(model: GPT, prompt: list[int], continuation: list[int]) -> float:
    """log p(continuation | prompt) under the model, in nats: one pass over prompt + continuation, which must
    fit the context (the prompt's start is cut off if they do not, as the model would have seen it)."""
    if not 0 < len(continuation) <= model.config.context_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored in a context of "
                         f"{model.config.context_length}")
    ids = (prompt + continuation)[-model.config.context_length - 1 :]
    x = torch.tensor([ids])
    logits, _ = model(x[:, :-1])
    scored = len(continuation)
    logp = F.log_softmax(logits[0, -scored:].float(), dim=-1)
    return logp.gather(-1, x[0, -scored:, None]).sum().item()


def request_gain(model: GPT, prompt: list[int], negative: list[int], reply: list[int]) -> float:
    """How much better the conversation explains `reply` than the negative prompt: the log-likelihood
    ratio, in nats. The reply is cut to what fits after the longer prompt, so both score the same tokens."""
    room = model.config.context_length - max(len(prompt), len(negative))
    reply = reply[: max(room, 1)]
    if not reply:
        return 0.0
    return log_likelihood(model, prompt, reply) - log_likelihood(model, negative, reply)


def best_by_request(model: GPT, prompt: list[int], negative: list[int], replies: list[list[int]]) -> int:
    """The index of the reply with the highest request_gain (the first on a tie)."""
    gains = [request_gain(model, prompt, negative, reply) for reply in replies]
    return max(range(len(replies)), key=lambda i: (gains[i], -i))
