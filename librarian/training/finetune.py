"""The finetune stage: supervised chat fine-tuning of the trained model on the chat_data conversations.

It is the train stage's Trainer, unchanged (one loop, one checkpoint and resume mechanism, the
same curves), given other data and other starting weights:

- the data: the conversations rendered in the chat format, with the loss on the assistant's tokens
  only and windows that keep each request in view (librarian/data/chat_tokens.py);
- the weights: data/model/model.safetensors, whose architecture the run keeps; only the dropout
  is the finetune section's, and the context when finetune.context_length is set (a RoPE model
  can learn a longer context than it was pretrained on; a learned position table cannot grow);
- the schedule: the `finetune` section's keys replace the same keys of `train`; everything else of
  `train` (precision, device, threads, compile, fused loss, betas, accumulation) applies as it is,
  except the optimizer: fine-tuning is always AdamW (train.optimizer muon is for training from scratch).

The chat val loss, on the val conversations' reply tokens, picks the best checkpoint and stops early.
"""

from __future__ import annotations

from pathlib import Path

from librarian.core.config import FinetuneParams, ModelParams, Params, TrainParams, check_positions
from librarian.core.errors import LibrarianError
from librarian.data.chat_tokens import chat_token_file, read_chat
from librarian.data.tokenizer import file_sha256, load_tokenizer
from librarian.model.checkpoint import check_same_tokenizer, load_weights, read_tokenizer_sha256
from librarian.model.gpt import GPT, GPTConfig
from librarian.training.runtime import setup_runtime
from librarian.training.train import Progress, Trainer, TrainPaths, run_locked

# The finetune keys that replace train's: every key the two sections share, derived so that a key added
# to both cannot be forgotten here, except `stride`: finetune's is new reply tokens per window after a
# reply's first (librarian/data/chat_tokens.py), not train's step between windows. dropout,
# reply_windows and context_length, which train lacks, are the finetune run's own too.
OWN_MEANING = ("stride",)
TRAIN_KEYS = tuple(key for key in FinetuneParams.model_fields
                   if key in TrainParams.model_fields and key not in OWN_MEANING)


def finetune_params(params: Params, base: GPTConfig) -> Params:
    """The params the Trainer runs with: train's, with finetune's keys, and the base model's architecture."""
    ft = params.finetune
    # AdamW always: finetune's lr is an AdamW lr, and train.muon_lr was tuned for training from scratch.
    # No batch warmup: it is for the first steps from random weights, and finetune has its own batch.
    train = TrainParams.model_validate({**params.train.model_dump(), **{k: getattr(ft, k) for k in TRAIN_KEYS},
                                        "optimizer": "adamw", "batch_warmup_tokens": 0,
                                        "chat_share": 0.0})  # its data is all conversations already
    try:  # the base model may come from another run than params.yaml's model section
        check_positions(base.position, base.context_length, ft.context_length)
    except ValueError as exc:
        raise LibrarianError(str(exc)) from None
    model = ModelParams.model_validate({**base.model_dump(exclude={"vocab_size"}), "dropout": ft.dropout,
                                        "context_length": ft.context_length or base.context_length})
    return params.model_copy(update={"train": train, "model": model})


def load_base(model_path: str | Path, tokenizer_path: str | Path) -> tuple[GPT, object, str]:
    """The base model and its tokenizer, checked to belong together."""
    model_path = Path(model_path)
    if not model_path.exists():
        raise LibrarianError(f"base model {model_path} not found; fine-tuning starts from the trained model: run "
                             "`dvc repro train` first")
    base = load_weights(model_path)
    tokenizer = load_tokenizer(tokenizer_path)
    sha = file_sha256(tokenizer_path)
    check_same_tokenizer(model_path, read_tokenizer_sha256(model_path), sha, f"tokenizer {tokenizer_path}")
    if tokenizer.get_vocab_size() != base.config.vocab_size:
        raise LibrarianError(f"tokenizer {tokenizer_path} has {tokenizer.get_vocab_size()} tokens but {model_path} "
                             f"expects {base.config.vocab_size}; use the tokenizer the model was trained with")
    return base, tokenizer, sha


def build_finetuner(params: Params, base_path: str | Path, chat_dir: str | Path, tokenizer_path: str | Path,
                    paths: TrainPaths) -> Trainer:
    base, tokenizer, sha = load_base(base_path, tokenizer_path)
    run_params = finetune_params(params, base.config)
    runtime = setup_runtime(run_params.train)
    ctx = run_params.model.context_length
    first_only = params.finetune.reply_windows == "first"
    train_split, val_split = (chat_token_file(read_chat(chat_dir, split), tokenizer, ctx, params.finetune.stride, sha,
                                              first_only) for split in ("train", "val"))
    return Trainer(run_params, runtime, train_split, val_split, paths, init=base, name="finetune")


def finetune(params: Params, base_path: str | Path, chat_dir: str | Path, tokenizer_path: str | Path,
             paths: TrainPaths) -> Progress:
    """Fine-tune the base model on the chat conversations; resumes like train."""
    return run_locked(paths, lambda: build_finetuner(params, base_path, chat_dir, tokenizer_path, paths))
