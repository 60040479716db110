"""params.yaml as typed, validated configuration: the one place every knob is defined.

Every key is required (params.yaml itself holds the defaults, which are the model card's), unknown
keys are refused, and types are strict: a quoted "32" is a mistake, not a number. Validation
happens once, when a stage starts, and a failure names the key and the values it accepts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal

from ruamel.yaml import YAML, YAMLError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from librarian.core.errors import LibrarianError

DEFAULT_PARAMS = Path("params.yaml")

# Token ids are stored as uint16, so no id may exceed 65535.
UINT16_VOCAB_LIMIT = 2**16
REQUIRED_SPECIAL_TOKENS = ("<|endoftext|>", "<pad>")

RULE = "rule"  # the json_schema_extra key of a cross-key rule, for the params reference


def doc(meaning: str, rule: str | None = None) -> FieldInfo:
    """A key's meaning for the params reference (docs/reference/params.md, librarian/core/params_doc.py).

    `rule` is the part of what the key accepts that its type cannot say: a cross-key rule such as
    "divides d_model", checked by a validator. Neither changes validation.
    """
    return Field(description=meaning, json_schema_extra={RULE: rule} if rule else None)


def _integral(value: object) -> object:
    """A count written as 1500000.0 (what `dvc exp run -S key=1.5e6` stores) is the integer 1500000.

    A non-integral float, or quoted text such as "1.5e6", is refused with the integer to write instead.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and any(c in value for c in ".eE"):  # "32" stays a type error: quoted by mistake
        try:
            number = float(value)
        except ValueError:
            return value  # the strict int check reports it as text
        if number.is_integer():
            raise ValueError(f"must be an integer: write {int(number)}, not {value!r} (quoted, it is text)")
    return value


# Every count: an integral float is accepted as its integer, so -S train.max_tokens=1.5e6 works.
Count = Annotated[int, BeforeValidator(_integral)]
PositiveInt = Annotated[Count, Field(ge=1)]
NonNegativeInt = Annotated[Count, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]
Share = Annotated[float, Field(ge=0, le=1)]

