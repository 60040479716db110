"""Time to the error line when the Hugging Face hub cannot be reached, against the hub client alone.

    python benchmarks/hub_unreachable.py

Both run in a fresh process, online (no HF_HUB_OFFLINE), against stand-in hubs on 127.0.0.1 (set
through HF_ENDPOINT): one whose port refuses connections, one that accepts and never answers.

- baseline: `datasets.load_dataset("roneneldan/TinyStories")`, what the download stage called
  before it probed the endpoint: the client retries five times, logging each try;
- stage: `python -m stages.download`, which probes the endpoint (4 s at most), then prints one line.

Prints seconds and stderr lines for each, and the ratio baseline / stage. The silent baseline takes
minutes (about 400 s on 2 AMD EPYC cores: the hub client sets no timeout of its own there).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_name  # benchmarks/common.py: its folder is on sys.path when run
from hub_standins import refusing_endpoint, silent_endpoint  # the stand-in hubs, also the tests'

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "import datasets; datasets.load_dataset('roneneldan/TinyStories')"


def timed(argv: list[str], endpoint: str, home: Path) -> tuple[float, int, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LIBRARIAN_DEBUG")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), PYTHONPATH=str(ROOT))
    start = time.monotonic()
    run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return time.monotonic() - start, len(run.stderr.splitlines()), run.returncode


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"CPU: {cpu_name()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "params.yaml").write_text((ROOT / "params.yaml").read_text())
        stage = [sys.executable, "-m", "stages.download", str(tmp / "data" / "raw"), "--params", str(tmp / "params.yaml")]
        for name, endpoint in (("refusing", refusing_endpoint), ("silent", silent_endpoint)):
            with endpoint() as url:
                base = timed([sys.executable, "-c", BASELINE], url, tmp / "hf-base")
                ours = timed(stage, url, tmp / "hf-stage")
            print(f"{name:9s} baseline {base[0]:5.1f} s, {base[1]:2d} stderr lines | "
                  f"stage {ours[0]:5.1f} s, {ours[1]} stderr line(s), exit {ours[2]} | {base[0] / ours[0]:.1f}x faster")


if __name__ == "__main__":
    main()
