"""The train stage under torchrun: 2 CPU processes (gloo) follow the single-process loss curve."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, TINY_MODEL, VOCAB, stories, write_chat_variants, write_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curve(live: Path, name: str) -> list[float]:
    lines = (live / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()[1:]
    return [float(line.split("\t")[1]) for line in lines]


def run_stage(launcher: list[str], params: Path, tokens: Path, out: Path) -> None:
    args = ["-m", "stages.train", str(tokens), str(tokens.parent / "chat_tokens"), str(out / "model"), str(out / "live"), str(out / "speed"),
            str(out / "state"), "--params", str(params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


# Mixed: a share of every epoch's windows from conversations (train.chat_share), two variants.
@pytest.mark.parametrize("mixture", [{}, {"train.chat_share": 0.5, "train.chat_mask": "replies"}],
                         ids=["stories", "stories and conversations"])
def test_two_gloo_processes_match_one_process(tmp_path, raw_params, mixture):
    import yaml

    from tests.helpers import set_dotted

    tokens = tmp_path / "tokens"
    write_tokens(tokens, "train", stories(150, seed=1), VOCAB)
    write_tokens(tokens, "val", stories(30, seed=2), VOCAB)
    write_chat_variants(tmp_path / "chat_tokens", n_variants=2)
    # No dropout: its random masks are drawn per process, so they could not match anyway.
    for key, value in {**TINY_MODEL, "model.dropout": 0.0, "train.max_epochs": 3, **mixture}.items():
        set_dotted(raw_params, key, value)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw_params))

    run_stage([sys.executable], params, tokens, tmp_path / "data" / "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                f"--master_port={free_port()}"]
    run_stage(torchrun, params, tokens, tmp_path / "data" / "two")

    for name in ["train_loss", "val_loss"]:
        one, two = curve(tmp_path / "data" / "one" / "live", name), curve(tmp_path / "data" / "two" / "live", name)
        # val loss once an epoch; train loss every train.log_every (10) steps and at the last (34 steps an epoch)
        assert len(one) == len(two) == {"train_loss": 11, "val_loss": 3}[name]
        assert two == pytest.approx(one, rel=1e-4), name
    assert one[-1] < one[0]  # it did learn
    assert (tmp_path / "data" / "two" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "data" / "two" / "state").exists()


# --- each rank its own dropout stream, saved and resumed (gloo, 2 processes spawned here) ----------


class _Stop(Exception):
    """Ends a worker's training mid-run, at the same step on every rank (a checkpoint lies behind it)."""


def _rank_worker(rank: int, world: int, port: int, raw: dict, tokens: str, root: str, stop_after: int) -> None:
    """One rank of a run, as torchrun starts it: the Trainer the train stage builds, on gloo."""
    import numpy as np
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from librarian.core.config import parse_params
    from librarian.training.train import Trainer, TrainPaths, build_trainer

    if stop_after:
        real, calls = Trainer.train_step, {"n": 0}

        def stopping_step(self, order):
            calls["n"] += 1
            if calls["n"] > stop_after:
                raise _Stop
            return real(self, order)

        Trainer.train_step = stopping_step
    out = Path(root)
    paths = TrainPaths(model=out / "model", curves=out / "live", speed=out / "speed", state=out / "state")
    try:
        trainer = build_trainer(parse_params(raw), tokens, paths)
        assert trainer.net.broadcast_buffers is False  # the mask and RoPE tables are constants: not sent a step
        with torch.random.fork_rng():  # the rank's first dropout mask, without moving its stream on
            np.save(out / f"mask{rank}.npy", torch.nn.functional.dropout(torch.ones(256), 0.5).numpy())
        trainer.run()
    except _Stop:
        pass
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(raw: dict, tokens: Path, root: Path, stop_after: int = 0) -> None:
    import torch.multiprocessing as mp

    root.mkdir(parents=True, exist_ok=True)
    mp.spawn(_rank_worker, args=(2, free_port(), raw, str(tokens), str(root), stop_after), nprocs=2, join=True)


def test_ranks_draw_their_own_dropout_masks_and_a_resumed_run_is_bit_identical(tmp_path, raw_params):
    import numpy as np

    from tests.helpers import set_dotted

    tokens = tmp_path / "tokens"
    write_tokens(tokens, "train", stories(60, seed=1), VOCAB)
    write_tokens(tokens, "val", stories(15, seed=2), VOCAB)
    for key, value in {**TINY_MODEL, "model.dropout": 0.2, "train.max_epochs": 2, "train.checkpoint_every": 3,
                       "train.chat_share": 0.0}.items():
        set_dotted(raw_params, key, value)

    _spawn(raw_params, tokens, tmp_path / "straight")
    masks = [np.load(tmp_path / "straight" / f"mask{rank}.npy") for rank in (0, 1)]
    assert not np.array_equal(*masks)  # seed + rank: the ranks do not drop the same units

    _spawn(raw_params, tokens, tmp_path / "resumed", stop_after=7)  # stopped past the checkpoint of step 6
    assert (tmp_path / "resumed" / "state" / "state.pt").exists()
    _spawn(raw_params, tokens, tmp_path / "resumed")  # resumes, every rank with its own saved stream
    for name in ("model.safetensors", "last.safetensors"):
        assert ((tmp_path / "resumed" / "model" / name).read_bytes()
                == (tmp_path / "straight" / "model" / name).read_bytes()), name


def test_the_backend_follows_the_training_device_and_the_gpu_is_set_before_the_group(monkeypatch, make_params):
    """train.device: cpu under torchrun on a CUDA machine must use gloo (nccl would get CPU tensors), and
    each process binds its GPU (LOCAL_RANK) before the process group starts."""
    import torch
    import torch.distributed as dist

    from librarian.training import distributed, runtime

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    assert distributed.init(torch.device("cpu")) == (1, 2) and calls == [("init", "gloo")]
    calls.clear()
    was = torch.are_deterministic_algorithms_enabled()
    try:
        rt = runtime.setup_runtime(make_params(**{"train.device": "cuda"}).train)
    finally:
        torch.use_deterministic_algorithms(was)
        torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = False
    assert calls == [("set_device", "cuda:1"), ("init", "nccl")]
    assert (str(rt.device), rt.rank, rt.world, rt.precision.tag) == ("cuda:1", 1, 2, "cuda/bf16")
