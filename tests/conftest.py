import copy
import os
from pathlib import Path

import pytest
import yaml

# Tests never touch the network: a hub access must fail fast, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "true"

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FIXTURE_CORPUS = FIXTURES / "tinystories"


@pytest.fixture
def raw_params() -> dict:
    """The project's params.yaml as a plain dict, to modify per test."""
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.fixture
def make_params(raw_params):
    """Validated Params with dotted-key overrides: make_params(**{"data.fraction": 1.0})."""
    from librarian.config import parse_params

    def make(**overrides):
        raw = copy.deepcopy(raw_params)
        for dotted, value in overrides.items():
            set_dotted(raw, dotted, value)
        return parse_params(raw)

    return make


def set_dotted(raw: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        raw = raw[key]
    raw[leaf] = value


def fixture_stories(name: str = "train-sample.txt.gz") -> list[str]:
    from librarian.sources import read_shard

    return read_shard(FIXTURE_CORPUS / name)
