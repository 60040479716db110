"""params.yaml as typed, validated configuration: the one place every knob is defined.

Every key is required (params.yaml itself holds the defaults, which are the model card's), unknown
keys are refused, and types are strict: a quoted "32" is a mistake, not a number. Validation
happens once, when a stage starts, and a failure names the key and the values it accepts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from librarian.core.errors import LibrarianError

DEFAULT_PARAMS = Path("params.yaml")

# Token ids are stored as uint16, so no id may exceed 65535.
UINT16_VOCAB_LIMIT = 2**16
REQUIRED_SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")



def _integral(value: object) -> object:
    """A count written as 1500000.0 (what `dvc exp run -S key=1.5e6` stores) is the integer 1500000.

    A non-integral float, or text such as "1.5e6" (YAML 1.1 reads an exponent without a sign as
    text), is refused with the integer to write instead.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and any(c in value for c in ".eE"):  # "32" stays a type error: quoted by mistake
        try:
            number = float(value)
        except ValueError:
            return value  # the strict int check reports it as text
        if number.is_integer():
            raise ValueError(f"must be an integer: write {int(number)}, not {value!r} (YAML reads {value} as text)")
    return value


# Every count: an integral float is accepted as its integer, so -S train.max_tokens=1.5e6 works.
Count = Annotated[int, BeforeValidator(_integral)]
PositiveInt = Annotated[Count, Field(ge=1)]
NonNegativeInt = Annotated[Count, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Share = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    source: Annotated[str, Field(min_length=1)]
    fraction: Fraction
    val_fraction: Fraction
    test_fraction: Fraction

    @model_validator(mode="after")
    def _room_for_train(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave stories for training "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class CleanParams(Section):
    min_chars: NonNegativeInt
    max_chars: PositiveInt
    drop_fragments: bool  # drop stories that end mid-sentence (no terminal punctuation)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be < max_chars ({self.max_chars})")
        return self


class TokenizerParams(Section):
    vocab_size: Annotated[Count, Field(ge=257, le=UINT16_VOCAB_LIMIT)]
    min_frequency: PositiveInt
    special_tokens: list[Annotated[str, Field(min_length=1)]]

    @field_validator("special_tokens")
    @classmethod
    def _has_required(cls, tokens):
        missing = [t for t in REQUIRED_SPECIAL_TOKENS if t not in tokens]
        if missing:
            raise ValueError(f"must include {', '.join(REQUIRED_SPECIAL_TOKENS)}; missing {', '.join(missing)}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("must not repeat a token")
        return tokens

    @model_validator(mode="after")
    def _room_for_bytes(self):
        # A byte-level BPE needs all 256 byte symbols plus the special tokens before any merge.
        floor = 256 + len(self.special_tokens)
        if self.vocab_size < floor:
            raise ValueError(f"vocab_size must be >= {floor} (256 bytes + special tokens), got {self.vocab_size}")
        return self


class TokenizeParams(Section):
    chunk_stories: PositiveInt


class ModelParams(Section):
    n_layer: PositiveInt
    n_head: PositiveInt
    d_model: PositiveInt
    d_ff: PositiveInt
    # Capped: each layer keeps a context x context causal mask (and RoPE tables), so a model file
    # claiming a huge context must not make us allocate gigabytes before its tensors are checked.
    context_length: Annotated[Count, Field(ge=1, le=8192)]
    dropout: Annotated[float, Field(ge=0, lt=1)]
    # Beyond the card, off by default:
    position: Literal["learned", "rope"]
    norm: Literal["layernorm", "rmsnorm"]
    mlp: Literal["gelu", "swiglu", "relu2"]  # relu2: ReLU squared (modded-nanogpt), GELU's parameter count
    attention: Literal["manual", "sdpa"]

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}); "
                "pick an n_head that divides d_model"
            )
        return self


class GPTConfig(ModelParams):
    """The model's architecture: params.yaml's model section plus the tokenizer's vocabulary size.

    One schema with one set of rules: params.yaml is validated by ModelParams, a model file's
    config by this subclass. The card's values live in params.yaml only; nothing here repeats them.
    """

    vocab_size: Annotated[Count, Field(ge=1, le=UINT16_VOCAB_LIMIT)]

    @classmethod
    def from_params(cls, model: ModelParams, vocab_size: int) -> "GPTConfig":
        return cls(vocab_size=vocab_size, **model.model_dump())

    def to_dict(self) -> dict:
        return self.model_dump()


