"""Pytest fixtures shared by every test folder; the plain helpers they use are in tests/helpers.py."""

import copy
import os
import shutil
from pathlib import Path

import pytest
import yaml

# Tests never touch the network: a hub access must fail fast, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "true"

from tests.helpers import ROOT, build_tiny, set_dotted  # noqa: E402  (after the environment is set)


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """The fixture project after a full `dvc repro`, built once. Copy it before changing anything.

    Under pytest-xdist, once for all the workers: the first to need it builds it in the run's shared
    temporary folder (under a file lock), the others wait for it and read the same folder."""
    from filelock import FileLock

    from tests.dvc_project import STAGES, dvc, make_project, ran

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        project = make_project(tmp_path_factory.mktemp("built"))
        assert ran(dvc("repro", cwd=project)) == STAGES
        return project
    shared = tmp_path_factory.getbasetemp().parent  # above each worker's own basetemp
    project, done = shared / "built", shared / "built.done"
    with FileLock(shared / "built.lock"):
        if not done.exists():
            shutil.rmtree(project, ignore_errors=True)  # a build that failed in another worker
            project.mkdir()
            make_project(project)
            assert ran(dvc("repro", cwd=project)) == STAGES
            done.touch()
    return project



@pytest.fixture
def raw_params() -> dict:
    """The project's params.yaml as a plain dict, to modify per test."""
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))



@pytest.fixture
def make_params(raw_params):
    """Validated Params with dotted-key overrides: make_params(**{"data.fraction": 1.0})."""
    from librarian.core.config import parse_params

    def make(**overrides):
        raw = copy.deepcopy(raw_params)
        for dotted, value in overrides.items():
            set_dotted(raw, dotted, value)
        return parse_params(raw)

    return make



@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread than two; the stages under test set their own."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """build_tiny's (model, tokenizer) files, built once per session: read them, never change them."""
    return build_tiny(tmp_path_factory.mktemp("tiny"))


# End-to-end tests: they drive the real dvc, the demo, a server or a browser, and take most of the
# suite's time. `pytest -m "not e2e"` is the quick local loop; CI runs everything.
E2E_MODULES = {"tests/pipeline", "tests/cli/test_demo.py", "tests/cli/test_runs.py", "tests/cli/test_plots.py",
               "tests/data/test_stream_kills.py", "tests/inference/test_serve.py", "tests/inference/test_serve_page.py"}
E2E_FIXTURES = {"built_project"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        where = Path(str(item.fspath)).relative_to(ROOT).as_posix()
        if any(where == m or where.startswith(m + "/") for m in E2E_MODULES) or E2E_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)
