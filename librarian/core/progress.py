"""Progress bars that suit where stderr goes.

On a terminal, a tqdm bar redrawn in place. In a log (DVC capturing a stage, CI, `2> file`), a bar
redrawn with carriage returns ten times a second is noise: there the same text is written as a plain
line every LOG_INTERVAL_S seconds, and once more at the end.
"""

from __future__ import annotations

import io
import os
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 10.0


class _Lines(io.TextIOBase):
    """A stream for tqdm that turns each redraw ("\\r" + text + padding) into one plain line."""

    def __init__(self, out):
        self.out = out

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:  # tqdm also writes bare "\r" and "\n" to move the cursor
            self.out.write(line + "\n")
            self.out.flush()
        return len(text)

    def flush(self) -> None:
        self.out.flush()


def progress_bar(total: int, initial: int = 0, desc: str = "", unit: str = "step", disable: bool = False,
                 file=None, unit_scale: bool = False) -> tqdm:
    """A tqdm bar on `file` (default stderr): in place on a terminal, a line every LOG_INTERVAL_S otherwise.
    With `unit_scale`, counts show as k, M, G (bytes: kB, MB)."""
    out = file or sys.stderr
    common = {"total": total, "initial": initial, "desc": desc, "unit": unit, "unit_scale": unit_scale}
    if disable or _is_terminal(out):
        return tqdm(**common, disable=disable, file=out, dynamic_ncols=True)
    return tqdm(**common, file=_Lines(out), ascii=True, mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S)


def _is_terminal(out) -> bool:
    """A terminal with a width: on a pseudo-terminal of 0 columns (`script`, some CI runners) tqdm draws nothing."""
    try:
        return out.isatty() and os.get_terminal_size(out.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False