class LearningRateSchedule(Section):
    """The learning rate over a run: one schema for train and finetune."""

    lr: Annotated[float, Field(gt=0)]
    # constant; cosine (down to min_lr over the run); wsd: warmup-stable-decay, constant until the
    # last decay_fraction of the run, then linear down to min_lr.
    schedule: Literal["constant", "cosine", "wsd"]
    warmup_steps: NonNegativeInt
    min_lr: Annotated[float, Field(ge=0)]
    decay_fraction: Fraction  # wsd: the share of the run's steps spent decaying

    @model_validator(mode="after")
    def _floor_below_peak(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        return self


class TrainParams(LearningRateSchedule):
    batch_size: PositiveInt
    # Batch-size warmup (librarian/training/batches.py): over the first batch_warmup_tokens training tokens the
    # batch grows linearly from batch_start to batch_size, in multiples of batch_start; 0 = off.
    batch_start: PositiveInt
    batch_warmup_tokens: NonNegativeInt
    # adamw: AdamW on every parameter (the card). muon: torch.optim.Muon on the blocks' 2-D weight
    # matrices at muon_lr, AdamW on the embeddings, norms and biases (modded-nanogpt's split).
    optimizer: Literal["adamw", "muon"]
    muon_lr: Annotated[float, Field(gt=0)]
    muon_momentum: Annotated[float, Field(ge=0, lt=1)]
    # How the weights start: gpt2 (the card: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer))
    # or zero_proj (the same, with the projections into the residual stream at zero, as modded-nanogpt).
    init: Literal["gpt2", "zero_proj"]
    grad_accum: PositiveInt
    amp: bool
    max_epochs: PositiveInt
    patience: PositiveInt
    stride: PositiveInt
    device: Literal["auto", "cpu", "cuda", "mps"]
    weight_decay: Annotated[float, Field(ge=0)]
    decay_matrices_only: bool
    beta1: Annotated[float, Field(ge=0, lt=1)]
    beta2: Annotated[float, Field(ge=0, lt=1)]
    grad_clip: Annotated[float, Field(ge=0)]
    compile: bool
    fused_loss: bool
    max_steps: NonNegativeInt
    max_tokens: NonNegativeInt
    checkpoint_every: NonNegativeInt
    log_every: PositiveInt  # a train loss and lr point every this many optimizer steps
    threads: NonNegativeInt
    deterministic: bool
    # Pretraining on conversations too (librarian/training/mixture.py): the share of each epoch's windows drawn
    # from the train split's conversations (0 = stories only, the card), where those windows start,
    # and which of their tokens are targets.
    chat_share: Share
    chat_windows: Literal["stream", "aligned"]
    chat_mask: Literal["all", "replies"]

    @model_validator(mode="after")
    def _batch_warmup_in_whole_steps(self):
        if self.batch_warmup_tokens and (self.batch_start > self.batch_size or self.batch_size % self.batch_start):
            raise ValueError(f"batch_start ({self.batch_start}) must divide batch_size ({self.batch_size}): the batch "
                             "warmup grows in multiples of batch_start; e.g. batch_start 8 for batch_size 32")
        return self


class EvalParams(Section):
    stride: PositiveInt
    batch_size: PositiveInt
    threads: NonNegativeInt  # 0 = auto: the fastest count for the model's size


class SamplingParams(Section):
    """How a stage samples text: one schema for the samples, chat_samples and evaluate_chat sections."""

    max_new_tokens: PositiveInt
    temperature: Annotated[float, Field(ge=0)]
    top_k: NonNegativeInt
    top_p: Annotated[float, Field(gt=0, le=1)]
    seed: NonNegativeInt
    threads: NonNegativeInt  # 0 = auto: the fastest count for the model's size


class SamplesParams(SamplingParams):
    prompts: list[Annotated[str, Field(min_length=1)]]  # text to continue (samples) or requests (chat_samples)


REQUEST_KINDS = ("words", "character", "opening", "plain")


class RequestMix(Section):
    """The share of conversations of each request kind; the shares sum to 1."""

    words: Share
    character: Share
    opening: Share
    plain: Share

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = sum(getattr(self, kind) for kind in REQUEST_KINDS)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"the shares must sum to 1, got {total:g}; adjust "
                             + ", ".join(f"{kind} ({getattr(self, kind):g})" for kind in REQUEST_KINDS))
        return self