# Keys that mean the same in two sections, described once.
Dropout = Annotated[float, Field(ge=0, lt=1), doc("dropout rate")]
MaxEpochs = Annotated[PositiveInt, doc("upper bound on epochs")]
MaxSteps = Annotated[NonNegativeInt, doc("stop after this many optimizer steps; 0 = no cap")]
MaxTokens = Annotated[NonNegativeInt, doc("stop after this many training tokens; 0 = no cap")]
BatchSize = Annotated[PositiveInt, doc("windows (sequences) per optimizer step")]
WeightDecay = Annotated[float, Field(ge=0), doc("AdamW decoupled weight decay (torch's default is 0.01)")]
GradClip = Annotated[float, Field(ge=0), doc("max gradient norm; 0 = off")]
SamplingThreads = Annotated[NonNegativeInt, doc(
    "CPU threads; 0 = auto, the fastest count for the model's size. samples and chat_samples: torch threads for "
    "one generation at a time; evaluate_chat: requests answered side by side, one torch thread each")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class DataParams(Section):
    source: Annotated[str, Field(min_length=1), doc(
        "where the stories come from: `hf:<owner>/<name>[@revision]` for the Hugging Face hub, or a local path "
        "(relative to the params file's folder): `.txt` / `.txt.gz` with `<|endoftext|>` lines, `.parquet`, "
        "`.jsonl`, or a folder of shards", rule="`hf:owner/name[@rev]` or a local path")]
    fraction: Annotated[Fraction, doc("share of the train split kept by the `subsample` stage")]
    val_fraction: Annotated[Fraction, doc("share of the clean stories held out for validation",
                                          rule="val_fraction + test_fraction below 1")]
    test_fraction: Annotated[Fraction, doc("share of the clean stories held out for the final test",
                                           rule="val_fraction + test_fraction below 1")]

    @model_validator(mode="after")
    def _room_for_train(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave stories for training "
                f"(got {self.val_fraction} + {self.test_fraction})"
            )
        return self


class CleanParams(Section):
    min_chars: Annotated[NonNegativeInt, doc("stories shorter than this, after normalising, are dropped",
                                             rule="below max_chars")]
    max_chars: Annotated[PositiveInt, doc("stories longer than this are dropped (TinyStories never come close)")]
    drop_fragments: Annotated[bool, doc(
        "drop stories cut off mid-sentence: no sentence-final punctuation, in any script (docs/cleaning.md)")]

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be < max_chars ({self.max_chars})")
        return self


class TokenizerParams(Section):
    vocab_size: Annotated[Count, Field(ge=257, le=UINT16_VOCAB_LIMIT), doc(
        "BPE vocabulary size, special tokens included (token ids are stored as uint16)",
        rule="at least 256 + the number of special tokens")]
    min_frequency: Annotated[PositiveInt, doc("a pair must occur this often to be merged")]
    special_tokens: Annotated[list[Annotated[str, Field(min_length=1)]], doc(
        "the special tokens, ids 0, 1, 2, ... in this order",
        rule=f"includes {' and '.join(f'`{t}`' for t in REQUIRED_SPECIAL_TOKENS)}, no repeats")]

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
    chunk_stories: Annotated[PositiveInt, doc("stories encoded per batch: bounds memory, whatever the corpus size")]


class ModelParams(Section):
    n_layer: Annotated[PositiveInt, doc("transformer blocks")]
    n_head: Annotated[PositiveInt, doc("attention heads", rule="divides d_model")]
    d_model: Annotated[PositiveInt, doc("embedding width")]
    d_ff: Annotated[PositiveInt, doc("feed-forward width")]
    # Capped: each layer keeps a context x context causal mask (and RoPE tables), so a model file
    # claiming a huge context must not make us allocate gigabytes before its tensors are checked.
    context_length: Annotated[Count, Field(ge=1, le=8192), doc(
        "tokens of context (capped: every layer keeps a context x context causal mask)")]
    dropout: Dropout
    # Beyond the card, off by default:
    position: Annotated[Literal["learned", "rope"], doc("learned position embeddings, or rotary embeddings (RoPE)")]
    norm: Annotated[Literal["layernorm", "rmsnorm"], doc("the normalisation in each block")]
    mlp: Annotated[Literal["gelu", "swiglu", "relu2"], doc(
        "the feed-forward block (`relu2`: ReLU squared, as modded-nanogpt, with GELU's parameter count)")]
    attention: Annotated[Literal["manual", "sdpa"], doc(
        "hand-written attention with an explicit mask (the card), or PyTorch's fused kernel (same maths)")]

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

    vocab_size: Annotated[Count, Field(ge=1, le=UINT16_VOCAB_LIMIT), doc("the tokenizer's vocabulary size")]

    @classmethod
    def from_params(cls, model: ModelParams, vocab_size: int) -> "GPTConfig":
        return cls(vocab_size=vocab_size, **model.model_dump())

    def to_dict(self) -> dict:
        return self.model_dump()


class LearningRateSchedule(Section):
    """The learning rate over a run: one schema for train and finetune."""

    lr: Annotated[float, Field(gt=0), doc(
        "peak AdamW learning rate (write floats with a dot: YAML reads `1e-4` as text)")]
    schedule: Annotated[Literal["constant", "cosine", "wsd"], doc(
        "the learning rate after warmup: `constant`; `cosine`, down to min_lr over the run; `wsd` "
        "(warmup-stable-decay), constant until the last decay_fraction of the run, then linear down to min_lr")]
    warmup_steps: Annotated[NonNegativeInt, doc("linear warmup steps")]
    min_lr: Annotated[float, Field(ge=0), doc("the floor of the cosine schedule, the end of the wsd decay",
                                              rule="at most lr")]
    decay_fraction: Annotated[Fraction, doc("`wsd` only: the share of the run's steps spent decaying to min_lr")]

    @model_validator(mode="after")
    def _floor_below_peak(self):
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        return self


class TrainParams(LearningRateSchedule):
    batch_size: BatchSize
    # Batch-size warmup: librarian/training/batches.py.
    batch_start: Annotated[PositiveInt, doc(
        "batch-size warmup: the first steps' batch; the batch grows in multiples of it",
        rule="divides batch_size when batch_warmup_tokens > 0")]
    batch_warmup_tokens: Annotated[NonNegativeInt, doc(
        "batch-size warmup: over the first this many training tokens the batch grows linearly from batch_start "
        "to batch_size, in multiples of batch_start (8, 16, 24, 32); the lr schedule counts the extra steps. "
        "0 = off; finetune never warms its batch up")]
    optimizer: Annotated[Literal["adamw", "muon"], doc(
        "`adamw`: AdamW on every parameter (the card). `muon`: torch.optim.Muon on the blocks' 2-D weight "
        "matrices at muon_lr, AdamW at lr on the embeddings, norms and biases (modded-nanogpt's split; "
        "docs/training.md, Speedrun)")]
    muon_lr: Annotated[float, Field(gt=0), doc(
        "`muon`: the peak lr of the blocks' matrices, scaled by the schedule as lr is; "
        "Muon's weight decay is weight_decay")]
    muon_momentum: Annotated[float, Field(ge=0, lt=1), doc("`muon`: Muon's momentum")]
    init: Annotated[Literal["gpt2", "zero_proj"], doc(
        "how the weights start: `gpt2` (the card: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)) "
        "or `zero_proj` (the same, with the projections into the residual stream at zero, as modded-nanogpt)")]
    grad_accum: Annotated[PositiveInt, doc("micro-batches per optimizer step")]
    amp: Annotated[bool, doc(
        "mixed precision where the hardware has it: bf16 on a CPU with native bf16 (AVX512-BF16, AMX), float32 on "
        "one without (one line says so); on CUDA bf16 from compute capability 8.0, fp16 with loss scaling before. "
        "The precision used is recorded in train.json and metrics/train/metrics.json")]
    max_epochs: MaxEpochs
    patience: Annotated[PositiveInt, doc("epochs without a better validation loss before early stopping")]
    stride: Annotated[PositiveInt, doc("step between training windows of context_length + 1 tokens",
                                       rule="at most model.context_length")]
    device: Annotated[Literal["auto", "cpu", "cuda", "mps"], doc(
        "where to train: `auto` picks cuda, then mps, then cpu")]
    weight_decay: WeightDecay
    decay_matrices_only: Annotated[bool, doc("true: no decay on biases and norm gains (embeddings stay decayed)")]
    beta1: Annotated[float, Field(ge=0, lt=1), doc("AdamW's beta1")]
    beta2: Annotated[float, Field(ge=0, lt=1), doc("AdamW's beta2")]
    grad_clip: GradClip
    compile: Annotated[bool, doc(
        "torch.compile the model; its dropout masks then come from a counter-based hash fused into the kernels "
        "(same Bernoulli masks, another random stream), and with fused_loss each chunk's softmax and gradient is "
        "one compiled kernel. The fastest setup on a 2-core CPU, with fused_loss and `model.attention: manual`: "
        "about 3x the card's eager path (docs/scale.md, Training throughput)")]
    fused_loss: Annotated[bool, doc(
        "the output head and the cross-entropy computed in row chunks: same maths, about 1.8x faster training "
        "on a 2-core CPU")]
    max_steps: MaxSteps
    max_tokens: MaxTokens
    checkpoint_every: Annotated[NonNegativeInt, doc(
        "also checkpoint every this many steps within an epoch; 0 = once an epoch")]
    log_every: Annotated[PositiveInt, doc(
        "a point of the train loss, lr and tokens-seen curves every this many optimizer steps (and at the last)")]
    threads: Annotated[NonNegativeInt, doc("torch CPU threads; 0 = torch's default")]
    deterministic: Annotated[bool, doc(
        "deterministic kernels (free on CPU); false lets CUDA autotune (cuDNN), faster but not repeatable")]
    # Pretraining on conversations too: librarian/training/mixture.py.
    chat_share: Annotated[Share, doc(
        "share of each epoch's training windows drawn from the train conversations (data/chat_tokens), the rest "
        "stories; 0 = stories only, the card's run byte for byte (docs/chat.md, Chat in pretraining)")]
    chat_windows: Annotated[Literal["stream", "aligned"], doc(
        "where conversation windows lie: every train.stride tokens of the conversations' stream, or one at each "
        "conversation's start (the request always in view)")]
    chat_mask: Annotated[Literal["all", "replies"], doc(
        "which tokens of a conversation window are targets: all of them (requests too), or the assistant's only, "
        "as in fine-tuning")]

    @model_validator(mode="after")
    def _batch_warmup_in_whole_steps(self):
        if self.batch_warmup_tokens and (self.batch_start > self.batch_size or self.batch_size % self.batch_start):
            raise ValueError(f"batch_start ({self.batch_start}) must divide batch_size ({self.batch_size}): the batch "
                             "warmup grows in multiples of batch_start; e.g. batch_start 8 for batch_size 32")
        return self


class EvalParams(Section):
    stride: Annotated[PositiveInt, doc(
        "sliding-window step: every token is scored once, with at least context_length - stride tokens of context",
        rule="at most model.context_length")]
    batch_size: Annotated[PositiveInt, doc("windows per evaluation batch")]
    threads: Annotated[NonNegativeInt, doc(
        "CPU threads scoring batches side by side, one torch thread each; 0 = auto: one per core, at most 8")]
    amp: Annotated[bool, doc(
        "the transformer trunk in bf16 where the CPU has native bf16 (as train.amp resolves); float32 elsewhere "
        "and when false. The output head is float32 always; bf16 moves the metrics by up to 1e-3")]


class SamplingParams(Section):
    """How a stage samples text: one schema for the samples, chat_samples and evaluate_chat sections."""

    max_new_tokens: Annotated[PositiveInt, doc("new tokens per sample, at most")]
    temperature: Annotated[float, Field(ge=0), doc("sampling temperature; 0 = greedy")]
    top_k: Annotated[NonNegativeInt, doc("sample from the k likeliest tokens only; 0 = all")]
    top_p: Annotated[float, Field(gt=0, le=1), doc("nucleus sampling: the likeliest tokens up to this total probability")]
    seed: Annotated[NonNegativeInt, doc("seed of every sample")]
    threads: SamplingThreads


class SamplesParams(SamplingParams):
    prompts: Annotated[list[Annotated[str, Field(min_length=1)]], doc(
        "the fixed prompts: text to continue (samples) or requests to answer (chat_samples)")]


REQUEST_KINDS = ("words", "character", "opening", "plain")
SUM_TO_ONE = f"the {len(REQUEST_KINDS)} shares sum to 1"


class RequestMix(Section):
    """The share of conversations of each request kind; the shares sum to 1."""

    words: Annotated[Share, doc('share of "Write a story that uses the words {noun}, {verb} and {adjective}."',
                                rule=SUM_TO_ONE)]
    character: Annotated[Share, doc('share of "Tell me a story about {Name}." and "... about a {kind} named {Name}."',
                                    rule=SUM_TO_ONE)]
    opening: Annotated[Share, doc('share of "Continue this story: {first sentence}"', rule=SUM_TO_ONE)]
    plain: Annotated[Share, doc('share of "Tell me a story."', rule=SUM_TO_ONE)]

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = sum(getattr(self, kind) for kind in REQUEST_KINDS)
        if abs(total - 1) > 1e-6:
            raise ValueError(f"the shares must sum to 1, got {total:g}; adjust "
                             + ", ".join(f"{kind} ({getattr(self, kind):g})" for kind in REQUEST_KINDS))
        return self


class ChatDataParams(Section):
    mix: Annotated[RequestMix, doc("the share of conversations of each request kind")]
    multi_turn: Annotated[Share, doc(
        "share of conversations with two turns: a first one from another story of the split, then this story's")]
    words_within: Annotated[NonNegativeInt, doc(
        "requested words come from the story's first N words, the part a model writes while the request is still "
        "in its context; 0 = anywhere")]
    variants: Annotated[PositiveInt, doc(
        "versions of the train split, each with other requests, kinds and pairs (`train.parquet`, "
        "`train-v1.parquet`, ...); pretraining with train.chat_share uses variant epoch mod N")]


class FinetuneParams(LearningRateSchedule):
    """The chat fine-tuning run: these keys replace train's; the rest of train (amp, device, threads,
    compile, fused_loss, betas, grad_accum, log_every, ...) applies as it is."""

    max_epochs: MaxEpochs
    max_steps: MaxSteps
    max_tokens: MaxTokens
    batch_size: BatchSize
    patience: Annotated[PositiveInt, doc(
        "epochs without a better chat val loss (on reply tokens) before early stopping")]
    dropout: Annotated[Dropout, doc("the fine-tuning run's dropout rate (the rest of the architecture is the base "
                                    "model's)")]
    weight_decay: WeightDecay
    grad_clip: GradClip
    stride: Annotated[PositiveInt, doc(
        "new reply tokens per window after a reply's first one (librarian/data/chat_tokens.py; docs/chat.md, Chat "
        "fine-tuning)", rule="at most the base model's context (checked when fine-tuning starts)")]
    reply_windows: Annotated[Literal["first", "all"], doc(
        "`first`: only each reply's first window, the one with the request in view; `all`: every reply window")]
    context_length: Annotated[Count, Field(ge=0, le=8192), doc(
        "0: the base model's context. Longer fine-tunes at a longer context than pretraining, which needs "
        "`model.position: rope`: a learned position table has no rows beyond the base model's context",
        rule="beyond model.context_length needs `model.position: rope`")]


class EvaluateChatParams(SamplingParams):
    requests: Annotated[PositiveInt, doc(
        "words requests and character requests scored, each, from the test conversations (all of them if the "
        "split has fewer)")]
    guidance: Annotated[float, Field(gt=0, le=20), doc(
        "the classifier-free guidance scale of the *_guided metrics (1 = the free replies again); the free "
        "metrics always sample without guidance")]


class Params(Section):
    seed: Annotated[NonNegativeInt, doc("seeds every random choice (subsample, split, training)")]
    data: Annotated[DataParams, doc("Where the stories come from, and the share held out for validation and test.")]
    clean: Annotated[CleanParams, doc("Which stories the clean stage keeps (docs/cleaning.md).")]
    tokenizer: Annotated[TokenizerParams, doc("The byte-level BPE tokenizer, trained on the clean train stories.")]
    tokenize: Annotated[TokenizeParams, doc("Encoding the splits into token files.")]
    model: Annotated[ModelParams, doc(
        "The architecture. position, norm, mlp and attention go beyond the card; their defaults are the card's.")]
    train: Annotated[TrainParams, doc(
        "Pretraining from scratch. The schedule, optimizer, init, compile, fused_loss and chat_* keys go beyond "
        "the card, off by default.")]
    eval: Annotated[EvalParams, doc("The evaluate stage: the trained model's loss on the test split.")]
    samples: Annotated[SamplesParams, doc("Generations for fixed prompts: the samples stage writes "
                                          "metrics/samples.md.")]
    chat_data: Annotated[ChatDataParams, doc(
        "Conversations built from the clean stories: each reply is a real story (docs/chat.md, Chat fine-tuning).")]
    finetune: Annotated[FinetuneParams, doc(
        "Chat fine-tuning, from data/model. These keys replace train's; the other train keys (precision, device, "
        "threads, compile, fused loss, betas, accumulation, checkpoints, curves) apply as they are, except "
        "train.optimizer: fine-tuning is always AdamW.")]
    evaluate_chat: Annotated[EvaluateChatParams, doc(
        "metrics/chat.json: the base and the fine-tuned model answering the chat test split's requests.")]
    chat_samples: Annotated[SamplesParams, doc(
        "The chat model's replies to fixed requests: metrics/chat_samples.md.")]

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
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LibrarianError(f"{path} not found; run from the project root or pass --params PATH") from None
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise LibrarianError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_params(raw, source=str(path))


def read_yaml(text: str):
    """YAML as DVC reads params.yaml: ruamel's safe loader, YAML 1.2. PyYAML's YAML 1.1 read
    `lr: 1e-4` as text, which DVC read as a number: DVC then saw no change to rerun, and a stage
    that ran refused what DVC had accepted. One reading for both."""
    return YAML(typ="safe").load(text)


def parse_params(raw: object, source: str = "params") -> Params:
    if not isinstance(raw, dict):
        raise LibrarianError(f"{source} must be a mapping of sections (seed, data, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        # A misspelt key is both unknown and missing: name the unknown one first, with its nearest known key.
        errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        first, meant = errors[0], _meant(errors)
        if meant is not None:  # one problem, told once: the misspelt key and the key it was meant to be
            errors.remove(meant)
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise LibrarianError(f"{source}: {_describe(first, meant)}{more}") from None


def _meant(errors: list[dict]) -> dict | None:
    """The missing key a first, unknown key was meant to be: the one key missing in its section
    (learning_rate for lr, however unlike), or None."""
    if errors[0]["type"] != "extra_forbidden":
        return None
    section = errors[0]["loc"][:-1]
    beside = [e for e in errors if e["type"] == "missing" and e["loc"][:-1] == section]
    return beside[0] if len(beside) == 1 else None


def _describe(error: dict, meant: dict | None = None) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        if meant is not None:
            known = ".".join(str(part) for part in meant["loc"])
            return f"unknown key {key} (did you mean {known}, which is missing?); fix its spelling"
        return f"unknown key {key}{_did_you_mean(loc)}; remove it or fix its spelling"
    if kind == "missing":
        return f"missing key {key}; add it (see the params reference, docs/reference/params.md)"
    message = error["msg"].removeprefix("Value error, ")
    if kind.endswith("_type") or kind in {"int_from_float", "model_type"}:
        hint = ""
        if kind == "float_type" and isinstance(error["input"], str):
            hint = " (quoted, it is text: remove the quotes)"
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
