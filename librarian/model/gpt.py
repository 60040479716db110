"""Librarian's GPT, written from scratch in PyTorch.

Its config is librarian.core.config.GPTConfig (params.yaml's model section plus the vocabulary). The
committed params.yaml is Librarian-Base-v0's: pre-LayerNorm blocks, a GELU MLP, learned positions, causal
self-attention written out by hand with an explicit mask, dropout, and the output head tied to the
token embedding; 2 layers, 4 heads, width 128, feed-forward 256 and context 128 give exactly
1,305,600 parameters at vocab 8000.

Options beyond the card (all off by default): RoPE instead of learned positions, RMSNorm, a SwiGLU
or ReLU-squared MLP and PyTorch's fused scaled_dot_product_attention.

Dropout under torch.compile (train.compile) draws its masks from a counter-based hash instead of
ATen's bernoulli_, which runs one Mersenne-Twister draw at a time on one core: the same Bernoulli
masks (keep with probability 1 - p, scaled by 1 / (1 - p)), another random stream, computed inside
the fused kernels (with sdpa, compiled training with dropout writes the attention out, as sdpa's
math backend does, so that the attention weights' masks are hashed too). Eager runs (the card)
keep F.dropout bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from librarian.core.config import GPTConfig


def make_norm(config: GPTConfig) -> nn.Module:
    return nn.RMSNorm(config.d_model) if config.norm == "rmsnorm" else nn.LayerNorm(config.d_model)


def rope_tables(head_dim: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, shape (length, head_dim / 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys pairwise by position."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


def _shift_right(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int32 bits (torch's >> on int32 copies the sign bit)."""
    return (x >> n) & ((1 << (32 - n)) - 1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of 32-bit words held in int32 (xorshift-multiply, constants from Wellons'
    hash prospector); products wrap modulo 2**32, as the vector instructions compute them."""
    x = x ^ _shift_right(x, 16)
    x = x * 0x21F0AAAD
    x = x ^ _shift_right(x, 15)
    x = x * (0xD35A2D97 - (1 << 32))  # as an int32: the same product modulo 2**32
    return x ^ _shift_right(x, 15)


def dropout_keep(shape: torch.Size, p: float, keys: torch.Tensor) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask of `shape` as int32 0 / 1, from two int32 keys.

    Element i's random word is two rounds of _mix32 over i, keyed with keys[0] and keys[1]; its top
    24 bits are kept when >= round(p * 2**24), the resolution of ATen's bernoulli_ (a 24-bit uniform
    float against p). Arithmetic only, no comparison: Inductor stores a boolean mask made from an
    int32 comparison element by element, which costs more than the hash itself.
    """
    index = torch.arange(math.prod(shape), dtype=torch.int32, device=keys.device).view(shape)
    bits = _mix32(_mix32(index ^ keys[0]) ^ keys[1])
    below = _shift_right(_shift_right(bits, 8) - round(p * 2**24), 31)  # 1 when the 24 bits < the threshold
    return 1 - below


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, except under torch.compile, where the mask is hashed from fresh keys (drawn from
    torch's generator, so runs stay repeatable and resumable) and the element indices: Inductor fuses
    that into the neighbouring kernels, vectorised. ATen's bernoulli_ is a serial Mersenne Twister on
    one core: 6.5 M draws a step at the card's size, 60 of the 225 ms of a compiled step on the 2-core
    EPYC, against 6 ms hashed (benchmarks/train_throughput.py --profile)."""
    if training and p > 0 and torch.compiler.is_compiling() and x.numel() < 2**31:
        keys = torch.randint(-(2**31), 2**31, (2,), dtype=torch.int32, device=x.device)
        return x * dropout_keep(x.shape, p, keys).to(x.dtype) * (1.0 / (1.0 - p))
    return F.dropout(x, p, training)


class KVCache:
    """Keys and values of the tokens seen so far, per layer: decoding then feeds one token a step.

    Buffers of the full context length are allocated once and filled in place: growing them by
    concatenation would copy the whole cache at every step.
    """

    def __init__(self, n_layer: int, context_length: int):
        self.buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.context_length = context_length
        self.length = 0  # tokens cached; also the position of the next token

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.buffers[layer] is None:
            B, H, _, D = k.shape
            self.buffers[layer] = tuple(k.new_empty(B, H, self.context_length, D) for _ in range(2))
        keys, values = self.buffers[layer]
        end = self.length + k.size(2)
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


class SlotCache:
    """Keys and values of many sequences decoded together (continuous batching), each at its own length.

    Rows 0..rows-1 are in use, one sequence each; a sequence's prompt is run alone through a
    KVCache and then loaded into a row (load), and a finished one is replaced by the last row
    (move), so the rows in use stay a prefix and every step reads views, never gathers. A step
    feeds one token per row; each row attends to its own length only (the mask), so rows never see
    each other. Buffers are zeroed: a masked column then weighs 0 times a finite number.
    """

    def __init__(self, n_layer: int, slots: int, n_head: int, head_dim: int, context_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (slots, n_head, context_length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.slots, self.context_length, self.device = slots, context_length, torch.device(device)
        # Tokens cached per row (the next token's position): on the buffers' device, where they index
        # and mask, and mirrored on the host, where they size views (no device sync a step).
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self.host_lengths = [0] * slots
        self.rows = 0

    def load(self, row: int, cache: KVCache) -> None:
        """Put a sequence's prefilled cache into `row`."""
        for layer, (k, v) in enumerate(cache.buffers):
            self.keys[layer][row, :, : cache.length] = k[0, :, : cache.length]
            self.values[layer][row, :, : cache.length] = v[0, :, : cache.length]
        self.lengths[row] = self.host_lengths[row] = cache.length

    def move(self, source: int, target: int) -> None:
        """Copy row `source` over row `target` (the rows in use stay a prefix when one ends)."""
        n = self.host_lengths[source]
        for buffers in (self.keys, self.values):
            for b in buffers:
                b[target, :, :n] = b[source, :, :n]
        self.lengths[target] = self.host_lengths[target] = n

    @property
    def positions(self) -> torch.Tensor:
        """Each row's position for the token of this step, shape (rows,)."""
        return self.lengths[: self.rows]

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this step's key and value (rows, H, 1, D) at each row's position; return the views
        (rows, H, L, D) up to the longest row and the mask (rows, 1, 1, L) of each row's own columns."""
        rows, positions = torch.arange(self.rows, device=self.device), self.positions
        self.keys[layer][rows, :, positions] = k[:, :, 0]
        self.values[layer][rows, :, positions] = v[:, :, 0]
        end = self.longest + 1
        mask = torch.arange(end, device=self.device) <= positions.view(-1, 1, 1, 1)
        return self.keys[layer][: self.rows, :, :end], self.values[layer][: self.rows, :, :end], mask

    @property
    def longest(self) -> int:
        """The largest position of the rows in use (host side)."""
        return max(self.host_lengths[: self.rows])

    def advance(self) -> None:
        self.lengths[: self.rows] += 1
        for row in range(self.rows):
            self.host_lengths[row] += 1

    def take_back(self, row: int) -> None:
        """Undo the last step of `row`: what it wrote lies past its length, masked and overwritten next."""
        self.lengths[row] -= 1
        self.host_lengths[row] -= 1


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.d_model // config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = config.dropout
        self.fused = config.attention == "sdpa"
        # The explicit causal mask of the card: position t may attend to positions <= t only.
        mask = torch.tril(torch.ones(config.context_length, config.context_length, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, config.context_length, config.context_length), persistent=False)
        if config.position == "rope":
            cos, sin = rope_tables(self.head_dim, config.context_length)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def forward(self, x: torch.Tensor, cache: KVCache | SlotCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        past = cache.length if isinstance(cache, KVCache) else 0
        # q, k and v as (B, H, T, D) views in one go: a decoding step pays per op, not per FLOP.
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if isinstance(cache, SlotCache):  # one token per row, each row at its own position
            if self.rope_cos is not None:
                cos, sin = (t[cache.positions].view(B, 1, 1, -1) for t in (self.rope_cos, self.rope_sin))
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k, v, mask = cache.extend(layer, k, v)
            past = 1  # never the is_causal fast path below
        else:
            if self.rope_cos is not None:
                q = apply_rope(q, self.rope_cos[past : past + T], self.rope_sin[past : past + T])
                k = apply_rope(k, self.rope_cos[past : past + T], self.rope_sin[past : past + T])
            if cache is not None:
                k, v = cache.extend(layer, k, v)
            # Rows are the new tokens (positions past .. past+T-1), columns every token so far. A
            # single new token may see every earlier one, so decoding steps need no mask at all.
            mask = self.mask[:, :, past : past + T, : past + T] if T > 1 else None
        # Compiled training with dropout writes sdpa's maths out (as sdpa's math backend does), so
        # that the attention weights' mask comes from dropout() above rather than from bernoulli_.
        if self.fused and not (self.training and self.dropout > 0 and torch.compiler.is_compiling()):
            p = self.dropout if self.training else 0.0
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            att = dropout(F.softmax(att, dim=-1), self.dropout, self.training)
            y = att @ v
        y = y.transpose(1, 2).reshape(B, T, C)
        return dropout(self.proj(y), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu, self.relu2 = config.mlp == "swiglu", config.mlp == "relu2"
        self.fc = nn.Linear(config.d_model, config.d_ff)
        self.gate = nn.Linear(config.d_model, config.d_ff) if self.swiglu else None
        self.proj = nn.Linear(config.d_ff, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Exact (erf) GELU, as in the card and GPT-2's "gelu" in transformers.
        if self.swiglu:
            h = F.silu(self.gate(x)) * self.fc(x)
        elif self.relu2:
            h = F.relu(self.fc(x)).square()
        else:
            h = F.gelu(self.fc(x))
        return dropout(self.proj(h), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | SlotCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model) if config.position == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying: one matrix, counted once
        self._head_t, self._head_key = None, None  # next_logits' transposed head and the weights it was made from
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream keeps its variance in check.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def zero_projections(self) -> None:
        """Zero the projections into the residual stream (train.init zero_proj): every block starts
        as the identity and the first steps shape the embedding and head (modded-nanogpt)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    p.zero_()

    def n_params(self) -> int:
        """Parameter count with the tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, idx: torch.Tensor, cache: KVCache | SlotCache | None = None) -> torch.Tensor:
        """The final hidden states (B, T, d_model) that the output head reads.

        With a cache, idx continues the cached tokens: their positions start at cache.length.
        """
        T = idx.size(1)
        x = self.tok_emb(idx)
        if isinstance(cache, SlotCache):
            if T != 1 or idx.size(0) != cache.rows or cache.longest >= self.config.context_length:
                raise ValueError(f"a slot cache step takes one token for each of its {cache.rows} rows, "
                                 f"within the context length {self.config.context_length}")
            if self.pos_emb is not None:
                x = x + self.pos_emb(cache.positions).unsqueeze(1)
        else:
            past = cache.length if cache is not None else 0
            if past + T > self.config.context_length:
                raise ValueError(f"sequence of {past + T} tokens exceeds the context length {self.config.context_length}")
            if self.pos_emb is not None:
                x = x + self.pos_emb.weight[past : past + T]  # rows past.. of the table: the positions' embeddings
        x = dropout(x, self.config.dropout, self.training)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if isinstance(cache, SlotCache):
            cache.advance()
        elif cache is not None:
            cache.length += T
        return self.ln_f(x)

    def next_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (V,) of the next token from one position's final hidden state (d_model,).

        Decoding reads the whole tied head for every token, and MKL's matrix-vector product runs
        about twice as fast against a (d_model, V) copy as against the (V, d_model) weight itself.
        The copy is made once per version of the weights, so training or loading new ones renews it.
        """
        weight = self.lm_head.weight
        key = (weight.data_ptr(), weight._version, weight.device)
        if self._head_key != key:
            self._head_t, self._head_key = weight.detach().t().contiguous(), key
        return hidden @ self._head_t

    def new_cache(self) -> KVCache:
        return KVCache(self.config.n_layer, self.config.context_length)

    def new_slot_cache(self, slots: int) -> SlotCache:
        c, weight = self.config, self.tok_emb.weight
        return SlotCache(c.n_layer, slots, c.n_head, c.d_model // c.n_head, c.context_length, weight.dtype, weight.device)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        """Logits (B, T, vocab) for token ids (B, T); with targets, also the mean cross-entropy."""
        logits = self.lm_head(self.hidden(idx, cache))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss
