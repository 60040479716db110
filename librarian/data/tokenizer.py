"""The train_tokenizer stage: a byte-level BPE trained on the train split only.

Byte-level BPE can encode any UTF-8 text without an unknown token, and its decode is the exact
inverse of encode. The special tokens are added first, so their ids are fixed (0, 1, ...) whatever
the corpus, and `<|endoftext|>` is always id 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from librarian.core.config import REQUIRED_SPECIAL_TOKENS, TokenizerParams
from librarian.core.errors import LibrarianError
from librarian.core.io import open_stories, story_batches, write_text
from librarian.core.paths import missing_fix

EOT, PAD = REQUIRED_SPECIAL_TOKENS


def train_tokenizer(stories: Iterable[str] | Iterable[list[str]], params: TokenizerParams,
                    n_stories: int | None = None) -> Tokenizer:
    """A BPE learnt from `stories`: strings, or batches (lists) of them; n_stories counts strings."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=list(params.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(stories, trainer=trainer, length=n_stories)
    return tokenizer


def train_tokenizer_on_split(path: str | Path, params: TokenizerParams) -> Tokenizer:
    """train_tokenizer on a split file, streamed a batch of stories at a time.

    The trainer keeps only a count per distinct word (pre-token), and takes at most one batch of
    stories ahead (its buffer refills up to 256 strings, one whole batch), so memory holds a batch
    and those counts, not the split: peak RSS 169 MiB at 135 k train stories (504 MiB when the
    split was read whole first) and 173 MiB at 1.35 M; the synthetic corpora have 11.5 k distinct
    words. The counts, and so the tokenizer, are the same whatever the batches: sums over stories.
    """
    path = Path(path)
    if not path.is_file():
        raise LibrarianError(f"{path} not found; run `dvc repro clean` first")
    with open_stories(path) as source:
        n_stories = source.metadata.num_rows
    batches = (batch.column(0).to_pylist() for batch in story_batches(path))
    return train_tokenizer(batches, params, n_stories=n_stories)


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> None:
    write_text(path, tokenizer.to_str(pretty=True))


# What to do about a bad tokenizer: the pipeline's own is remade by its stage; one a user gave is theirs to fix.
PIPELINE_FIX = "rerun `dvc repro -f train_tokenizer`"
GIVEN_FIX = "give the tokenizer.json the model was trained with (its project's data/tokenizer.json, or an export's)"


def load_tokenizer(path: str | Path, fix: str = PIPELINE_FIX) -> Tokenizer:
    """Load tokenizer.json, refusing a damaged file or one without the special tokens we rely on."""
    path = Path(path)
    if not path.exists():
        raise LibrarianError(f"tokenizer {path} not found; "
                             + missing_fix(path, "run `dvc repro train_tokenizer` first" if fix == PIPELINE_FIX
                                           else "check the path"))
    if path.is_dir():  # not a damaged tokenizer: retraining would not help
        inside = path / "tokenizer.json"
        hint = f"did you mean {inside}?" if inside.is_file() else "give the path of the tokenizer.json file in it"
        raise LibrarianError(f"tokenizer {path} is a folder, not a file; {hint}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception on bad JSON
        reason = (str(exc).splitlines() or ["unreadable"])[0][:160]
        raise LibrarianError(f"tokenizer {path} is invalid or truncated ({reason}); {fix}") from None
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise LibrarianError(f"tokenizer {path} lacks the special tokens {', '.join(missing)}; retrain it with them")
    return tokenizer


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
