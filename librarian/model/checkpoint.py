"""Model and training-state files: safetensors for weights, never plain pickle.

A model file is a safetensors file whose metadata carries the GPTConfig as JSON, so it loads on
its own. The training state (optimizer, schedule, RNG, data position) is a torch file of tensors
and plain values only, loaded with `weights_only=True`, which cannot run code.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from librarian.core.errors import LibrarianError
from librarian.core.io import atomic_dir, atomic_path, recover_dir
from librarian.core.paths import missing_fix
from librarian.model.gpt import GPT, GPTConfig

# One metadata entry, a sorted JSON object: safetensors writes its metadata map in a random order,
# so two entries would make equal models differ in bytes. It holds the GPTConfig and the SHA-256 of
# the tokenizer.json whose ids the model was trained on (from the token files' sidecar): ids of
# another tokenizer are in range and look fine, but mean other text.
META_KEY = "librarian"
# Model files of earlier versions carry the GPTConfig alone, under this key: they still load.
LEGACY_CONFIG_KEY = "librarian.gpt_config"
# Model files written before these options existed lack them: they are the options' only value then.
_BEFORE_OPTIONS = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "attention": "manual"}
# The output head shares the token embedding's matrix, so it is stored once, under tok_emb.weight.
TIED = "lm_head.weight"


def model_metadata(config: dict, tokenizer_sha256: str | None = None) -> dict[str, str]:
    meta = {"gpt_config": config, **({"tokenizer_sha256": tokenizer_sha256} if tokenizer_sha256 else {})}
    return {META_KEY: json.dumps(meta, sort_keys=True)}


def save_weights(model: GPT, path: str | Path, tokenizer_sha256: str | None = None) -> None:
    """Weights, config and (when known) the tokenizer's hash in one safetensors file.

    Byte-identical for identical weights. Not safetensors' save_model: it records the tied names in
    more metadata entries, whose order varies from process to process.
    """
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items() if name != TIED}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=model_metadata(model.config.to_dict(), tokenizer_sha256))


def read_tokenizer_sha256(path: str | Path) -> str | None:
    """The hash of the tokenizer the model was trained with; None for files that do not record it."""
    return read_metadata(path).get("tokenizer_sha256")


def check_same_tokenizer(model_path: str | Path, expected: str | None, recorded: str | None, what: str) -> None:
    """Refuse `what` (hash `recorded`) when the model at model_path was trained with another tokenizer (`expected`)."""
    if expected and recorded and recorded != expected:
        raise LibrarianError(
            f"{what} comes from another tokenizer (sha256 {recorded[:16]}) than model {model_path} was trained "
            f"with ({expected[:16]}); use the matching files, or rerun `dvc repro`"
        )


# Everything that can go wrong reading a file that is not ours (or no longer whole).
_NOT_OURS = (SafetensorError, OSError, ValueError, KeyError, TypeError)


def _not_ours(path: Path, exc: BaseException) -> LibrarianError:
    return LibrarianError(
        f"{path} is not a Librarian model file ({type(exc).__name__}); it may be truncated or from another tool"
    )


def _transformers_export(path: Path) -> LibrarianError:
    """A model file in a transformers folder (`librarian export` writes one): no Librarian metadata."""
    return LibrarianError(
        f"{path} is a Hugging Face transformers model (its folder has config.json), not a Librarian model file; "
        f"load it with transformers (AutoModelForCausalLM.from_pretrained(\"{path.parent}\")), or give --model "
        "the Librarian file it was exported from (data/model/model.safetensors)"
    )


def read_metadata(path: str | Path) -> dict:
    """The file's Librarian metadata entry, parsed: {"gpt_config": ..., "tokenizer_sha256": ...}."""
    path = Path(path)
    if not path.exists():
        raise LibrarianError(f"model file {path} not found; {missing_fix(path, 'train a model first (`dvc repro train`)')}")
    if path.is_dir():  # safetensors would say only "Is a directory"
        inside = path / "model.safetensors"
        hint = f"did you mean {inside}?" if inside.is_file() else "give the path of a .safetensors file in it"
        raise LibrarianError(f"model file {path} is a folder, not a file; {hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if META_KEY not in metadata and LEGACY_CONFIG_KEY in metadata:
            return {"gpt_config": json.loads(metadata[LEGACY_CONFIG_KEY])}
        if META_KEY not in metadata and (path.parent / "config.json").is_file():
            raise _transformers_export(path)
        content = json.loads(metadata[META_KEY])
        if not isinstance(content, dict):
            raise TypeError("metadata is not a JSON object")
        return content
    except _NOT_OURS as exc:
        raise _not_ours(path, exc) from None


def read_config(path: str | Path) -> GPTConfig:
    content = read_metadata(path)
    try:
        # The checks params.yaml gets, so a corrupt or forged config cannot build a broken model.
        return GPTConfig.model_validate({**_BEFORE_OPTIONS, **content["gpt_config"]}, strict=False)
    except _NOT_OURS as exc:
        raise _not_ours(Path(path), exc) from None


def load_weights(path: str | Path, device: str | torch.device = "cpu", **overrides) -> GPT:
    """A GPT built from the file's own config (fields in `overrides` replaced) with its weights.

    The file's tensor names and shapes are checked against a shape-only (meta) model before any
    memory is allocated, so a file with a lying config cannot make us allocate terabytes.
    """
    config = read_config(path)
    if overrides:
        config = GPTConfig(**{**config.to_dict(), **overrides})
    mismatch = f"{path} does not match its model config"
    fix = "use a model file that Librarian wrote, or retrain (`dvc repro train`)"
    try:
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items() if name != TIED}
        with safe_open(str(path), framework="pt") as f:
            found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, AssertionError) as exc:
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise LibrarianError(f"{mismatch} ({detail}); {fix}") from None
    if found != expected:
        raise LibrarianError(f"{mismatch} ({describe_mismatch(expected, found)}); {fix}")
    model = GPT(config)
    try:
        model.load_state_dict(load_file(str(path)), strict=False)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise LibrarianError(f"{mismatch} ({str(exc).splitlines()[0][:160]}); {fix}") from None
    return model.to(device)


