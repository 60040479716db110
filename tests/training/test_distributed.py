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