class ChatDataParams(Section):
    mix: RequestMix
    multi_turn: Share  # share of conversations with two turns: a first one from another story, then this story's
    words_within: NonNegativeInt  # requested words come from the story's first N words; 0 = anywhere
    variants: PositiveInt  # the train split is built this many times, each with other requests (train.chat_share)


class FinetuneParams(LearningRateSchedule):
    """The chat fine-tuning run: these keys replace train's; the rest of train (amp, device, threads,
    compile, fused_loss, betas, grad_accum, log_every, ...) applies as it is."""

    max_epochs: PositiveInt
    max_steps: NonNegativeInt
    max_tokens: NonNegativeInt
    batch_size: PositiveInt
    patience: PositiveInt
    dropout: Annotated[float, Field(ge=0, lt=1)]
    weight_decay: Annotated[float, Field(ge=0)]
    grad_clip: Annotated[float, Field(ge=0)]
    stride: PositiveInt  # new reply tokens per continuation window (see librarian/data/chat_tokens.py)
    reply_windows: Literal["first", "all"]  # first: only each reply's first window, the one with the request in view
    # 0: the base model's context. Longer: fine-tune at a longer context than pretraining (RoPE only:
    # a learned position table has no rows beyond the base model's context).
    context_length: Annotated[Count, Field(ge=0, le=8192)]


class EvaluateChatParams(SamplingParams):
    requests: PositiveInt  # words and character requests each, from the test conversations (fewer if fewer exist)


class Params(Section):
    seed: NonNegativeInt
    data: DataParams
    clean: CleanParams
    tokenizer: TokenizerParams
    tokenize: TokenizeParams
    model: ModelParams
    train: TrainParams
    eval: EvalParams
    samples: SamplesParams
    chat_data: ChatDataParams
    finetune: FinetuneParams
    evaluate_chat: EvaluateChatParams
    chat_samples: SamplesParams

    @model_validator(mode="after")
    def _positions_exist(self):
        check_positions(self.model.position, self.model.context_length, self.finetune.context_length)
        return self

    @model_validator(mode="after")
    def _strides_fit_context(self):
        # finetune.stride is checked against the base model's own context, when fine-tuning starts.
        for key, stride in (("train.stride", self.train.stride), ("eval.stride", self.eval.stride)):
            if stride > self.model.context_length:
                raise ValueError(
                    f"{key} ({stride}) must be <= model.context_length ({self.model.context_length}), "
                    "or tokens would be skipped"
                )
        return self


def check_positions(position: str, base_context: int, finetune_context: int) -> None:
    """Refuse fine-tuning at a context beyond a learned position table (RoPE has no table to outgrow)."""
    if position == "learned" and finetune_context > base_context:
        raise ValueError(
            f"finetune.context_length ({finetune_context}) is beyond the base model's learned position table "
            f"({base_context} positions), which fine-tuning cannot extend; train the base model with "
            "model.position: rope, or set finetune.context_length to 0 (the base model's context)")


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml, or raise LibrarianError naming the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LibrarianError(f"{path} not found; run from the project root or pass --params PATH") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LibrarianError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_params(raw, source=str(path))


def parse_params(raw: object, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise LibrarianError(f"{source} must be a mapping of sections (seed, data, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise LibrarianError(f"{source}: {_describe(errors[0])}{more}") from None


def _describe(error: dict) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key}{_did_you_mean(loc)}; remove it or fix its spelling"
    if kind == "missing":
        return f"missing key {key}; add it (see the params reference in README.md)"
    message = error["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") or kind in {"int_from_float", "model_type"}:
        hint = ""
        if kind == "float_type" and isinstance(error["input"], str):
            hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
        return f"{key} has the wrong type: {message[0].lower()}{message[1:]}, got {error['input']!r}{hint}"
    got = "" if kind == "value_error" else f", got {error['input']!r}"
    return f"{key}: {message[0].lower()}{message[1:]}{got}"


def _did_you_mean(loc: list[str]) -> str:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    if not close:
        return ""
    return f" (did you mean {'.'.join([*loc[:-1], close[0]])}?)"