def describe_mismatch(expected: dict, found: dict, show: int = 3) -> str:
    """The first few differences in tensor names and shapes, on one short line."""

    def names(items) -> str:
        items = sorted(items)
        return ", ".join(items[:show]) + (f" and {len(items) - show} more" if len(items) > show else "")

    parts = []
    if missing := expected.keys() - found.keys():
        parts.append(f"{len(missing)} tensors missing: {names(missing)}")
    if unexpected := found.keys() - expected.keys():
        parts.append(f"{len(unexpected)} unexpected: {names(unexpected)}")
    if shapes := [n for n in expected.keys() & found.keys() if expected[n] != found[n]]:
        first = sorted(shapes)[0]
        parts.append(f"{len(shapes)} of other shapes, e.g. {first} {list(found[first])} for {list(expected[first])}")
    return "; ".join(parts)


def save_state(state: dict, path: str | Path) -> None:
    # Serialised in memory, then written as plain bytes: torch.save's own zip writer reports a full
    # disk as "unexpected pos N vs M", without the errno, while a plain write raises ENOSPC/EFBIG,
    # which the atomic writer turns into the one-line disk-full error.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(buffer.getbuffer())


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise LibrarianError(
            f"training state {path} is unreadable or unsafe ({type(exc).__name__}); delete it to start training afresh"
        ) from None


def rng_state(device: torch.device) -> dict:
    """This process's random streams: the CPU's and, on CUDA, its GPUs'."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])


class TrainState:
    """Everything a resumed run needs, saved and loaded through one state dict (as in litgpt).

    A state folder holds `last.safetensors` (the weights), `best.safetensors` (the best so far,
    written by the trainer when it improves) and `state.pt`: state_dict() minus the weights, i.e.
    tensors and plain values only, so it loads with weights_only=True. `progress` is any dataclass
    (the trainer's Progress); it is kept as JSON text, which loads whatever its history holds.
    The fingerprint names the params and data the state belongs to: another run's is not resumed.
    """

    STATE, LAST, BEST = "state.pt", "last.safetensors", "best.safetensors"

    def __init__(self, model: GPT, optimizer, scaler, progress, fingerprint: str, device: torch.device,
                 precision: str, rank: int = 0, rngs: list[dict] | None = None):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.progress, self.fingerprint, self.device = progress, fingerprint, device
        # Under torchrun every process draws its own dropout masks: rank 0 saves every rank's RNG
        # state (rngs, in rank order), and each rank resumes its own. None: this process's alone.
        self.rank, self.rngs = rank, rngs
        self.precision = precision  # "cpu/bf16": part of the fingerprint, kept readable to say why a state is not resumed

    def state_dict(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "fingerprint": self.fingerprint,
            "precision": self.precision,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self.rngs if self.rngs is not None else [rng_state(self.device)],
            "progress": json.dumps(asdict(self.progress)),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        # A rank the saving run did not have keeps the stream the Trainer seeded (seed + rank).
        if self.rank < len(state["rng"]):
            set_rng_state(state["rng"][self.rank], self.device)
        self.progress = type(self.progress)(**json.loads(state["progress"]))

    def save(self, folder: str | Path, tokenizer_sha256: str | None) -> None:
        """Replace the state folder whole: a kill leaves the previous complete state or this one."""
        folder = Path(folder)
        best = folder / self.BEST
        with atomic_dir(folder) as tmp:
            save_weights(self.model, tmp / self.LAST, tokenizer_sha256)
            if best.exists():
                shutil.copyfile(best, tmp / self.BEST)
            save_state(self.state_dict(), tmp / self.STATE)

    def load(self, folder: str | Path) -> str:
        """Resume from `folder`: "" when resumed, else why not ("none", "other run", or "other precision:
        cpu/bf16" for a state saved on another device or in another precision)."""
        folder = Path(folder)
        recover_dir(folder)
        if not (folder / self.STATE).exists():
            return "none"
        state = load_state(folder / self.STATE)
        if state.get("fingerprint") != self.fingerprint:
            saved = state.get("precision")
            return f"other precision: {saved}" if saved and saved != self.precision else "other run"
        self.model.load_state_dict(load_weights(folder / self.LAST).state_dict())
        self.load_state_dict(state)
        return ""
